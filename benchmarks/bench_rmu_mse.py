"""pytest-benchmark microbenchmarks of the RMU loss ops (CPU-sized; on the GPU when there is one).

    python -m pytest benchmarks/bench_rmu_mse.py --benchmark-enable
    python -m pytest benchmarks/bench_rmu_mse.py --benchmark-enable --benchmark-group-by=param:shape

Each benchmark is forward + backward of the loss w.r.t. the hidden states (except pack). The
sweep with GB/s and peak memory is benchmarks/bench_rmu_mse_table.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wmdp_fast import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(4, 128, 1024), (2, 256, 2048)] if DEVICE == "cpu" else [(4, 768, 4096)]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _inputs(shape, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(*shape, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    t = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
    return h, t


def _fwd_bwd(h, loss_fn):
    def step():
        h.grad = None
        loss_fn().backward()
        _sync()

    return step


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", ["eager", "fused", "fused-int8"])
def test_rmu_mse_fwd_bwd(benchmark, shape, provider):
    h, t = _inputs(shape)
    benchmark.group = f"rmu_mse {shape}"
    if provider == "eager":
        step = _fwd_bwd(h, lambda: F.mse_loss(h.float(), t.float()))
    elif provider == "fused":
        step = _fwd_bwd(h, lambda: ops.rmu_mse(h, t))
    else:
        packed = ops.pack_activations(t, "int8")
        step = _fwd_bwd(h, lambda: ops.rmu_mse(h, packed))
    benchmark(step)
    want = F.mse_loss(h.float(), t.float())
    got = ops.rmu_mse(h, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("provider", ["eager", "fused"])
def test_rmu_loss_both_terms(benchmark, provider):
    shape = SHAPES[0]
    hf, h0 = _inputs(shape)
    hr = h0.detach().clone().requires_grad_(True)
    cv = torch.rand(1, 1, shape[-1], device=DEVICE, dtype=hf.dtype)
    benchmark.group = f"rmu_loss {shape}"

    def eager():
        return F.mse_loss(hf.float(), cv.float().expand(shape)) + 1200.0 * F.mse_loss(
            hr.float(), (h0 * 1.01).float()
        )

    def fused():
        return ops.rmu_loss(hf, cv, hr, h0 * 1.01, 1200.0)[0]

    fn = eager if provider == "eager" else fused

    def step():
        hf.grad = hr.grad = None
        fn().backward()
        _sync()

    benchmark(step)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_pack_activations(benchmark, fmt):
    _, t = _inputs(SHAPES[0])
    benchmark.group = "pack_activations"

    def step():
        ops.pack_activations(t, fmt)
        _sync()

    benchmark(step)
