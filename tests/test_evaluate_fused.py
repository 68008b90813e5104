"""evaluate(..., fused_layers=True): the model's RMSNorms and SwiGLU MLPs run the fused
kernels (forced through the interpreter here) for the call only, with the same scores."""

from __future__ import annotations

import pytest
import torch
from test_evaluate import _docs

from wmdp_fast.data import MCQTask
from wmdp_fast.evaluate import evaluate
from wmdp_fast.fused_layers import fuse_decoder_layers, fused_modules
from wmdp_fast.testing import save_mistral_tokenizer, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return save_mistral_tokenizer(tmp_path_factory.mktemp("tok"))


def _model(arch="mistral"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(arch, num_hidden_layers=2)
    cfg.initializer_range = 0.5
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def test_fused_layers_score_like_eager_and_are_restored(tok, monkeypatch):
    model = _model()
    task = MCQTask("t", "biology", "test", _docs(6))
    eager = evaluate(model, tok, [task], log_samples=True, progress=False)
    monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")
    import wmdp_fast.fused_layers as fl

    seen = []
    real = fl.fuse_decoder_layers
    monkeypatch.setattr(fl, "fuse_decoder_layers", lambda m: seen.extend(real(m)) or seen)
    fused = evaluate(model, tok, [task], log_samples=True, progress=False, fused_layers=True)
    # 2 layers x (2 norms + MLP) + the final norm
    assert len(seen) == 7 and "model.norm" in seen
    assert fused_modules(model) == []  # restored after the call
    assert fused["fused_layers"] is True and "fused_layers" not in eager
    for a, b in zip(fused["samples"], eager["samples"]):
        assert a["pred"] == b["pred"]
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], rel=1e-5, abs=1e-5)


def test_modules_the_caller_fused_stay_fused(tok):
    model = _model()
    mine = fuse_decoder_layers(model.model.layers[0])
    assert mine
    evaluate(
        model, tok, [MCQTask("t", "biology", "test", _docs(2))], progress=False, fused_layers=True
    )
    assert sorted(fused_modules(model)) == sorted(f"model.layers.0.{n}" for n in mine)


def test_a_patch_failing_halfway_leaves_nothing_fused(tok, monkeypatch):
    import wmdp_fast.fused_layers as fl

    real, calls = fl._patch, []

    def flaky(module, fn):
        calls.append(module)
        if len(calls) == 3:
            raise RuntimeError("simulated failure while patching")
        return real(module, fn)

    monkeypatch.setattr(fl, "_patch", flaky)
    model = _model()
    with pytest.raises(RuntimeError, match="simulated"):
        evaluate(
            model,
            tok,
            [MCQTask("t", "biology", "test", _docs(2))],
            progress=False,
            fused_layers=True,
        )
    assert len(calls) == 3 and fused_modules(model) == []
