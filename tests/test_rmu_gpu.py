"""RMU on CUDA (run by benchmarks/gpu_check.sh on a lent GPU; skipped without one)."""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file
from test_rmu_parity import (
    assert_parity,
    control_vectors_file,
    published_rmu,
    tiny_cfg,
    write_corpora,
)

from wmdp_fast.rmu import run_rmu
from wmdp_fast.testing import make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@contextmanager
def math_attention():
    """For runs compared bitwise: attention's backward on CUDA is not deterministic (flash and
    memory-efficient attention add dq with atomics; PyTorch warns that flash, memory-efficient
    and cuDNN attention each 'defaults to a non-deterministic algorithm'), so two identical
    runs may train different last bits; and a fused backend may pick another forward kernel
    when grads are needed (cuDNN, the default on sm90 since torch 2.11's cuDNN, builds another
    graph). The math backend is matmuls and a softmax: deterministic, with or without grad."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextmanager
def kernel_calls(monkeypatch, names=("adamw.adamw_step", "rmsnorm.rms_norm", "swiglu.swiglu")):
    """Counts the compiled Triton launchers' calls (kernels/<module>.<fn>): a fused path that
    silently fell back to eager code would pass a bitwise or tolerance check vacuously."""
    from wmdp_fast import kernels

    calls = dict.fromkeys(names, 0)
    with monkeypatch.context() as m:
        for name in names:
            module, fn = name.split(".")
            real = getattr(kernels.load(module), fn)

            def spy(*args, _real=real, _name=name, **kw):
                calls[_name] += 1
                return _real(*args, **kw)

            m.setattr(kernels.load(module), fn, spy)
        yield calls


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("rmu_gpu")
    model_dir = make_tiny_model(d / "model", arch="mistral", num_hidden_layers=3)
    corpus = write_corpora(d / "corpora", n_docs=8, long_words=700)
    return model_dir, corpus


@pytest.mark.parametrize("cache_device", ["cuda", "cpu"])
def test_cuda_parity_float32(tmp_path, tiny, cache_device):
    """float32 on CUDA, two topics (512/768): the engine (cache on the GPU, or pinned CPU memory
    streamed on a side stream) matches the published loop run on the same GPU."""
    model_dir, corpus = tiny
    cfg = tiny_cfg(
        tmp_path,
        model_dir,
        corpus,
        K=2,
        max_num_batches=4,
        device="cuda",
        cache_device=cache_device,
        steering_coeffs=[20.0, 10.0],
        alpha=[10.0, 30.0],
    )
    cvs = control_vectors_file(tmp_path / "cv.safetensors", 2, 64, cfg.steering_coeffs)
    cfg.control_vectors = str(tmp_path / "cv.safetensors")
    result = run_rmu(cfg, progress=False)
    ref_params, ref_losses = published_rmu(model_dir, cfg, cvs, device="cuda")
    assert result.report["peak_gpu_memory_bytes"] > 0
    assert result.report["cache"]["storage"].startswith(cache_device)
    assert_parity(result, ref_params, ref_losses, model_dir)


def test_cuda_bf16_loss_curve_close_to_published(tmp_path, tiny):
    """bf16 (the published precision) on CUDA: the engine's loss curve follows the published
    loop's, run in bf16 on the same GPU with the same control vector. (It used to be compared
    with the engine's own float32 run: on an H200 the forget losses differed by 28%, also with
    one control vector for both, while bf16 and float32 agree to 0.8% on the CPU. Unexplained;
    a guess, not checked: the padding positions, which the published MSE counts, take other
    attention kernels in bf16 on CUDA. The published loop runs the same kernels either way.)"""
    model_dir, corpus = tiny
    cv = tmp_path / "cv.safetensors"
    cvs = control_vectors_file(cv, 1, 64, [20.0])
    kw = dict(K=1, max_num_batches=4, device="cuda", control_vectors=str(cv))
    cfg = tiny_cfg(tmp_path, model_dir, corpus, dtype="bfloat16", **kw)
    res = run_rmu(cfg, progress=False)
    _, ref = published_rmu(model_dir, cfg, cvs, device="cuda", dtype=torch.bfloat16)
    # the retain term is a small difference of large bf16 numbers (the published loop rounds
    # the MSE itself to bf16): 3.6% apart at step 3 on the CPU; the forget term and the total
    # agree to 0.4% there
    for i, key in ((0, "loss"), (1, "forget_loss")):
        a = torch.tensor([r[key] for r in res.report["losses"]])
        b = torch.tensor([r[i] for r in ref])
        torch.testing.assert_close(a, b, rtol=3e-2, atol=0, msg=key)


def test_cuda_4bit_prefix(tmp_path, tiny):
    """NF4 prefix (bitsandbytes), bf16 training: the retain targets come from the original
    layers on the same (quantized-prefix) cached inputs, so step 0's retain loss is exactly 0;
    the checkpoint keeps its float32 tensors, only the trained ones replaced."""
    # skipped only where bitsandbytes is not installed: one that is installed (gpu_check.sh
    # carries it in .gpu/site) but fails to import must fail here, not skip
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    model_dir, corpus = tiny
    cfg = tiny_cfg(
        tmp_path,
        model_dir,
        corpus,
        K=1,
        max_num_batches=3,
        device="cuda",
        dtype="bfloat16",
        load_in_4bit=True,
    )
    with math_attention():  # exactly 0 needs the same attention kernel with and without grad
        res = run_rmu(cfg, progress=False)
    assert res.report["losses"][0]["retain_loss"] == 0.0
    assert res.report["losses"][-1]["retain_loss"] > 0.0  # and training moved the layers
    assert res.report["cache"]["exact"] is False
    # the file itself (transformers loads every tensor in one dtype, so loading could not tell)
    orig = load_file(str(model_dir / "model.safetensors"))
    saved = load_file(str(res.output_dir / "model.safetensors"))
    assert set(saved) == set(orig) and set(res.params) == {
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.mlp.down_proj.weight",
    }
    for k, v in orig.items():
        if k in res.params:
            assert saved[k].dtype == torch.float32 and not torch.equal(saved[k], v), k
            assert torch.equal(saved[k], res.params[k].float()), k
        else:
            assert torch.equal(saved[k], v), k


def test_offload_keeps_one_batch_of_layer_kwargs_on_the_gpu(tiny):
    """--offload streams the prefix layers over all batches; while it does, the captured layer
    kwargs (4D masks, rotary tables) of the batches not being run wait in CPU memory (they
    stayed on the GPU, ~0.5 GB over the published 150 batches)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wmdp_fast.cache import capture_layer_inputs

    model_dir, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=False)
    tok.pad_token_id, tok.padding_side = tok.eos_token_id, "left"
    dev = torch.device("cuda")
    model.model.embed_tokens.to(dev)
    model.model.rotary_emb.to(dev)
    batches = [
        (("short", "a longer document " * (90 + i), "mid length text", "x y z " * 30), 256)
        for i in range(32)
    ]
    seen = []

    def probe(module, args, kwargs):
        seen.append(torch.cuda.memory_allocated(dev))

    # cuBLAS takes its workspace (32 MiB on an H200) from the caching allocator at the first
    # matmul on a stream: counted in memory_allocated, so it is allocated before the baseline
    x = torch.ones(4, 64, device=dev)
    torch.nn.functional.linear(x, torch.ones(64, 64, device=dev))
    x @ torch.ones(64, 8, device=dev)
    del x
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(dev)
    h = model.model.layers[0].register_forward_pre_hook(probe, with_kwargs=True)
    try:
        out = capture_layer_inputs(
            model,
            tok,
            batches,
            2,
            dev,
            torch.device("cpu"),
            progress=False,
            prefix_layers_on_cpu=True,
        )
    finally:
        h.remove()

    def nbytes(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        return sum(nbytes(v) for v in x) if isinstance(x, tuple) else 0

    kw_total = sum(nbytes(v) for e in out for v in e.kwargs.values())
    per_batch = max(nbytes(e.hidden) + sum(nbytes(v) for v in e.kwargs.values()) for e in out)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    # the streaming calls of layer 0 are the last len(batches) probes (the capture's own
    # forwards stop at layer 0's pre-hook too and are probed first)
    streaming = seen[-len(batches) :]
    assert kw_total > 4 * (layer_bytes + 2 * per_batch)  # else the test could not tell
    # nothing accumulates over the batches (before capture_layer_inputs ran under no_grad, the
    # streamed layers' autograd graphs kept +5.6 MB per batch here on an H200)
    assert max(streaming) - streaming[0] < per_batch, (streaming[0], max(streaming))
    assert max(streaming) - base < layer_bytes + 2 * per_batch + (1 << 20), (
        max(streaming) - base,
        kw_total,
    )
    assert all(v.device.type == "cpu" for e in out for v in e.kwargs.values() if torch.is_tensor(v))


@pytest.mark.parametrize("cache_device", ["cuda", "cpu"])
def test_cuda_layer_first_cache_is_bitwise_the_full_replay(tmp_path, tiny, cache_device):
    """bf16 on CUDA, cache on the GPU or in pinned CPU memory (the split batches are streamed
    with the cache): --first-layer-cache on and off train bitwise the same tensors."""
    model_dir, corpus = tiny
    kw = dict(max_num_batches=4, device="cuda", dtype="bfloat16", cache_device=cache_device)
    with math_attention():
        on = run_rmu(
            tiny_cfg(tmp_path / "on", model_dir, corpus, first_layer_cache="on", **kw),
            progress=False,
        )
        off = run_rmu(
            tiny_cfg(tmp_path / "off", model_dir, corpus, first_layer_cache="off", **kw),
            progress=False,
        )
    assert on.report["first_layer_cache"]["used"] and not off.report["first_layer_cache"]["used"]
    assert on.report["cache"]["storage"].startswith(cache_device)
    for name, t in off.params.items():
        assert torch.equal(on.params[name], t), name
    assert on.report["losses"] == off.report["losses"]


def test_cuda_pinned_disk_cache_hit_trains_the_same(tmp_path, tiny):
    """--cache-dir with the cache in pinned CPU memory (PinnedPool chunks): a run served from
    the disk cache trains bitwise what the run that built it trained."""
    model_dir, corpus = tiny
    kw = dict(
        max_num_batches=3,
        device="cuda",
        dtype="bfloat16",
        cache_device="cpu",
        cache_dir=str(tmp_path / "cache"),
    )
    with math_attention():
        a = run_rmu(tiny_cfg(tmp_path / "a", model_dir, corpus, **kw), progress=False)
        b = run_rmu(tiny_cfg(tmp_path / "b", model_dir, corpus, **kw), progress=False)
    assert not a.report["cache"]["hit"] and b.report["cache"]["hit"]
    for name, t in a.params.items():
        assert torch.equal(b.params[name], t), name


def test_cuda_opt_in_fused_paths_train_like_eager(tmp_path, tiny, monkeypatch):
    """The two fused paths in a real run (the AdamW step, on by default; --fused-layers on),
    bf16 on CUDA, against the same run without them: the fused AdamW step is meant to be
    bitwise; the fused layers round like eager but may contract multiply-adds, so the trained
    tensors and loss curves are compared at bf16 accuracy, and the modules must be patched."""
    model_dir, corpus = tiny
    kw = dict(max_num_batches=4, device="cuda", dtype="bfloat16")
    # eager whatever the environment says (the fused AdamW is the default on CUDA)
    monkeypatch.setenv("WMDP_FAST_FUSED_ADAMW", "0")
    with kernel_calls(monkeypatch) as calls:
        eager = run_rmu(
            tiny_cfg(tmp_path / "a", model_dir, corpus, fused_layers="off", **kw), progress=False
        )
    assert set(calls.values()) == {0}, calls
    monkeypatch.setenv("WMDP_FAST_FUSED_ADAMW", "1")
    with kernel_calls(monkeypatch) as calls:
        fused = run_rmu(
            tiny_cfg(tmp_path / "b", model_dir, corpus, fused_layers="on", **kw), progress=False
        )
    assert all(n > 0 for n in calls.values()), calls  # the compiled kernels really ran
    assert len(fused.report["fused_layers"]) == 6  # 2 layers x (2 norms + MLP)
    a = torch.tensor([r["loss"] for r in fused.report["losses"]])
    b = torch.tensor([r["loss"] for r in eager.report["losses"]])
    torch.testing.assert_close(a, b, rtol=2e-2, atol=0)
    for name, t in eager.params.items():
        torch.testing.assert_close(fused.params[name].float(), t.float(), rtol=2e-2, atol=2e-3)


def test_cuda_fused_adamw_alone_is_bitwise_the_eager_run(tmp_path, tiny, monkeypatch):
    """WMDP_FAST_FUSED_ADAMW=1 alone changes nothing but the optimizer's kernels: the run must
    train bitwise the same tensors (if not, see CONTRACT_DEFAULT in kernels/adamw.py)."""
    model_dir, corpus = tiny
    kw = dict(max_num_batches=4, device="cuda", dtype="bfloat16")
    # eager whatever the environment says (fused is the default on CUDA: =0 turns it off)
    monkeypatch.setenv("WMDP_FAST_FUSED_ADAMW", "0")
    with math_attention():
        with kernel_calls(monkeypatch, ("adamw.adamw_step",)) as eager_calls:
            eager = run_rmu(tiny_cfg(tmp_path / "a", model_dir, corpus, **kw), progress=False)
        monkeypatch.setenv("WMDP_FAST_FUSED_ADAMW", "1")
        with kernel_calls(monkeypatch, ("adamw.adamw_step",)) as fused_calls:
            fused = run_rmu(tiny_cfg(tmp_path / "b", model_dir, corpus, **kw), progress=False)
    # one launch per trained tensor and step, and only in the second run
    steps = len(fused.report["losses"])
    assert eager_calls["adamw.adamw_step"] == 0 and fused_calls["adamw.adamw_step"] == 2 * steps
    for name, t in eager.params.items():
        assert torch.equal(fused.params[name], t), name
    assert fused.report["losses"] == eager.report["losses"]
