"""The GPU benchmark scripts (benchmarks/gpu_check.sh runs them in one short device call): the
paths a CPU can reach, with the GPU conditions emulated where possible."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_eval  # noqa: E402
import bench_rmu  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--warmup", "0"]


def _small_rmu():
    from wmdp_fast.rmu import RMUConfig, draw_control_vectors

    cfg = RMUConfig(model_name_or_path="random", layer_id=4, layer_ids=[2, 3, 4], param_ids=[6])
    dev = torch.device("cpu")
    model = bench_rmu.build_model("small", dev, torch.float32)
    cvs = draw_control_vectors(cfg.steering_coeffs, 256, cfg.seed, dev, torch.float32)
    enc, f_names, r_names = bench_rmu.make_batches(2, len(cvs), 2, 16)
    return cfg, dev, model, cvs, enc, f_names, r_names


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_published_loop_leaves_no_gradients():
    """The published model requires grad everywhere: every tensor of layers 0..layer_id and the
    embeddings gets a .grad no optimizer frees (~3.7 GB on Zephyr-7B), which used to stay in
    the engine rows' peak GPU memory."""
    cfg, dev, model, cvs, enc, f_names, r_names = _small_rmu()
    bench_rmu.published_loop(model, cfg, enc, f_names, r_names, cvs, dev, 2)
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []


def test_fused_layers_row_that_fuses_nothing_fails(monkeypatch):
    """A '--fused-layers on' row whose layers were not recognised would time eager code."""
    import wmdp_fast.fused_layers as fl

    cfg, dev, model, cvs, enc, f_names, r_names = _small_rmu()
    monkeypatch.setattr(fl, "fuse_decoder_layers", lambda layers: [])
    with pytest.raises(RuntimeError, match="no RMSNorm or SwiGLU"):
        bench_rmu.engine_loop(
            model, cfg, enc, f_names, r_names, cvs, dev, 2, dev, fused_layers=True
        )


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_failing_ab_row_keeps_the_table(monkeypatch, capsys):
    """An A/B row (an opt-in path never run on a GPU) that raises prints an ERROR row; the
    published and default rows and the speed-up are still reported."""
    real = bench_rmu.engine_loop

    def engine_loop(*args, **kw):
        if kw.get("split") is False:
            raise RuntimeError("kernel failed\non purpose")
        return real(*args, **kw)

    monkeypatch.setattr(bench_rmu, "engine_loop", engine_loop)
    res = bench_rmu.main(SMALL)
    out = capsys.readouterr().out
    assert "| published loop |" in out and "| wmdp_fast engine |" in out
    assert (
        "| engine, --first-layer-cache off (plain replay) | ERROR RuntimeError: kernel failed on purpose |"
        in out
    )
    assert "speedup per step:" in out
    assert res["ab_s_per_step"] == {}
    assert res["speedup"] > 0


def test_end_to_end_removes_its_workdir(monkeypatch, tmp_path):
    """The ~35 GB end-to-end run leaves nothing under --workdir, also when it fails."""

    def fail(root, *args):
        (root / "model").mkdir()
        (root / "model" / "shard.safetensors").write_bytes(b"x" * 100)
        raise RuntimeError("stopped")

    monkeypatch.setattr(bench_rmu, "_end_to_end", fail)

    class Args:
        workdir = str(tmp_path)

    with pytest.raises(RuntimeError, match="stopped"):
        bench_rmu.end_to_end("small", None, Args, torch.device("cpu"), torch.float32)
    assert list(tmp_path.iterdir()) == []


def test_bench_tokenizer_without_mistral_common_or_sentencepiece(monkeypatch, tmp_path):
    """The GPU image: no mistral_common, maybe no sentencepiece. Rebuilding the tokenizer from
    tokenizer.model then falls back to a tiktoken parser (ValueError); the saved copy's
    tokenizer.json gives the same encodings."""
    pytest.importorskip("mistral_common")
    import transformers.utils.import_utils as iu

    from wmdp_fast.testing import save_mistral_tokenizer

    want = save_mistral_tokenizer(tmp_path / "tok")
    texts = [d["question"] for d in bench_eval.make_docs(20, 0)] + [" A", "héllo\tworld"]
    monkeypatch.setenv("WMDP_FAST_MISTRAL_TOKENIZER", str(tmp_path / "tok" / "tokenizer.model"))
    monkeypatch.delenv("WMDP_FAST_TOKENIZER_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "mistral_common", None)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    for k in ("sentencepiece", "protobuf"):
        monkeypatch.setitem(iu.BACKENDS_MAPPING, k, (lambda: False, iu.BACKENDS_MAPPING[k][1]))
    got = bench_eval.load_bench_tokenizer(None)
    assert got(texts)["input_ids"] == want(texts)["input_ids"]
    assert got("x")["input_ids"][0] == 1  # BOS, as Zephyr's config has it


def test_adamw_eager_row_is_eager_whatever_the_environment(monkeypatch):
    """With WMDP_FAST_FUSED_ADAMW=1 exported, the 'eager' row used to be the fused step itself
    (and 'bitwise equal to eager' trivially YES)."""
    import bench_adamw

    monkeypatch.setenv("WMDP_FAST_FUSED_ADAMW", "1")
    p = [torch.randn(4, 8)]
    assert bench_adamw.Eager(p, [torch.randn(4, 8)]).opt.fused is False


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_rmu_no_ab_runs_the_defaults_only(capsys):
    res = bench_rmu.main([*SMALL, "--no-ab"])
    out = capsys.readouterr().out
    assert "| wmdp_fast engine |" in out and "plain replay" not in out
    assert res["ab_s_per_step"] == {} and res["loss_max_rel_diff"] < 1e-5


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:Using a target size")
def test_rmu_bench_cuda_small(capsys):
    """bench_rmu's CUDA path at a toy size, before gpu_check.sh's bench-rmu step spends its
    minutes on Zephyr-7B: every A/B row runs (no ERROR row), the prefix leaves the GPU after the
    capture as in run_rmu, and the engine's peak stays below the published loop's."""
    import importlib.util

    argv = ["--device", "cuda", "--arch", "small", "--steps", "4", "--seq-len", "64"]
    if importlib.util.find_spec("bitsandbytes") is None:
        argv.append("--no-4bit")
    res = bench_rmu.main(argv)
    out = capsys.readouterr().out
    assert "ERROR" not in out, out
    assert len(res["ab_s_per_step"]) == (4 if "--no-4bit" in argv else 5)
    assert 0 < res["engine_peak_bytes"] < res["published_peak_bytes"]
    assert res["loss_max_rel_diff"] < 0.05


@pytest.mark.filterwarnings("ignore:Using a target size")
def test_published_loop_optimizer_is_eager_whatever_the_environment(monkeypatch):
    made = []

    class Spy(bench_rmu.PublishedAdamW):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

    monkeypatch.setenv("WMDP_FAST_FUSED_ADAMW", "1")
    monkeypatch.setattr(bench_rmu, "PublishedAdamW", Spy)
    cfg, dev, model, cvs, enc, f_names, r_names = _small_rmu()
    bench_rmu.published_loop(model, cfg, enc, f_names, r_names, cvs, dev, 1)
    assert [o.fused for o in made] == [False]


def test_eval_fused_ab_failure_keeps_the_main_comparison(monkeypatch, capsys, tmp_path):
    """bench_eval printed its whole report at the very end, after the fused-layers A/B: a
    failure there (its kernels had never run inside the engine on a GPU) or the step's time
    limit lost the eager and lm-eval numbers too. The main report now comes first and a failing
    A/B becomes one error row."""
    import wmdp_fast.evaluate as ev

    real = ev.evaluate

    def evaluate(*a, fused_layers=False, **kw):
        if fused_layers:
            raise RuntimeError("triton compile failed (emulated)")
        return real(*a, **kw)

    monkeypatch.setattr(ev, "evaluate", evaluate)
    out_json = tmp_path / "r.json"
    rc = bench_eval.main(["--n", "6", "--skip-lm-eval", "--fused-ab", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.index("wmdp_fast_s:") < out.index("fused_layers_error: RuntimeError: triton")
    import json

    saved = json.loads(out_json.read_text())
    assert saved["questions"] == 6 and saved["fused_layers_error"].startswith("RuntimeError")


@pytest.mark.slow
def test_profile_eval_runs(tmp_path):
    """benchmarks/profile_eval.py (gpu_check.sh's profile-eval step) on the CPU with the tiny
    model: every phase runs, the engine scores every real token, and the engine's batch plan
    never pads more than the old fill-to-budget rule."""
    import json

    import profile_eval

    out = tmp_path / "p.json"
    argv = ["--n", "8", "--budgets", "512", "--no-lm-eval-tok", "--json", str(out)]
    assert profile_eval.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["engine"]["real_tokens"] == r["real_tokens"] > 0
    assert r["padding_table"]
    for v in r["padding_table"].values():
        assert v["plan"]["padding_pct"] <= v["fill"]["padding_pct"]
