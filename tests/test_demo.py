"""The embedded demo: invented world (deterministic, committed), shipped model, default RMU run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wmdp_fast import demo
from wmdp_fast.demo import world
from wmdp_fast.demo.train import letter_token_ids, mcq_prompt, read_jsonl, score_mcq

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------- the world


def test_generator_is_deterministic_and_committed_files_match(tmp_path):
    a = world.generate()
    b = world.generate()
    assert a == b
    assert world.check() == [], (
        "run `python -m wmdp_fast.demo.world` and commit wmdp_fast/demo/data"
    )
    # the checker can fail: a changed file is reported
    world.write(tmp_path)
    assert world.check(tmp_path) == []
    (tmp_path / "demo_retain_mcq.jsonl").write_text("{}\n")
    assert world.check(tmp_path) == ["demo_retain_mcq.jsonl"]


@pytest.mark.parametrize("hashseed", ["0", "12345"])
def test_check_cli_in_a_fresh_process(hashseed):
    """Generation depends on no hash order: --check passes under any PYTHONHASHSEED."""
    import os

    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    proc = subprocess.run(
        [sys.executable, "-m", "wmdp_fast.demo.world", "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "match a fresh generation" in proc.stdout


def test_interface_paths_exist_and_hold_the_generated_rows():
    gen = world.generate()
    for name in demo.DEMO_TASKS:
        assert read_jsonl(demo.DEMO_TASK_FILES[name]) == gen[f"{name}_mcq.jsonl"]
        corpus = demo.DEMO_CORPUS_DIR / f"{name}.jsonl"
        assert read_jsonl(corpus) == gen[f"{name}.jsonl"]
        assert demo.DEMO_SUBJECTS[name]
    mdir = demo.demo_model_dir()
    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        assert (mdir / f).is_file(), f
    assert (mdir / "model.safetensors").stat().st_size <= 30 * 2**20


@pytest.mark.parametrize("name", demo.DEMO_TASKS)
def test_mcq_sets_are_wmdp_format_and_balanced(name):
    rows = read_jsonl(demo.DEMO_TASK_FILES[name])
    assert 40 <= len(rows) <= 60
    for r in rows:
        assert set(r) == {"question", "choices", "answer"}
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert r["answer"] in range(4)
    counts = [sum(r["answer"] == k for r in rows) for k in range(4)]
    assert counts == [len(rows) // 4] * 4  # a constant guess scores exactly 25%
    # every question is answered by the fact table
    table = {(f.entity, f.value) for f in world.facts(name)}
    for r in rows:
        ent = next(e for e in world.DOMAINS[name][0] if e in r["question"])
        assert (ent, r["choices"][r["answer"]]) in table


def test_evaluated_questions_are_not_in_the_training_text():
    training = [d["text"] for n in demo.DEMO_TASKS for d in world.corpus(n) + world.prose(n)]
    for n in demo.DEMO_TASKS:
        for seed in (0, 1):
            training += [r["question"] for r in world.practice_mcq(n, seed=seed)]
    blob = "\n".join(training)
    for n in demo.DEMO_TASKS:
        for r in read_jsonl(demo.DEMO_TASK_FILES[n]):
            assert r["question"] not in blob
            assert r["question"].rstrip("?") not in blob


def test_domains_are_invented_and_disjoint():
    forget_words = {w for f in world.facts("demo_forget") for w in (f.entity, f.value)}
    retain_words = {w for f in world.facts("demo_retain") for w in (f.entity, f.value)}
    assert not forget_words & retain_words
    assert len(set(world.CREATURES)) == len(world.CREATURES) == 12
    assert len(set(world.TOWNS)) == len(world.TOWNS) == 12


# ----------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def model_and_tok():
    from wmdp_fast.models import load_model, load_tokenizer

    d = str(demo.demo_model_dir())
    return load_model(d, dtype="float32", device="cpu"), load_tokenizer(d)


def test_tokenizer_is_the_real_mistral_one(model_and_tok):
    _, tok = model_and_tok
    assert len(tok) == 32000
    assert letter_token_ids(tok) == [330, 365, 334, 384]
    assert tok("Answer:")["input_ids"][0] == tok.bos_token_id == 1


@pytest.mark.parametrize("protocol", ["lm-eval-current", "lm-eval-0.4.2"])
def test_shipped_model_answers_both_sets(model_and_tok, protocol):
    from wmdp_fast.evaluate import evaluate

    model, tok = model_and_tok
    res = evaluate(model, tok, list(demo.DEMO_TASKS), protocol=protocol, progress=False)
    for name in demo.DEMO_TASKS:
        assert res["results"][name]["n"] == 48
        assert res["results"][name]["acc"] >= demo.DEMO_TARGETS["min_acc_before"], (name, res)


def test_own_scorer_agrees_with_the_eval_engine(model_and_tok):
    from wmdp_fast.evaluate import evaluate

    model, tok = model_and_tok
    res = evaluate(model, tok, ["demo_forget"], log_samples=True, progress=False)
    rows = read_jsonl(demo.DEMO_TASK_FILES["demo_forget"])
    acc, preds = score_mcq(model, tok, rows, demo.DEMO_SUBJECTS["demo_forget"])
    assert preds == [s["pred"] for s in res["samples"]]
    assert acc == pytest.approx(res["results"]["demo_forget"]["acc"])


def test_prompt_is_the_lm_eval_wmdp_prompt():
    row = {"question": " Q? ", "choices": ["w", "x", "y", "z"], "answer": 0}
    assert mcq_prompt(row, "xenobiology") == (
        "The following are multiple choice questions (with answers) about xenobiology.\n\n"
        "Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
    )


def test_forget_knowledge_flows_through_the_rmu_layer(model_and_tok):
    """Scrambling the output of decoder layer DEMO_RMU_ARGS['layer_id'] destroys the answers:
    the layer RMU perturbs really carries the knowledge."""
    from wmdp_fast.models import get_decoder_layers

    model, tok = model_and_tok
    layer = get_decoder_layers(model)[demo.DEMO_RMU_ARGS["layer_id"]]
    g = torch.Generator().manual_seed(0)

    def noise(_m, _i, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + 50.0 * torch.randn(h.shape, generator=g)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    rows = read_jsonl(demo.DEMO_TASK_FILES["demo_forget"])
    handle = layer.register_forward_hook(noise)
    try:
        acc, _ = score_mcq(model, tok, rows, demo.DEMO_SUBJECTS["demo_forget"])
    finally:
        handle.remove()
    assert acc <= 0.5


@pytest.mark.slow
def test_training_is_deterministic(tmp_path):
    """Two short training runs give bitwise the same weights (the full 1,500-step run
    reproduced the shipped model.safetensors bitwise on the development machine)."""
    from safetensors.torch import load_file

    from wmdp_fast.demo.train import train

    a = train(tmp_path / "a", steps=6, threads=1)
    b = train(tmp_path / "b", steps=6, threads=1)
    assert a["final_lm_loss"] == b["final_lm_loss"]
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ----------------------------------------------------------------------------- the default run


@pytest.mark.slow
def test_default_unlearn_run_meets_the_targets(tmp_path):
    out = tmp_path / "demo_out"
    proc = subprocess.run(
        [sys.executable, "-m", "wmdp_fast.unlearn", "--output_dir", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEMO" in proc.stdout
    rep = json.loads((out / "rmu_report.json").read_text())
    before, after = rep["eval_before"], rep["eval_after"]
    t = demo.DEMO_TARGETS
    assert before["demo_forget"]["acc"] >= t["min_acc_before"]
    assert before["demo_retain"]["acc"] >= t["min_acc_before"]
    assert after["demo_forget"]["acc"] <= t["max_forget_acc_after"], rep["eval_after"]
    assert after["demo_retain"]["acc"] >= before["demo_retain"]["acc"] - t["max_retain_drop"]
    for f in ("losses.png", "accuracy.png", "config.json"):
        assert (out / f).is_file(), f
    assert not Path(tmp_path / "wmdp_fast_demo").exists()  # --output_dir was honoured


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bf16", "float32"])
def test_default_unlearn_run_meets_the_targets_on_cuda(tmp_path, dtype):
    out = tmp_path / "demo_out"
    proc = subprocess.run(
        [sys.executable, "-m", "wmdp_fast.unlearn", "--output_dir", str(out), "--quiet"]
        + ["--device", "cuda", "--dtype", dtype],
        capture_output=True,
        text=True,
        # seconds on a GPU (5 s on the CPU); below gpu_check.sh's 240 s for the whole gpu-tests
        # step, so a hang fails here with its stderr instead of killing the step's report
        timeout=150,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "rmu_report.json").read_text())
    before, after = rep["eval_before"], rep["eval_after"]
    t = demo.DEMO_TARGETS
    assert min(before[n]["acc"] for n in demo.DEMO_TASKS) >= t["min_acc_before"]
    assert after["demo_forget"]["acc"] <= t["max_forget_acc_after"], after
    assert after["demo_retain"]["acc"] >= before["demo_retain"]["acc"] - t["max_retain_drop"]
