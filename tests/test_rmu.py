"""RMU engine behaviour: resume (bitwise), NaN/inf, output directory, control vectors, corpora,
the saved checkpoint. Tiny random-weight models, float32/bf16 on the CPU, few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_rmu_parity import tiny_cfg, write_corpora

from wmdp_fast.corpora import load_corpora, load_corpus
from wmdp_fast.errors import ConfigError, DataError, ModelError, TrainingError
from wmdp_fast.rmu import RMUConfig, draw_control_vectors, plan_batches, run_rmu
from wmdp_fast.testing import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("rmu")
    model_dir = make_tiny_model(d / "model", arch="mistral", num_hidden_layers=3)
    corpus = write_corpora(d / "corpora")
    return model_dir, corpus


class _Interrupt:
    """step_callback that raises `exc` once, after step `at`."""

    def __init__(self, at: int, exc: type[BaseException]):
        self.at, self.exc = at, exc

    def __call__(self, step, row):
        if step == self.at:
            raise self.exc("simulated")


@pytest.mark.parametrize(
    "dtype,opt_dtype", [("float32", "model"), ("bfloat16", "float32")], ids=["fp32", "bf16-fp32opt"]
)
def test_resume_is_bitwise_identical(tmp_path, tiny, dtype, opt_dtype):
    model_dir, corpus = tiny
    kw = dict(max_num_batches=6, dtype=dtype, optimizer_dtype=opt_dtype)
    full = run_rmu(tiny_cfg(tmp_path / "a", model_dir, corpus, **kw), progress=False)

    # Ctrl-C after step 2: a checkpoint of the consistent state after 3 steps is written
    cfg = tiny_cfg(tmp_path / "b", model_dir, corpus, checkpoint_every=2, **kw)
    with pytest.raises(TrainingError, match="--resume"):
        run_rmu(cfg, progress=False, step_callback=_Interrupt(2, KeyboardInterrupt))
    out = Path(cfg.output_dir)
    assert not out.exists()
    assert (
        json.loads((out.parent / ".out.rmu-checkpoint" / "state.json").read_text())["steps_done"]
        == 3
    )
    # a kill after step 4 (no handler runs): the periodic checkpoint after 4 steps remains
    with pytest.raises(RuntimeError):
        cfg.resume = True
        run_rmu(cfg, progress=False, step_callback=_Interrupt(4, RuntimeError))
    state = json.loads((out.parent / ".out.rmu-checkpoint" / "state.json").read_text())
    assert state["steps_done"] == 4
    resumed = run_rmu(cfg, progress=False)
    assert resumed.report["resumed_from_step"] == 4
    for name, t in full.params.items():
        assert torch.equal(resumed.params[name], t), name
    assert resumed.report["losses"] == full.report["losses"]
    assert not (out.parent / ".out.rmu-checkpoint").exists()


def test_resume_with_the_default_output_dir(tmp_path, tiny, monkeypatch):
    """Without --output_dir the directory name holds the start time, so rerunning the same
    command with --resume cannot find the checkpoint: the interruption message names the
    --output_dir to pass, --resume without it says so, and resuming with it finishes."""
    model_dir, corpus = tiny
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=3, output_dir=None)
    with pytest.raises(TrainingError, match="--output_dir") as info:
        run_rmu(cfg, progress=False, step_callback=_Interrupt(0, KeyboardInterrupt))
    out = next(Path("models").iterdir()).name.removeprefix(".").removesuffix(".rmu-checkpoint")
    assert str(Path("models") / out) in str(info.value)
    cfg.resume = True
    with pytest.raises(ConfigError, match="--output_dir"):
        run_rmu(cfg, progress=False)
    cfg.output_dir = str(Path("models") / out)
    assert run_rmu(cfg, progress=False).report["resumed_from_step"] == 1


def test_resume_refuses_other_settings(tmp_path, tiny):
    model_dir, corpus = tiny
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=4, checkpoint_every=1)
    with pytest.raises(TrainingError):
        run_rmu(cfg, progress=False, step_callback=_Interrupt(0, KeyboardInterrupt))
    cfg.resume, cfg.lr = True, 2e-3
    with pytest.raises(ConfigError, match="other settings"):
        run_rmu(cfg, progress=False)


def test_nan_loss_stops_with_step_and_saves_nothing(tmp_path, tiny):
    model_dir, corpus = tiny
    # a huge lr blows the weights up after the first update: step 1 sees inf/NaN
    cfg = tiny_cfg(tmp_path, model_dir, corpus, lr=1e30, max_num_batches=4)
    with pytest.raises(TrainingError, match=r"at step 1\b"):
        run_rmu(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_non_finite_weights_after_the_last_update_save_nothing(tmp_path, tiny):
    """The loss check sees each update only through the next step's loss: the last update's
    result is checked before saving (an lr of 1e39 overflows float32 in one step)."""
    model_dir, corpus = tiny
    cfg = tiny_cfg(tmp_path, model_dir, corpus, lr=1e39, max_num_batches=1)
    with pytest.raises(TrainingError, match=r"last update \(step 0\) made .*down_proj"):
        run_rmu(cfg, progress=False)
    assert not Path(cfg.output_dir).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_output_dir_refused_without_overwrite(tmp_path, tiny):
    model_dir, corpus = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=2)
    with pytest.raises(ConfigError, match="--overwrite"):
        run_rmu(cfg, progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    cfg.overwrite, cfg.verbose = True, True
    res = run_rmu(cfg, progress=False)
    assert not (out / "keep.txt").exists()
    rep = json.loads((out / "rmu_report.json").read_text())
    assert [r["step"] for r in rep["losses"]] == [0, 1]
    assert set(rep["losses"][0]) >= {"step", "loss", "forget_loss", "retain_loss"}
    assert rep["params_updated"][0]["name"] == "model.layers.1.mlp.down_proj.weight"
    assert (out / "losses.png").stat().st_size > 1000
    assert rep["peak_gpu_memory_bytes"] is None  # CPU run
    # --verbose: the published cosine similarities and norms; before the first update the
    # retain outputs equal the frozen ones
    assert rep["losses"][0]["retain_cosine_sim"] == pytest.approx(1.0, abs=1e-5)
    assert rep["losses"][0]["unlearn_cosine_sim"] == pytest.approx(1.0, abs=1e-5)
    assert rep["losses"][1]["unlearn_cosine_sim"] < 1.0 - 1e-6
    assert rep["losses"][0]["topic0_updated_forget_norm"] > 0
    # the output loads with transformers as is, with the trained tensors in place
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(
        m.model.layers[2].mlp.down_proj.weight, res.params["model.layers.2.mlp.down_proj.weight"]
    )


def test_optimizer_is_the_published_transformers_adamw():
    """The published script's optimizer is the old transformers.AdamW (eps added to sqrt(v),
    bias corrections in the step size), not torch's AdamW (eps added to the bias-corrected
    sqrt(v)): with gradients near eps, as RMU's on a 7B model, the steps differ several-fold."""
    from test_rmu_parity import TransformersAdamW
    from transformers import AutoModelForCausalLM

    from wmdp_fast.rmu import _Trainer
    from wmdp_fast.testing import tiny_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config("mistral", num_hidden_layers=2), dtype=torch.float32
    )
    cfg = RMUConfig(layer_id=1, layer_ids=[0, 1], param_ids=[6], lr=1e-3)
    trainer = _Trainer(model, cfg, 0, [], torch.device("cpu"))
    start = [p.detach().clone() for p in trainer.params]
    ref = [p.clone() for p in start]
    ref_opt = TransformersAdamW(ref, lr=cfg.lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p, r in zip(trainer.params, ref):
            g = torch.randn(p.shape, generator=gen) * 1e-6
            p.grad, r.grad = g.clone(), g.clone()
        trainer.opt.step()
        ref_opt.step()
    for p, r, p0 in zip(trainer.params, ref, start):
        assert (r - p0).abs().max() > 1e-5  # the parameters moved
        torch.testing.assert_close(p.detach() - p0, r - p0, rtol=1e-6, atol=1e-12)


def test_control_vectors_follow_published_seeding():
    cvs = draw_control_vectors([6.5, 3.0], 32, seed=42, device="cpu", dtype=torch.float32)
    torch.manual_seed(42)
    for c, coeff in zip(cvs, [6.5, 3.0]):
        u = torch.rand(1, 1, 32)
        torch.testing.assert_close(c, u / torch.norm(u) * coeff, rtol=0, atol=0)
        assert (c > 0).all() and abs(c.norm().item() - coeff) < 1e-5


def test_control_vector_rng_cpu_is_the_cpu_draw_on_any_device():
    """--control-vector-rng cpu: the vectors of a CPU run, moved to the run's device (the demo's
    setting; the published draw uses the device's generator, whose numbers differ on CUDA).
    The default keeps the published draw and the --resume fingerprints of earlier versions."""
    cpu = draw_control_vectors([6.5, 3.0], 32, seed=42, device="cpu", dtype=torch.float32)
    dev = "cuda" if torch.cuda.is_available() else "meta"
    moved = draw_control_vectors([6.5, 3.0], 32, 42, dev, torch.float32, rng="cpu")
    assert all(m.device.type == dev and m.shape == c.shape for m, c in zip(moved, cpu))
    if dev == "cuda":
        assert all(torch.equal(m.cpu(), c) for m, c in zip(moved, cpu))
        published = draw_control_vectors([6.5, 3.0], 32, 42, dev, torch.float32)
        assert not torch.equal(published[0].cpu(), cpu[0])
    assert RMUConfig(control_vector_rng="cpu").training_fingerprint() != (
        RMUConfig().training_fingerprint()
    )
    with pytest.raises(ConfigError, match="control-vector-rng"):
        RMUConfig(control_vector_rng="gpu").validate()
    from wmdp_fast.unlearn import build_parser, config_from_args

    def rng(*argv):
        return config_from_args(build_parser().parse_args(list(argv)))[0].control_vector_rng

    assert rng() == "cpu"  # the demo
    assert rng("--model_name_or_path", "m") == "device"  # published
    assert rng("--control-vector-rng", "device") == "device"
    assert rng("--model_name_or_path", "m", "--control-vector-rng", "cpu") == "cpu"


def test_plan_batches_interleaves_topics_and_lengths():
    forget = [[["a1"], ["a2"]], [["b1"], ["b2"]]]
    retain = [[["r1"], ["r2"]], [["r1"], ["r2"]]]
    entries, f_idx, r_idx = plan_batches(forget, retain, 3)
    got = [(entries[f_idx[i]], entries[r_idx[i]]) for i in range(3)]
    assert got == [
        ((("a1",), 512), (("r1",), 512)),
        ((("b1",), 768), (("r1",), 512)),
        ((("a2",), 512), (("r2",), 512)),
    ]
    assert r_idx[0] == r_idx[1]  # the same retain batch is cached once


def test_corpora_exact_and_clean_modes(tmp_path):
    d = tmp_path
    (d / "cyber-forget-corpus.jsonl").write_text('{"text": "abc"}\n{"text": "defg"}\n')
    (d / "bio-forget-corpus.jsonl").write_text('{"text": "bio one"}\n{"text": ""}\n')
    (d / "wikitext.jsonl").write_text('{"text": ""}\n{"text": " = A = \\n"}\n')
    assert load_corpus("cyber-forget-corpus", d) == ['{"text": "abc"}\n', '{"text": "defg"}\n']
    assert load_corpus("cyber-forget-corpus", d, mode="clean") == ["abc", "defg"]
    assert load_corpus("cyber-forget-corpus", d, min_len=3, mode="clean") == ["defg"]
    assert load_corpus("bio-forget-corpus", d) == ["bio one"]
    assert load_corpus("wikitext", d) == [" = A = \n"]
    with pytest.raises(DataError, match="does not exist"):
        load_corpus("chem-forget-corpus", d)
    (d / "bad-bio-forget-corpus.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=":2:"):
        load_corpus("bad-bio-forget-corpus", d)
    (d / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no document"):
        load_corpus("empty", d)


def test_corpora_short_corpus_shortens_the_run(tmp_path, caplog):
    (tmp_path / "f.jsonl").write_text("".join(f'{{"text": "doc {i}"}}\n' for i in range(5)))
    (tmp_path / "wikitext.jsonl").write_text(
        "".join(f'{{"text": "line {i}"}}\n' for i in range(20))
    )
    with caplog.at_level("WARNING", logger="wmdp_fast"):
        forget, retain, n = load_corpora(["f"], ["wikitext"], 2, 150, corpus_dir=tmp_path)
    assert n == 3 and len(forget[0]) == 3 and forget[0][2] == ['{"text": "doc 4"}\n']
    assert "running 3 steps" in caplog.text
    with pytest.raises(ConfigError, match="one retain corpus per forget topic"):
        load_corpora(["f", "f"], ["wikitext"], 2, 150, corpus_dir=tmp_path)


def test_config_validation_names_the_flag():
    with pytest.raises(ConfigError, match="--alpha"):
        RMUConfig(alpha=[1.0]).validate()
    with pytest.raises(ConfigError, match="--steering_coeffs"):
        RMUConfig(steering_coeffs=[1.0, 2.0, 3.0]).validate()
    # an empty list (e.g. --layer_ids "") is a one-line ConfigError, not a ValueError traceback
    with pytest.raises(ConfigError, match="--layer_ids"):
        RMUConfig(layer_ids=[]).validate()
    with pytest.raises(ConfigError, match="--param_ids"):
        RMUConfig(param_ids=[]).validate()
    with pytest.raises(ConfigError, match="--control-vectors /no/such.safetensors: no such file"):
        RMUConfig(control_vectors="/no/such.safetensors").validate()


def test_layer_and_param_validation(tmp_path, tiny):
    model_dir, corpus = tiny
    with pytest.raises(ConfigError, match="--layer_id 5 is out of range"):
        run_rmu(tiny_cfg(tmp_path, model_dir, corpus, layer_id=5), progress=False)
    with pytest.raises(ConfigError, match="--param_ids 'mlp.nope'"):
        run_rmu(tiny_cfg(tmp_path, model_dir, corpus, param_ids=["mlp.nope"]), progress=False)
    with pytest.raises(ConfigError, match="--param_ids 42 is out of range"):
        run_rmu(tiny_cfg(tmp_path, model_dir, corpus, param_ids=[42]), progress=False)
    # a GPU-resident cache asked for on a CPU run is refused, not silently kept on the CPU
    with pytest.raises(ConfigError, match="--cache-device cuda needs a CUDA --device"):
        run_rmu(tiny_cfg(tmp_path, model_dir, corpus, cache_device="cuda"), progress=False)


def test_saved_checkpoint_keeps_original_dtype(tmp_path):
    """A bf16-stored checkpoint trained in float32 is saved back in bf16, other tensors intact."""
    from transformers import AutoModelForCausalLM

    src = make_tiny_model(tmp_path / "fp32", arch="llama", num_hidden_layers=2)
    m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(torch.bfloat16)
    m.save_pretrained(str(tmp_path / "bf16"))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (tmp_path / "bf16" / f.name).write_bytes(f.read_bytes())
    corpus = write_corpora(tmp_path / "corpora")
    cfg = tiny_cfg(
        tmp_path, tmp_path / "bf16", corpus, layer_id=1, layer_ids=[1], max_num_batches=2
    )
    res = run_rmu(cfg, progress=False)
    orig = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    saved = load_file(str(res.output_dir / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert saved[name].dtype == torch.bfloat16
    assert not torch.equal(saved[name], orig[name])
    torch.testing.assert_close(saved[name], res.params[name].to(torch.bfloat16), rtol=0, atol=0)
    assert all(torch.equal(saved[k], v) for k, v in orig.items() if k != name)


def test_offload_streams_prefix_with_identical_results(tmp_path, tiny):
    """--offload (prefix layers streamed one at a time over all batches) is exact."""
    model_dir, corpus = tiny
    kw = dict(max_num_batches=3, layer_id=2, layer_ids=[2])
    plain = run_rmu(tiny_cfg(tmp_path / "a", model_dir, corpus, **kw), progress=False)
    off = run_rmu(tiny_cfg(tmp_path / "b", model_dir, corpus, offload=True, **kw), progress=False)
    for k, v in plain.params.items():
        assert torch.equal(off.params[k], v), k
    assert off.report["losses"] == plain.report["losses"]


def test_4bit_prefix_is_approximate_but_saves_full_precision(tmp_path, tiny):
    """A 4-bit prefix: retain loss still exactly 0 at step 0 (targets from the same inputs),
    the report says the cache is approximate, and the saved checkpoint keeps every untrained
    tensor of the original in its original precision."""
    pytest.importorskip("bitsandbytes")
    model_dir, corpus = tiny
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=2, load_in_4bit=True)
    res = run_rmu(cfg, progress=False)
    rep = res.report
    assert rep["losses"][0]["retain_loss"] == 0.0
    assert rep["cache"]["exact"] is False and "quantized" in rep["cache"]["note"]
    orig = load_file(str(Path(model_dir) / "model.safetensors"))
    saved = load_file(str(res.output_dir / "model.safetensors"))
    for k, v in orig.items():
        if k in res.params:
            assert saved[k].dtype == v.dtype and not torch.equal(saved[k], v)
        else:
            assert torch.equal(saved[k], v), k


def test_memory_preflight_names_the_flag_that_fits():
    """The preflight on the Zephyr-7B architecture (meta tensors, nothing allocated): the
    published settings fit in 8 GiB; with less free memory the error names what would fit."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from wmdp_fast.errors import ResourceError
    from wmdp_fast.rmu import estimate_gpu_memory, preflight

    cfg = MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    rcfg = RMUConfig()
    bf16, gib = torch.bfloat16, 2**30
    need = estimate_gpu_memory(model, rcfg, 5, bf16, 768, 3 * gib, False)
    assert 3 * gib < need < 8 * gib
    assert preflight(model, rcfg, 5, bf16, 768, 3 * gib, False, 8 * gib)["estimated_bytes"] == need
    with pytest.raises(ResourceError, match="--cache-device cpu"):
        preflight(model, rcfg, 5, bf16, 768, 3 * gib, True, need + gib)
    with pytest.raises(ResourceError, match=r"--batch_size (2|1)"):
        preflight(model, rcfg, 5, bf16, 768, 3 * gib, False, need - gib)
    with pytest.raises(ResourceError, match="free GPU memory"):
        preflight(model, rcfg, 5, bf16, 768, 3 * gib, False, gib // 2)


def test_resume_fingerprint_follows_control_vector_contents(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "cv.safetensors"
    save_file({"control_vectors": torch.ones(1, 8)}, str(path))
    cfg = RMUConfig(control_vectors=str(path))
    before = cfg.training_fingerprint()
    assert cfg.training_fingerprint() == before
    save_file({"control_vectors": torch.full((1, 8), 2.0)}, str(path))  # same name, new vectors
    assert cfg.training_fingerprint() != before


@pytest.mark.parametrize("change", ["all_weights", "trained_layer_only", "corpus_text"])
def test_resume_refuses_changed_weights_or_data(tmp_path, change):
    """The flags name the model and corpora by path only: a checkpoint is refused when the
    weights (all of them, or only a replayed layer's, which the cache key does not cover) or
    the corpus text changed; restored, it resumes."""
    from safetensors.torch import load_file, save_file
    from test_rmu_parity import write_corpora

    corpus = write_corpora(tmp_path / "corpora")
    model_dir = make_tiny_model(tmp_path / "model", arch="mistral", num_hidden_layers=3, seed=0)
    cfg = tiny_cfg(tmp_path / "run", model_dir, corpus, max_num_batches=4, checkpoint_every=1)
    with pytest.raises(TrainingError):
        run_rmu(cfg, progress=False, step_callback=_Interrupt(0, KeyboardInterrupt))
    weights = Path(model_dir) / "model.safetensors"
    original, text = weights.read_bytes(), (Path(corpus) / "wikitext.jsonl").read_text()
    if change == "all_weights":
        make_tiny_model(tmp_path / "model", arch="mistral", num_hidden_layers=3, seed=1)
    elif change == "trained_layer_only":  # layer 1 = min(layer_ids): replayed, not cached
        sd = load_file(str(weights))
        sd["model.layers.1.self_attn.q_proj.weight"] *= 1.01
        save_file(sd, str(weights), metadata={"format": "pt"})
    else:
        lines = text.splitlines()
        lines[0] = json.dumps({"text": json.loads(lines[0])["text"] + " changed"})
        (Path(corpus) / "wikitext.jsonl").write_text("\n".join(lines) + "\n")
    cfg.resume = True
    with pytest.raises(ConfigError, match="other model weights, tokenizer or data"):
        run_rmu(cfg, progress=False)
    weights.write_bytes(original)
    (Path(corpus) / "wikitext.jsonl").write_text(text)
    assert run_rmu(cfg, progress=False).report["resumed_from_step"] == 1


def test_resume_of_a_checkpoint_without_inputs_fingerprint_says_so(tmp_path, tiny):
    model_dir, corpus = tiny
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=4, checkpoint_every=1)
    with pytest.raises(TrainingError):
        run_rmu(cfg, progress=False, step_callback=_Interrupt(0, KeyboardInterrupt))
    state_file = tmp_path / ".out.rmu-checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    del state["inputs_fingerprint"]  # as an older wmdp_fast wrote it
    state_file.write_text(json.dumps(state))
    cfg.resume = True
    with pytest.raises(ConfigError, match="older wmdp_fast"):
        run_rmu(cfg, progress=False)


def test_resume_of_a_checkpoint_from_before_the_word_sum_fingerprint_says_so(tmp_path, tiny):
    """Checkpoints written before the weights' fingerprint became a word sum carry no
    weights_fingerprint key: where their inputs fingerprint differs (every model with a tensor
    above cache.tensor_fingerprint's full_limit) the error says so instead of blaming the
    weights or data; where it matches (small tensors are hashed whole either way) they resume."""
    model_dir, corpus = tiny
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=4, checkpoint_every=1)
    with pytest.raises(TrainingError):
        run_rmu(cfg, progress=False, step_callback=_Interrupt(0, KeyboardInterrupt))
    state_file = tmp_path / ".out.rmu-checkpoint" / "state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("weights_fingerprint") == "word-sum"
    state_file.write_text(json.dumps(dict(state, inputs_fingerprint="0" * 64)))
    cfg.resume = True
    with pytest.raises(ConfigError, match="older wmdp_fast that fingerprinted large weight"):
        run_rmu(cfg, progress=False)
    state_file.write_text(json.dumps(state))  # the old key-less form, same fingerprint
    assert run_rmu(cfg, progress=False).report["resumed_from_step"] == 1


def test_cache_key_does_not_depend_on_layer_id(tmp_path, tiny):
    """The inputs of layer min(layer_ids) do not depend on --layer_id: with the model loaded
    up to layer_id only, runs with another --layer_id still hit the disk cache."""
    model_dir, corpus = tiny
    kw = dict(max_num_batches=2, layer_ids=[1], cache_dir=str(tmp_path / "cache"))
    a = run_rmu(tiny_cfg(tmp_path / "a", model_dir, corpus, layer_id=1, **kw), progress=False)
    b = run_rmu(tiny_cfg(tmp_path / "b", model_dir, corpus, layer_id=2, **kw), progress=False)
    assert a.report["layers_loaded"] == 2 and b.report["layers_loaded"] == 3
    assert not a.report["cache"]["hit"] and b.report["cache"]["hit"]


def test_unlearning_an_earlier_output_does_not_ship_its_accuracy_plot(tmp_path, tiny):
    """A source folder that is an earlier run's output holds accuracy.png (from --eval); a new
    run without --eval must not present that old plot as its own."""
    import shutil

    model_dir, corpus = tiny
    src = tmp_path / "earlier_output"
    shutil.copytree(model_dir, src)
    (src / "accuracy.png").write_bytes(b"an earlier run's plot")
    res = run_rmu(tiny_cfg(tmp_path, src, corpus, max_num_batches=1), progress=False)
    assert not (res.output_dir / "accuracy.png").exists()
    assert (res.output_dir / "losses.png").is_file()


def test_sigterm_in_training_is_a_ctrl_c_and_leaves_a_checkpoint(tmp_path, tiny):
    """kill / a Slurm time limit (SIGTERM) mid-run: the step finishes and a checkpoint is
    written, as for Ctrl-C (SIGTERM's default action ends Python without one, and without
    removing temporary files)."""
    import os
    import signal

    class NotHandled(Exception):
        pass

    def guard(signum, frame):  # what runs if run_rmu does not handle SIGTERM itself
        raise NotHandled

    model_dir, corpus = tiny
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=4)

    def kill(step, row):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, guard)
    try:
        with pytest.raises(TrainingError, match="interrupted after 2 of 4"):
            run_rmu(cfg, progress=False, step_callback=kill)
        assert signal.getsignal(signal.SIGTERM) is guard  # restored after the run
    finally:
        signal.signal(signal.SIGTERM, previous)
    state = Path(cfg.output_dir).parent / ".out.rmu-checkpoint" / "state.json"
    assert json.loads(state.read_text())["steps_done"] == 2


def test_ctrl_c_during_a_periodic_checkpoint_writes_it_once(tmp_path, tiny, monkeypatch):
    import os
    import signal

    import wmdp_fast.rmu as rmu

    model_dir, corpus = tiny
    orig, calls = rmu._save_checkpoint, []

    def save(ckpt, step, *a, **kw):
        calls.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives while the periodic save writes
        return orig(ckpt, step, *a, **kw)

    monkeypatch.setattr(rmu, "_save_checkpoint", save)
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=5, checkpoint_every=2)
    with pytest.raises(TrainingError, match="interrupted after 2 of"):
        run_rmu(cfg, progress=False)
    assert calls == [2]


def test_failed_cache_write_warns_and_trains_on(tmp_path, tiny, monkeypatch, caplog):
    """safetensors reports a write error (full disk) as SafetensorError, not OSError."""
    from safetensors import SafetensorError

    import wmdp_fast.cache

    def full_disk(*a, **kw):
        raise SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(wmdp_fast.cache, "save_cache", full_disk)
    model_dir, corpus = tiny
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=2, cache_dir=str(tmp_path / "c"))
    with caplog.at_level("WARNING", logger="wmdp_fast"):
        res = run_rmu(cfg, progress=False)
    assert len(res.report["losses"]) == 2 and "No space left" in caplog.text


def test_cache_miss_tokenizes_each_batch_once(tmp_path, tiny, monkeypatch):
    """The batches are tokenized once: to size the cache, and the same encodings feed the
    capture (they were tokenized a second time on a cache miss); and in one tokenizer call per
    max_length (cache.tokenize_batches: all documents at once, so a Rust tokenizer uses every
    core), not one per batch."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    model_dir, corpus = tiny
    docs: dict = {}
    lengths: list = []
    orig = PreTrainedTokenizerBase.__call__

    def counting(self, text=None, *a, **kw):
        if kw.get("max_length") in (512, 768):  # the RMU batches (not the fingerprint probe)
            lengths.append(kw["max_length"])
            for t in text:
                docs[(t, kw["max_length"])] = docs.get((t, kw["max_length"]), 0) + 1
        return orig(self, text, *a, **kw)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", counting)
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=3)
    run_rmu(cfg, progress=False)
    assert lengths == [512]  # one topic: every forget and retain batch is cut at 512
    assert len(docs) == 3 * 2 * cfg.batch_size  # distinct texts here
    assert all(n == 1 for n in docs.values()), docs


def test_auto_dtype_is_the_checkpoints_on_cuda(tmp_path):
    """dtype 'auto' as the published torch_dtype="auto": the dtype config.json declares on
    CUDA (bf16 when it declares none), float32 on the CPU; explicit names win."""
    from wmdp_fast.models import checkpoint_dtype, resolve_dtype

    d = tmp_path / "ckpt"
    d.mkdir()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert checkpoint_dtype(d) is None and resolve_dtype("auto", cuda, d) == torch.bfloat16
    for key, name, want in [
        ("dtype", "float32", torch.float32),
        ("torch_dtype", "float16", torch.float16),
        ("dtype", "bfloat16", torch.bfloat16),
    ]:
        (d / "config.json").write_text(json.dumps({key: name}))
        assert checkpoint_dtype(d) == want
        assert resolve_dtype("auto", cuda, d) == want
        assert resolve_dtype(None, cuda, d) == want
        assert resolve_dtype("auto", cpu, d) == torch.float32
        assert resolve_dtype("bf16", cuda, d) == torch.bfloat16
    assert resolve_dtype("auto", cuda) == torch.bfloat16  # the evaluation engine's default


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(param_ids=["mlp.down_proj.weights"]), "--param_ids"),
        (dict(layer_id=7, layer_ids=[6, 7]), "layer"),
        (dict(control_vectors="WRONG_SHAPE"), "control"),
    ],
    ids=["param_ids", "layer_ids", "control_vectors"],
)
def test_bad_flags_fail_before_any_weights_are_read(tmp_path, tiny, monkeypatch, bad, match):
    """--param_ids, --layer_id(s) and --control-vectors are checked on a skeleton of the model
    before the weights are read (and before --eval, the cache, the retain targets)."""
    from safetensors.torch import save_file

    import wmdp_fast.models

    model_dir, corpus = tiny
    if bad.get("control_vectors") == "WRONG_SHAPE":
        save_file({"control_vectors": torch.ones(1, 7)}, str(tmp_path / "cv.safetensors"))
        bad = dict(control_vectors=str(tmp_path / "cv.safetensors"))

    def no_weights(*a, **kw):
        raise AssertionError("the weights were read before the flags were checked")

    monkeypatch.setattr(wmdp_fast.models, "load_model", no_weights)
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=2, eval_tasks=["wmdp"], **bad)
    with pytest.raises(ConfigError, match=match):
        run_rmu(cfg, progress=False)


def test_eval_reports_protocol_and_follows_quantization(tmp_path, tiny, monkeypatch):
    """--eval scores with the chosen protocol, records protocol/dtype/quantization, and loads
    the scored model with the run's 4/8-bit setting (the full model may not fit)."""
    import wmdp_fast.models

    model_dir, corpus = tiny
    seen = []
    orig = wmdp_fast.models.load_model

    def spy(*a, **kw):
        seen.append({k: kw.get(k) for k in ("load_in_4bit", "load_in_8bit", "device")})
        return orig(*a, **{**kw, "load_in_8bit": False})  # 8-bit CPU matmuls: slow, not needed

    monkeypatch.setattr(wmdp_fast.models, "load_model", spy)
    cfg = tiny_cfg(
        tmp_path,
        model_dir,
        corpus,
        max_num_batches=2,
        eval_tasks=["demo_forget"],
        eval_limit=4,
        eval_protocol="lm-eval-0.4.2",
        load_in_8bit=True,
    )
    rep = run_rmu(cfg, progress=False).report
    evals = [s for s in seen if s["device"] != "cpu"]  # the RMU load itself goes to the CPU
    assert len(evals) == 2 and all(s["load_in_8bit"] for s in evals), seen
    assert rep["eval"]["protocol"] == "lm-eval-0.4.2"
    assert rep["eval"]["quantization"] == "int8"
    assert rep["eval_before"]["demo_forget"]["n"] == 4
    assert "_meta" not in rep["eval_after"]


def test_second_ctrl_c_while_checkpointing_waits_for_it(tmp_path, tiny, monkeypatch):
    """A second Ctrl-C that arrives while the interruption checkpoint is being written does not
    abort the write (it raised an internal exception and left a traceback)."""
    import os
    import signal

    import wmdp_fast.rmu as rmu

    model_dir, corpus = tiny
    orig = rmu._save_checkpoint

    def save_with_second_ctrl_c(*a, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # handled between bytecodes, inside the save
        return orig(*a, **kw)

    monkeypatch.setattr(rmu, "_save_checkpoint", save_with_second_ctrl_c)

    def first_ctrl_c(step, row):
        if step == 0:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=4)
    with pytest.raises(TrainingError, match="interrupted after 1 of"):
        run_rmu(cfg, progress=False, step_callback=first_ctrl_c)
    monkeypatch.setattr(rmu, "_save_checkpoint", orig)
    cfg.resume = True
    assert run_rmu(cfg, progress=False).report["resumed_from_step"] == 1


def test_checkpoint_survives_a_kill_between_its_two_files(tmp_path, tiny, monkeypatch):
    """The tensors are written under a new name, then state.json is replaced: a kill between
    the two leaves the previous checkpoint whole (a fixed tensor file name made it a
    checksum mismatch, and all progress was lost)."""
    import wmdp_fast.rmu as rmu

    model_dir, corpus = tiny
    full = run_rmu(tiny_cfg(tmp_path / "a", model_dir, corpus, max_num_batches=4), progress=False)
    cfg = tiny_cfg(tmp_path / "b", model_dir, corpus, max_num_batches=4, checkpoint_every=1)
    writes = {"n": 0}
    orig = rmu.atomic_write_text

    def killed_on_second_state_json(path, text):
        if Path(path).name == "state.json":
            writes["n"] += 1
            if writes["n"] == 2:
                raise RuntimeError("killed")
        return orig(path, text)

    monkeypatch.setattr(rmu, "atomic_write_text", killed_on_second_state_json)
    with pytest.raises(RuntimeError, match="killed"):
        run_rmu(cfg, progress=False)
    monkeypatch.setattr(rmu, "atomic_write_text", orig)
    ckpt = Path(cfg.output_dir).parent / ".out.rmu-checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["steps_done"] == 1
    cfg.resume = True
    resumed = run_rmu(cfg, progress=False)
    assert resumed.report["resumed_from_step"] == 1
    for name, t in full.params.items():
        assert torch.equal(resumed.params[name], t), name


def test_unwritable_cache_dir_warns_and_trains_on(tmp_path, tiny, caplog):
    model_dir, corpus = tiny
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should go")
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=2, cache_dir=str(blocker))
    with caplog.at_level("WARNING", logger="wmdp_fast"):
        res = run_rmu(cfg, progress=False)
    assert len(res.report["losses"]) == 2 and res.report["cache"]["path"] is None
    assert "could not write the activation cache" in caplog.text


def test_published_adamw_fused_path_calls_the_op(monkeypatch):
    """PublishedAdamW hands CUDA tensors (here: the interpreted kernel, forced) to
    ops.published_adamw_step, one call per step value, and the update stays the eager one's
    (the interpreter's numpy arithmetic is not nvcc's: close, not bitwise; bitwise on CUDA is
    a GPU test in tests/test_kernels_adamw.py). On by default for CUDA tensors only; on CPU
    tensors (forced Triton) only with WMDP_FAST_FUSED_ADAMW=1."""
    from wmdp_fast import ops
    from wmdp_fast.rmu import PublishedAdamW

    monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")
    calls = []
    real = ops.published_adamw_step

    def spy(ps, gs, ms, vs, t, *a):
        calls.append((len(ps), t))
        return real(ps, gs, ms, vs, t, *a)

    monkeypatch.setattr(ops, "published_adamw_step", spy)
    monkeypatch.setenv("WMDP_FAST_FUSED_ADAMW", "1")
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(33, 17, generator=gen), torch.randn(5, generator=gen)]
    fused = [p.clone().requires_grad_(True) for p in start]
    eager = [p.clone().requires_grad_(True) for p in start]
    opt_f = PublishedAdamW(fused, lr=1e-3)
    assert opt_f.fused
    opt_e = PublishedAdamW(eager, lr=1e-3, fused=False)
    for _ in range(3):
        for p, q in zip(fused, eager):
            g = torch.randn(p.shape, generator=gen) * 1e-6
            p.grad, q.grad = g.clone(), g.clone()
        opt_f.step()
        opt_e.step()
    assert calls == [(2, 1), (2, 2), (2, 3)]
    for p, q, p0 in zip(fused, eager, start):
        assert (q.detach() - p0).abs().max() > 1e-5  # moved
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-9)
    monkeypatch.delenv("WMDP_FAST_FUSED_ADAMW")
    default = PublishedAdamW(eager, lr=1e-3)
    assert default.fused == "cuda"  # CUDA tensors only: CPU ones (even forced) stay eager
    calls.clear()
    for q in eager:
        q.grad = torch.ones_like(q) * 1e-6
    default.step()
    assert calls == []
    monkeypatch.setenv("WMDP_FAST_FUSED_ADAMW", "0")
    assert PublishedAdamW(eager, lr=1e-3).fused is False


def test_resume_continues_the_random_stream_of_dropout(tmp_path):
    """With dropout in the replayed layers, every step draws from the generator: a resumed
    run must go on with the generator's state after the checkpointed step (it restarted from
    the seeding of the control vectors, and the weights and losses after step 1 differed)."""
    model_dir = make_tiny_model(
        tmp_path / "model", arch="mistral", num_hidden_layers=3, attention_dropout=0.5
    )
    corpus = write_corpora(tmp_path / "corpora")
    full = run_rmu(tiny_cfg(tmp_path / "a", model_dir, corpus, max_num_batches=3), progress=False)
    assert "dropout" in full.report["first_layer_cache"]["reason"]
    cfg = tiny_cfg(tmp_path / "b", model_dir, corpus, max_num_batches=3)
    with pytest.raises(TrainingError, match="interrupted after 1 of 3"):
        run_rmu(cfg, progress=False, step_callback=_Interrupt(0, KeyboardInterrupt))
    cfg.resume = True
    resumed = run_rmu(cfg, progress=False)
    assert resumed.report["resumed_from_step"] == 1
    assert resumed.report["losses"] == full.report["losses"]
    for name, t in full.params.items():
        assert torch.equal(resumed.params[name], t), name


@pytest.mark.parametrize("output_dir", [".", "..", "./"])
def test_output_dir_cannot_be_the_working_directory(tmp_path, tiny, monkeypatch, output_dir):
    """The output is renamed into place as a whole: '.' failed with an OSError traceback after
    the whole training (nothing saved), '..' with --overwrite would replace the folder the run
    works in. Both are refused before any work, naming the flag."""
    model_dir, corpus = tiny
    work = tmp_path / "parent" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    cfg = tiny_cfg(tmp_path, model_dir, corpus, max_num_batches=2, output_dir=output_dir)
    cfg.overwrite = True
    with pytest.raises(ConfigError, match="--output_dir .* current directory"):
        run_rmu(cfg, progress=False)
    assert list(work.parent.iterdir()) == [work] and not list(work.iterdir())


def test_ctrl_c_while_saving_the_model_keeps_the_finished_steps(tmp_path, tiny, monkeypatch):
    """Ctrl-C while the model is being written (a 14.5 GB shard for Zephyr-7B) lost every
    step ('interrupted', no checkpoint). Now it writes the checkpoint of the finished training,
    and --resume only saves: the same weights and losses as an uninterrupted run."""
    import wmdp_fast.models as models

    model_dir, corpus = tiny
    full = run_rmu(tiny_cfg(tmp_path / "a", model_dir, corpus, max_num_batches=3), progress=False)
    orig = models.save_updated_checkpoint

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "save_updated_checkpoint", interrupted)
    cfg = tiny_cfg(tmp_path / "b", model_dir, corpus, max_num_batches=3)
    try:
        run_rmu(cfg, progress=False)
    except KeyboardInterrupt:  # caught here: escaping, it would end the pytest session
        pytest.fail("the Ctrl-C while saving escaped, without a checkpoint")
    except TrainingError as exc:
        assert "while saving" in str(exc) and "--resume" in str(exc)
    else:
        pytest.fail("the interrupted save raised nothing")
    out = Path(cfg.output_dir)
    assert [p.name for p in out.parent.iterdir()] == [".out.rmu-checkpoint"]
    state = json.loads((out.parent / ".out.rmu-checkpoint" / "state.json").read_text())
    assert state["steps_done"] == 3
    monkeypatch.setattr(models, "save_updated_checkpoint", orig)
    cfg.resume = True
    resumed = run_rmu(cfg, progress=False)
    assert resumed.report["resumed_from_step"] == 3
    assert resumed.report["losses"] == full.report["losses"]
    for name, t in full.params.items():
        assert torch.equal(resumed.params[name], t), name
    assert torch.equal(load_file(str(out / "model.safetensors"))[name], t)


def _sharded_copy(model_dir: Path, dest: Path) -> Path:
    """The tiny checkpoint re-saved in several shards (like the hub's 7B checkpoints), with its
    tokenizer files."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.save_pretrained(str(dest), max_shard_size="200KB")
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(f, dest / f.name)
    return dest


def test_untouched_shards_are_copied_while_training(tmp_path, tiny):
    """The output's untouched shards are copied into the temporary output folder by a
    background thread during the run (the save then only patches the trained shards); the
    saved checkpoint is the original with only the trained tensors' bytes changed."""
    from wmdp_fast.models import _weight_map

    model_dir, corpus = tiny
    src = _sharded_copy(model_dir, tmp_path / "sharded")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    cfg = tiny_cfg(tmp_path, src, corpus, max_num_batches=3)
    seen: list[set[str]] = []

    def look(step, row):  # what the temporary output folder holds at each step
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        assert len(tmps) == 1
        seen.append({p.name for p in tmps[0].iterdir()})

    res = run_rmu(cfg, progress=False, step_callback=look)
    wmap = _weight_map(src)
    trained = {wmap[n] for n in res.params}
    untouched = set(shards) - trained
    assert len(shards) > 2 and trained and untouched
    assert untouched <= seen[-1] and not trained & seen[-1]  # copied before the save
    for name in shards:  # the output: same files; untouched ones byte-identical
        same = (res.output_dir / name).read_bytes() == (src / name).read_bytes()
        assert same == (name in untouched), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]


def test_an_interrupted_or_failed_run_leaves_no_temporary_output(tmp_path, tiny, monkeypatch):
    """The background copy's folder is removed when the run stops early (Ctrl-C, an error),
    and a failed copy is one clear error at the save, with nothing left behind."""
    import wmdp_fast.models as models

    model_dir, corpus = tiny
    src = _sharded_copy(model_dir, tmp_path / "sharded")
    cfg = tiny_cfg(tmp_path, src, corpus, max_num_batches=3)
    with pytest.raises(TrainingError, match="interrupted after 2 of 3"):
        run_rmu(cfg, progress=False, step_callback=_Interrupt(1, KeyboardInterrupt))
    with pytest.raises(RuntimeError, match="simulated"):
        run_rmu(cfg, progress=False, step_callback=_Interrupt(0, RuntimeError))

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "copy_untouched_files", full_disk)
    cfg.checkpoint_every = 0
    with pytest.raises(ModelError, match="could not copy the checkpoint's files.*No space left"):
        run_rmu(cfg, progress=False)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert not Path(cfg.output_dir).exists()


def test_ctrl_c_while_waiting_for_the_background_copy_keeps_the_finished_steps(
    tmp_path, tiny, monkeypatch
):
    """The save first waits for the background copy of the untouched shards (seconds for a
    7B model); a Ctrl-C there writes the checkpoint of all steps too, and leaves no folder."""
    import wmdp_fast.rmu as rmu

    model_dir, corpus = tiny
    src = _sharded_copy(model_dir, tmp_path / "sharded")

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(rmu._OutputPrefetch, "finish", interrupted)
    cfg = tiny_cfg(tmp_path, src, corpus, max_num_batches=2)
    try:
        run_rmu(cfg, progress=False)
    except KeyboardInterrupt:  # caught here: escaping, it would end the pytest session
        pytest.fail("the Ctrl-C while waiting for the copy escaped, without a checkpoint")
    except TrainingError as exc:
        assert "while saving" in str(exc)
    state = json.loads((tmp_path / ".out.rmu-checkpoint" / "state.json").read_text())
    assert state["steps_done"] == 2
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
