"""The Python examples in docs/*.md (and README's not covered by test_readme.py) run as printed
on the CPU and compute what their text says, so that an example that rots fails here.

Examples that name a GPU or a hub model run with exactly those names replaced (a CPU tensor, a
tiny local model); each replacement must match, so a changed example fails instead of silently
running something else."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wmdp_fast import ops

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
README, FUSED_OPS = ROOT / "README.md", ROOT / "docs" / "fused_ops.md"
DEMO, UNLEARN = ROOT / "docs" / "demo.md", ROOT / "docs" / "unlearn.md"


def _block(path: Path, marker: str) -> str:
    """The one ```python block of `path` that contains `marker`."""
    found = [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), re.S) if marker in b]
    assert len(found) == 1, f"{path.name}: {len(found)} python blocks contain {marker!r}"
    return found[0]


def _run(code: str, path: Path, ns: dict) -> dict:
    exec(compile(code, str(path), "exec"), ns)
    return ns


def _replace(code: str, old: str, new: str) -> str:
    assert code.count(old) == 1, f"the example no longer contains {old!r} once"
    return code.replace(old, new)


@pytest.fixture(autouse=True)
def _no_forced_triton(monkeypatch):
    # CPU tensors run the reference twins (what the examples' text describes)
    monkeypatch.delenv("WMDP_FAST_FORCE_TRITON", raising=False)


# ------------------------------------------------------------------ the two mse_loss calls


@pytest.mark.parametrize(
    "path,published,fused",
    [
        (FUSED_OPS, "retain_loss *= alpha[k]", "loss, unlearn_loss, retain_loss = ops.rmu_loss("),
        (README, "unlearn_loss = F.mse_loss(", "loss, unlearn_loss, retain_loss = ops.rmu_loss("),
    ],
    ids=["fused_ops.md", "README"],
)
@pytest.mark.filterwarnings("ignore:Using a target size")  # the published call broadcasts c*u
def test_fused_rmu_loss_equals_the_published_two_mse_calls(path, published, fused):
    torch.manual_seed(1)
    B, T, D, k = 2, 5, 16, 1
    inputs = dict(
        updated_forget_activations=torch.randn(B, T, D),
        control_vectors_list=[torch.rand(1, 1, D) * 3 for _ in range(2)],
        updated_retain_activations=torch.randn(B, T, D),
        frozen_retain_activations=torch.randn(B, T, D),
        alpha=[1200.0, 300.0],
        k=k,
    )

    def namespace():
        ns = {n: v.clone() if torch.is_tensor(v) else v for n, v in inputs.items()}
        for n in ("updated_forget_activations", "updated_retain_activations"):
            ns[n].requires_grad_(True)
        return ns | {"F": F, "ops": ops, "torch": torch}

    want = _run(_block(path, published), path, namespace())
    want["loss"].backward()
    got = _run(_block(path, fused), path, namespace())
    if got["loss"].grad_fn is not None and got["updated_forget_activations"].grad is None:
        got["loss"].backward()  # README's fused block leaves the backward to the reader
    for name in ("loss", "unlearn_loss", "retain_loss"):
        torch.testing.assert_close(got[name], want[name].detach(), rtol=1e-6, atol=0)
    assert not got["unlearn_loss"].requires_grad and not got["retain_loss"].requires_grad
    plain = F.mse_loss(inputs["updated_retain_activations"], inputs["frozen_retain_activations"])
    torch.testing.assert_close(got["retain_loss"], 300.0 * plain, rtol=1e-6, atol=0)  # alpha[k]
    for n in ("updated_forget_activations", "updated_retain_activations"):
        torch.testing.assert_close(got[n].grad, want[n].grad, rtol=1e-6, atol=1e-9)


def test_fused_ops_packed_targets_example():
    path = FUSED_OPS
    code = _block(path, 'ops.pack_activations(frozen_layer_output, "int8")')
    torch.manual_seed(2)
    B, T, D, alpha = 2, 6, 32, 50.0
    frozen = torch.randn(B, T, D) * 4
    h_retain = (frozen + 0.1 * torch.randn(B, T, D)).requires_grad_(True)
    ns = _run(
        code,
        path,
        dict(
            ops=ops,
            frozen_layer_output=frozen,
            h_forget=torch.randn(B, T, D, requires_grad=True),
            control_vec=torch.rand(1, 1, D),
            h_retain=h_retain,
            alpha=alpha,
        ),
    )
    packed = ns["packed"]
    assert isinstance(packed, ops.PackedActivations) and packed.fmt == "int8"
    assert packed.data.dtype == torch.int8 and packed.nbytes == B * T * (D + 4)
    target = ops.unpack_activations(packed)
    assert target.dtype == torch.float32 and not torch.equal(target, frozen)  # int8 rounding
    want = F.mse_loss(h_retain.detach(), target) * alpha
    torch.testing.assert_close(ns["lr"], want, rtol=1e-6, atol=0)
    torch.testing.assert_close(ns["loss"], ns["lf"] + ns["lr"], rtol=1e-6, atol=0)
    # the documented bound against the loss with the exact (unquantised) target
    exact = F.mse_loss(h_retain.detach(), frozen) * alpha
    E = ((frozen.abs().amax(-1) / 254) ** 2).mean()
    assert abs(ns["lr"] - exact) <= alpha * (2 * torch.sqrt(exact / alpha * E) + E)


# ------------------------------------------------------------------ the runnable RMU examples


def _printed_steps(out: str) -> list[tuple[float, float, float]]:
    rows = re.findall(r"step \d+: loss ([0-9.]+) = forget ([0-9.]+) \+ retain ([0-9.]+)", out)
    return [tuple(map(float, r)) for r in rows]


@pytest.mark.parametrize("path", [FUSED_OPS, README], ids=["fused_ops.md", "README"])
def test_runnable_rmu_example_prints_a_plain_loops_losses(path, capsys):
    """The example's printed losses are those of the same loop written with plain torch
    (F.mse_loss on the unpacked int8 cache, the mask as a boolean index)."""
    code = _block(path, "torch.manual_seed(0)")
    _run(code, path, {})
    out = capsys.readouterr().out
    printed = _printed_steps(out)
    assert len(printed) == 3

    ns = _run(code.split("for step in range")[0], path, {})  # same seed: same model and data
    setup_out = capsys.readouterr().out
    if "cache:" in out:  # fused_ops.md prints the cache's size: int8 + one float32 per position
        positions = ns["x_retain"].numel() // ns["D"]
        assert setup_out == out.splitlines()[0] + "\n"
        assert f"cache: {positions * (ns['D'] + 4)} bytes" in setup_out
        assert f"(bf16 would be {positions * ns['D'] * 2})" in setup_out
    layer, opt, mask = ns["layer"], ns["opt"], ns.get("retain_mask")
    target = ops.unpack_activations(ns["cached"])
    for step in range(3):
        h_r = layer(ns["x_retain"])
        h_f = layer(ns["x_forget"])
        forget = F.mse_loss(h_f, ns["control_vec"].expand_as(h_f))
        diff2 = (h_r - target) ** 2
        retain = (diff2[mask] if mask is not None else diff2).mean() * 1200.0
        loss = forget + retain
        opt.zero_grad()
        loss.backward()
        opt.step()
        got_loss, got_forget, got_retain = printed[step]
        assert abs(got_loss - loss.item()) <= 1e-4, step  # printed with 4 decimals
        assert abs(got_forget - forget.item()) <= 1e-4, step
        assert abs(got_retain - retain.item()) <= 1e-6, step  # 6 decimals
        assert retain.item() > 1e-3  # int8 rounding x alpha, as README's comment says
    assert printed[2][0] < printed[0][0]


# ------------------------------------------------------------------ optimizer step, patching


def test_fused_ops_adamw_example_is_the_published_step():
    """docs/fused_ops.md's published_adamw_step example, on the CPU at a small shape: bitwise
    PublishedAdamW.step (the doc: on the CPU the op runs the eager sequence itself)."""
    from wmdp_fast.rmu import PublishedAdamW

    path = FUSED_OPS
    code = _block(path, "ops.published_adamw_step(")
    code = _replace(code, 'device="cuda"', 'device="cpu"')
    code = _replace(code, "torch.randn(4096, 14336,", "torch.randn(64, 97,")
    torch.manual_seed(3)
    ns = _run(code, path, {})
    assert ns["t"] == 3

    torch.manual_seed(3)
    p0 = torch.randn(64, 97, dtype=torch.bfloat16)
    g = torch.randn_like(p0) * 1e-4
    p = p0.clone().requires_grad_(True)
    opt = PublishedAdamW([p], lr=5e-5, betas=(0.9, 0.999), eps=1e-6, fused=False)
    for _ in range(3):
        p.grad = g.clone()
        opt.step()
    state = opt.state[p]
    assert torch.equal(ns["p"], p.detach()) and not torch.equal(ns["p"], p0)
    assert torch.equal(ns["m"], state["exp_avg"]) and torch.equal(ns["v"], state["exp_avg_sq"])


def test_fused_ops_patching_example_patches_and_restores():
    from transformers import AutoModelForCausalLM, MistralConfig

    from wmdp_fast.fused_layers import fused_modules

    path = FUSED_OPS
    code = _block(path, "names = fuse_decoder_layers(model.model.layers)")
    before, sep, after = code.partition("\n...")
    assert sep, "the example no longer has its '...' line"
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(
        MistralConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    ids = torch.tensor([[1, 30, 65, 7]])
    eager = model(input_ids=ids).logits
    ns = _run(before, path, {"model": model})
    expected = sorted(
        f"{i}.{m}" for i in (0, 1) for m in ("input_layernorm", "post_attention_layernorm", "mlp")
    )
    assert sorted(ns["names"]) == expected
    assert sorted(fused_modules(model.model.layers)) == expected
    logits = model(input_ids=ids).logits  # "forward/backward as usual"
    logits.sum().backward()
    assert torch.equal(logits, eager)  # CPU tensors: the patched modules run the original math
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
    _run(after, path, ns)
    assert fused_modules(model.model.layers) == []
    assert torch.equal(model(input_ids=ids).logits, eager)


# ------------------------------------------------------------------ demo.md, unlearn.md


def test_demo_python_api_example_scores_the_demo_model():
    ns = _run(_block(DEMO, "demo.demo_model_dir()"), DEMO, {})
    res = ns["res"]["results"]
    assert sorted(res) == ["demo_forget", "demo_retain"]
    # docs/demo.md: both sets score 100% before RMU, 48 questions each
    assert all(res[t]["n"] == 48 and res[t]["acc"] == 1.0 for t in res)
    assert set(ns["demo"].DEMO_TASK_FILES) == set(res)


def test_unlearn_python_api_example_runs_rmu(tmp_path, capsys):
    """docs/unlearn.md's run_rmu example with the hub model and the corpus folder replaced by a
    tiny local 8-layer model (the published layers 5..7) and short local corpora."""
    from wmdp_fast.testing import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "zephyr-tiny", num_hidden_layers=8)
    corpus = tmp_path / "data"
    corpus.mkdir()
    for i, name in enumerate(["bio-forget-corpus", "cyber-forget-corpus", "wikitext"]):
        lines = [
            json.dumps({"text": f"document {j} of corpus {i}: " + "word " * j}) for j in range(8)
        ]
        (corpus / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    code = _block(UNLEARN, "run_rmu(cfg)")
    code = _replace(code, '"HuggingFaceH4/zephyr-7b-beta"', repr(str(model_dir)))
    code = _replace(code, 'corpus_dir="data"', f"corpus_dir={str(corpus)!r}")
    code = _replace(code, '"models/zephyr_rmu"', repr(str(tmp_path / "out")))
    ns = _run(code, UNLEARN, {})
    result = ns["result"]
    assert Path(result.output_dir) == tmp_path / "out"
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "rmu_report.json").read_text())["num_batches"] == 2
    losses = result.report["losses"]
    assert [r["step"] for r in losses] == [0, 1]  # 8 documents / batch 4, topics interleaved
    assert losses[0]["retain_loss"] == 0.0  # the trained layers start at the frozen ones
    assert str(losses[-1]) in capsys.readouterr().out
    assert sorted(result.params) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (5, 6, 7)]


# ------------------------------------------------------------------ truncated replay


def test_truncated_replay_example_equals_the_hooked_full_forward(tmp_path):
    """fused_ops.md's capture + replay block: layer `last`'s output from layers first..last on
    the captured inputs is bitwise the full model's (a hook on layer `last`), float32 CPU."""
    from wmdp_fast.testing import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "zephyr-tiny", num_hidden_layers=10)
    code = _block(FUSED_OPS, "h = replay(layers, batch.hidden, batch.kwargs)")
    code = _replace(code, '"HuggingFaceH4/zephyr-7b-beta"', repr(str(model_dir)))
    code = _replace(code, 'dtype="bfloat16", device="cuda"', 'dtype="float32", device="cpu"')
    code = _replace(code, 'device=torch.device("cuda")', 'device=torch.device("cpu")')
    code = _replace(code, 'cached[0].to("cuda", torch.bfloat16)', 'cached[0].to("cpu")')
    ns = _run(code, FUSED_OPS, {})
    model, tok, texts, h = ns["model"], ns["tok"], ns["texts"], ns["h"]
    assert len(model.model.layers) == 8  # num_layers=last + 1: layers 0..7 of 10 only
    seen = {}
    handle = model.model.layers[7].register_forward_hook(
        lambda m, a, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            model(**tok(texts, return_tensors="pt", padding=True), use_cache=False)
    finally:
        handle.remove()
    assert h.shape == seen["h"].shape and h.shape[0] == 2
    assert torch.equal(h, seen["h"])
    assert not torch.equal(h, ns["batch"].hidden)  # the three layers did something
