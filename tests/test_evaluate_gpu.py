"""The engine on CUDA: same numbers as on the CPU (float32), sane in bf16. Skipped without a GPU."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from wmdp_fast.data import MCQTask
from wmdp_fast.evaluate import evaluate
from wmdp_fast.testing import make_tiny_model, save_mistral_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _docs(n=40, seed=0):
    rng = random.Random(seed)
    words = "virus gene exploit buffer kernel toxin reagent the a of which".split()
    return [
        {
            "question": " ".join(rng.choice(words) for _ in range(rng.randint(5, 120))) + "?",
            "choices": [
                " ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(4)
            ],
            "answer": rng.randint(0, 3),
        }
        for _ in range(n)
    ]


def _model_with_tokenizer(path: Path) -> Path:
    """Tiny Mistral + the real tokenizer: from mistral_common, else the copy saved in .gpu/tok
    (GPU boxes lack mistral_common)."""
    make_tiny_model(path, arch="mistral", sliding_window=64, with_tokenizer=False)
    try:
        save_mistral_tokenizer(path)
    except ImportError:
        saved = Path(__file__).resolve().parent.parent / ".gpu" / "tok"
        if not (saved / "tokenizer_config.json").is_file():
            pytest.skip("no Mistral tokenizer: needs mistral_common or .gpu/tok")
        for f in saved.iterdir():
            shutil.copyfile(f, path / f.name)
    return path


def test_cuda_matches_cpu(tmp_path):
    from wmdp_fast.models import load_model, load_tokenizer

    path = _model_with_tokenizer(tmp_path / "m")
    tok = load_tokenizer(str(path))
    task = MCQTask("t", "biology", "synthetic", _docs())
    cpu = evaluate(
        load_model(str(path), "float32", "cpu"), tok, [task], log_samples=True, progress=False
    )
    gpu_model = load_model(str(path), "float32", "cuda")
    gpu = evaluate(gpu_model, tok, [task], log_samples=True, progress=False)
    gpu1 = evaluate(gpu_model, tok, [task], batch_tokens=1, log_samples=True, progress=False)
    for a, b, c in zip(cpu["samples"], gpu["samples"], gpu1["samples"]):
        for x, y, z in zip(a["loglikelihoods"], b["loglikelihoods"], c["loglikelihoods"]):
            assert abs(x - y) <= 1e-3 and abs(y - z) <= 1e-3
    same = sum(a["pred"] == b["pred"] for a, b in zip(cpu["samples"], gpu["samples"]))
    assert same >= len(task.docs) - 1
    bf16 = evaluate(
        load_model(str(path), "bf16", "cuda"), tok, [task], log_samples=True, progress=False
    )
    agree = sum(a["pred"] == b["pred"] for a, b in zip(cpu["samples"], bf16["samples"]))
    assert agree >= 0.75 * len(task.docs)


def test_cuda_nan_logits_are_a_model_error_naming_the_docs(tmp_path, monkeypatch):
    """float16 on CUDA: NaN logits for one question reach the CUDA gather_logprobs, whose
    refusal becomes a ModelError naming task and doc_id (NOT yet run on a GPU when written)."""
    from wmdp_fast import evaluate as ev
    from wmdp_fast.errors import ModelError
    from wmdp_fast.models import load_model, load_tokenizer

    path = _model_with_tokenizer(tmp_path / "m")
    tok = load_tokenizer(str(path))
    docs = _docs(6, seed=3)
    docs[4] = {**docs[4], "question": "zebra " * 150 + "?"}  # the longest: never the checked one
    task = MCQTask("t", "biology", "synthetic", docs)
    model = load_model(str(path), "fp16", "cuda", progress=False)
    marker = tok(" zebra", add_special_tokens=False)["input_ids"][-1]
    real = ev._Scorer.logits_at

    def overflowing(self, ids, flat_rows):
        logits = real(self, ids, flat_rows).clone()
        hit = (ids == marker).any(dim=1)
        logits[hit[flat_rows // ids.shape[1]]] = float("nan")
        return logits

    monkeypatch.setattr(ev._Scorer, "logits_at", overflowing)
    with pytest.raises(ModelError, match=r"^task t, doc_id 4: .*--dtype bfloat16"):
        evaluate(model, tok, [task], progress=False)
    monkeypatch.setattr(ev._Scorer, "logits_at", real)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ModelError, match=r"^task t, doc_id \d+: .*NaN or inf logits"):
        evaluate(model, tok, [task], progress=False)


def test_cuda_fused_layers_run_the_kernels_and_score_like_eager(tmp_path, monkeypatch):
    """evaluate(fused_layers=True) on CUDA in bf16, as bench_eval's A/B runs it: the compiled
    Triton RMSNorm/SwiGLU kernels run inside the engine (inference mode, padded token-budget
    batches, the split-path check), the predictions and log-likelihoods stay as close to the
    eager bf16 run as that run is to float32, and the model is unpatched afterwards."""
    from wmdp_fast import kernels, ops
    from wmdp_fast.fused_layers import fused_modules
    from wmdp_fast.models import load_model, load_tokenizer

    assert ops.backend_of("rms_norm", "cuda") == "triton"
    path = _model_with_tokenizer(tmp_path / "m")
    tok = load_tokenizer(str(path))
    task = MCQTask("t", "biology", "synthetic", _docs())
    model = load_model(str(path), "bf16", "cuda", progress=False)
    eager = evaluate(model, tok, [task], log_samples=True, progress=False)
    f32 = evaluate(
        load_model(str(path), "float32", "cuda", progress=False),
        tok,
        [task],
        log_samples=True,
        progress=False,
    )
    calls = {"rms_norm": 0, "swiglu": 0}
    for module, fn in (("rmsnorm", "rms_norm"), ("swiglu", "swiglu")):
        real = getattr(kernels.load(module), fn)

        def spy(*args, _real=real, _fn=fn):
            assert args[0].is_cuda and args[0].dtype == torch.bfloat16
            calls[_fn] += 1
            return _real(*args)

        monkeypatch.setattr(kernels.load(module), fn, spy)
    fused = evaluate(model, tok, [task], log_samples=True, progress=False, fused_layers=True)
    assert calls["rms_norm"] > 0 and calls["swiglu"] > 0
    assert fused["fused_layers"] is True and fused_modules(model) == []

    def max_diff(a, b):
        return max(
            abs(x - y)
            for s, t in zip(a["samples"], b["samples"])
            for x, y in zip(s["loglikelihoods"], t["loglikelihoods"])
        )

    print(f"fused vs eager bf16: {max_diff(fused, eager):.4f}; eager bf16 vs float32: "
          f"{max_diff(eager, f32):.4f}")  # fmt: skip
    assert max_diff(fused, eager) <= max(max_diff(eager, f32), 1e-3)
    same = sum(a["pred"] == b["pred"] for a, b in zip(fused["samples"], eager["samples"]))
    assert same >= len(task.docs) - 2
