"""The opt-in launch configs of the fused RMU MSE kernels (WMDP_FAST_RMU_MSE_CONFIG, see
kernels/rmu_mse.py `launch_config`): several rows per program, other block sizes / warps, and
programmatic dependent launch of the finish kernel. They exist for
benchmarks/bench_rmu_mse_tune.py; whichever wins must give the same results as the default.

In Triton's interpreter (CPU): against the reference (loss rtol 1e-6: float32 sums of exactly
converted inputs), the gradient bitwise equal to the default config's (elementwise, the same
arithmetic), the loss bitwise equal over two runs; odd shapes (15 rows: no row count is a
multiple of rows=2/4/8; D=100: a masked column tail). Compiled for sm_90 without a GPU: the
row-block kernel's loads and stores are 16-byte vectors, as the default kernel's are.
"""

from __future__ import annotations

import re

import pytest
import torch

from wmdp_fast import ops, reference
from wmdp_fast.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG_ENV = "WMDP_FAST_RMU_MSE_CONFIG"
FF_ENV = "WMDP_FAST_RMU_MSE_FUSED_FINISH"
CONFIGS = [
    "rows=2",
    "rows=4,block=64,warps=2",
    "rows=8,block=32",
    "pdl=1",
    "rows=2,pdl=1,rprogs=1",
]


def _rand(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(FF_ENV, raising=False)
    return monkeypatch


def _mse_run(h, target, mask, scale=1.5):
    x = h.clone().requires_grad_(True)
    loss = ops.rmu_mse(x, target, mask, scale)
    loss.backward(torch.tensor(0.75))  # grad_output != 1: the rescale runs too
    return loss.detach(), x.grad


@pytest.mark.parametrize("kind", ["full_mask", "cv", "int8_mask"])
def test_rmu_mse_configs_match_default_and_reference(interp, kind):
    B, T, D = 3, 5, 100
    h = _rand(B, T, D)
    mask = None
    if kind == "cv":
        target = _rand(1, 1, D, seed=1)
    else:
        target = _rand(B, T, D, seed=1)
        mask = torch.rand(B, T, generator=torch.Generator().manual_seed(2)) > 0.4
        if kind == "int8_mask":
            target = ops.pack_activations(target, "int8")
    want = reference.rmu_mse(h.float(), target, mask, 1.5) * 0.75
    l0, g0 = _mse_run(h, target, mask)
    torch.testing.assert_close(l0 * 0.75, want, rtol=1e-6, atol=0)
    for config in CONFIGS:
        for ff in ("0", "1"):
            interp.setenv(CONFIG_ENV, config)
            interp.setenv(FF_ENV, ff)
            la, ga = _mse_run(h, target, mask)
            lb, gb = _mse_run(h, target, mask)
            assert torch.equal(ga, g0), (config, ff)  # bitwise the default's gradient
            assert torch.equal(la, lb) and torch.equal(ga, gb), (config, ff)  # deterministic
            torch.testing.assert_close(la * 0.75, want, rtol=1e-6, atol=0)
            if mask is not None:  # masked-out positions get exactly zero gradient
                assert not ga[~mask].any()


def test_rmu_loss_configs_match_default_and_reference(interp):
    """Both terms in one launch: 15 forget rows (vs a control vector, masked) and 4 retain
    rows, so with rows=2/4/8 the last forget program is partly empty and the retain programs
    start at a row-block boundary of their own."""
    hf, hr = _rand(3, 5, 100), _rand(2, 2, 100, seed=3)
    cv, tr = _rand(100, seed=4), _rand(2, 2, 100, seed=5)
    fmask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    want = reference.rmu_loss(hf.float(), cv, hr.float(), tr, 3.0, forget_mask=fmask)

    def run():
        xf, xr = hf.clone().requires_grad_(True), hr.clone().requires_grad_(True)
        total, f, r = ops.rmu_loss(xf, cv, xr, tr, 3.0, forget_mask=fmask)
        total.backward()
        return torch.stack([total.detach(), f, r]), xf.grad, xr.grad

    base = run()
    torch.testing.assert_close(base[0], torch.stack(list(want)), rtol=1e-6, atol=0)
    for config in CONFIGS:
        for ff in ("0", "1"):
            interp.setenv(CONFIG_ENV, config)
            interp.setenv(FF_ENV, ff)
            a, b = run(), run()
            assert torch.equal(a[1], base[1]) and torch.equal(a[2], base[2]), (config, ff)
            assert all(torch.equal(x, y) for x, y in zip(a, b)), (config, ff)
            torch.testing.assert_close(a[0], torch.stack(list(want)), rtol=1e-6, atol=0)


def test_launch_config_parsing(interp):
    from wmdp_fast.kernels import load

    K = load("rmu_mse", interpret=True)
    assert K.launch_config(4096) == (*K.block_settings(4096), 1, False)
    assert K._variant(1, False) == {}  # the default launch passes no new constexpr
    interp.setenv(CONFIG_ENV, " rows=4, warps=8 ")
    assert K.launch_config(4096) == (K.block_settings(4096)[0], 8, 4, False)
    interp.setenv(CONFIG_ENV, "block=8192,pdl=1")
    # block at most next_power_of_2(D); no programmatic dependent launch in the interpreter
    assert K.launch_config(100) == (128, K.block_settings(100)[1], 1, False)
    for bad in ("rows=3", "block=8", "rprogs=-1", "warps=32", "pdl=2", "rows", "tile=2", "rows=x"):
        interp.setenv(CONFIG_ENV, bad)
        with pytest.raises(ConfigError, match=f"{CONFIG_ENV}=.*bad entry"):
            ops.rmu_mse(_rand(2, 3, 8), _rand(8, seed=1))


def test_row_block_kernel_vectorised_in_sm90_ptx():
    """The row-block variants load and store 16-byte vectors, with and without a mask and an
    int8 target, like the default kernel. (A first version masked the columns with
    `cols < n_live[:, None]`, a per-row bound: Triton then loaded bf16 element by element,
    ld.global.b16.) With pdl the stage-1 kernel releases its dependents and the finish
    kernel waits for them; the default kernels hold no griddepcontrol."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from wmdp_fast.kernels import compile_for, load

    K = load("rmu_mse")
    h = torch.empty(4, 96, 4096, dtype=torch.bfloat16)
    q, s = torch.empty(4, 96, 4096, dtype=torch.int8), torch.empty(4, 96)
    m = torch.empty(4, 96, dtype=torch.uint8)
    n = 4 * 96
    part = torch.empty(n)
    plain = [h, *h.stride(), h, *h.stride(), h, 0, 0, h, 0, 0, h, 96, 4096, 1.0]
    masked_int8 = [h, *h.stride(), q, *q.stride(), s, *s.stride(), m, *m.stride(), h, 96, 4096]
    masked_int8.append(1.0)
    cases = [(plain, [False, False, True, False]), (masked_int8, [True, True, True, False])]
    for rows, pdl in ((1, False), (2, False), (4, True)):
        for term, flags in cases:
            ptx = compile_for(
                K._rmu_mse_kernel, part, part, part, n, 0.5, *term, *flags, BLOCK_D=2048,
                FUSED_FINISH=False, FINISH_BLOCK=4096, num_warps=4, **K._variant(rows, pdl),
            ).asm["ptx"]  # fmt: skip
            loads = re.findall(r"ld\.global[\w.]*", ptx)
            assert "ld.global.b16" not in loads, (rows, flags, sorted(set(loads)))
            assert "ld.global.v4.b32" in loads and "st.global.v4.b32" in ptx, (rows, loads)
            assert ("griddepcontrol.launch_dependents" in ptx) == pdl, rows
    out = torch.empty(3)
    for wait in (False, True):
        extra = {"WAIT": True, "launch_pdl": True} if wait else {}
        ptx = compile_for(
            K._finish_kernel, part, n, n, 1.0, 1.0, out, BLOCK=4096, num_warps=8, **extra
        ).asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == wait
    f = torch.empty(())
    for stride in (False, True):  # the backward's rescale, one program per block or looping
        extra = {"GRID_STRIDE": True} if stride else {}
        ptx = compile_for(
            K._rescale_kernel, h, h, f, 3 * n, 3 * n, 1, A_MANUAL_BF16=False,
            B_MANUAL_BF16=False, BLOCK=4096, num_warps=8, **extra,
        ).asm["ptx"]  # fmt: skip
        assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx, stride


@pytest.mark.parametrize("config", ["rprogs=1", "rprogs=3", "rprogs=4", "rprogs=99"])
def test_grid_stride_rescale_matches_default(interp, config):
    """The backward's rescale (grad_output != 1) with a grid of rprogs programs looping over
    the 4096-element blocks: 3 blocks of the forget gradient, then 1 of the retain gradient
    (rprogs=1 and 3 loop across both buffers; 4 and more: the default one-per-block grid)."""
    hf, hr = _rand(3, 5, 700), _rand(2, 2, 700, seed=3)
    cv, tr = _rand(700, seed=4), _rand(2, 2, 700, seed=5)
    go = torch.tensor(-2.5)
    want_f, want_r = (
        reference.rmu_mse_grad(hf.float(), cv, None, 1.0, go),
        reference.rmu_mse_grad(hr.float(), tr, None, 3.0, go),
    )

    def run():
        xf, xr = hf.clone().requires_grad_(True), hr.clone().requires_grad_(True)
        ops.rmu_loss(xf, cv, xr, tr, 3.0)[0].backward(go)
        return xf.grad, xr.grad

    base = run()
    interp.setenv(CONFIG_ENV, config)
    got = run()
    assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
    # every block was scaled (grad_output -2.5 flips the sign); bf16: 2 roundings, rtol 2^-6
    for g, w in zip(got, (want_f, want_r)):
        torch.testing.assert_close(g.float(), w.float(), rtol=2**-6, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(3, 37, 4097), (4, 96, 4096)])
def test_configs_on_gpu_match_default(monkeypatch, shape):
    """Compiled kernels: every config of the tuning sweep (with and without the fused finish,
    a masked control-vector forget term and a retain term, grad_output != 1) gives bitwise the
    default's gradients, the default's loss within rtol 1e-6 (float32 sums, another per-row
    order) and bitwise the same loss and gradients on a second run."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    monkeypatch.delenv(FF_ENV, raising=False)
    B, T, D = shape
    hf = _rand(B, T, D).cuda()
    hr = _rand(B, T, D, seed=1).cuda()
    cv, tr = _rand(1, 1, D, seed=2).cuda(), _rand(B, T, D, seed=3).cuda()
    fmask = (torch.rand(B, T, generator=torch.Generator().manual_seed(4)) > 0.3).cuda()
    go = torch.tensor(0.5, device="cuda")

    def run(g=go):
        xf, xr = hf.clone().requires_grad_(True), hr.clone().requires_grad_(True)
        total, f, r = ops.rmu_loss(xf, cv, xr, tr, 7.0, forget_mask=fmask)
        total.backward(g)
        return torch.stack([total.detach(), f, r]), xf.grad, xr.grad

    # the base is the kernels before the configs existed, the rescale one program per block:
    # since the default rescale loops on 2 programs per SM, an unset variable is a config too
    monkeypatch.setenv(CONFIG_ENV, "rprogs=0")
    base = run()
    # grad_output 0.5 scales exactly: every block of both gradients was rescaled, once
    unscaled = run(torch.tensor(1.0, device="cuda"))
    assert torch.equal(base[1], unscaled[1] * 0.5) and torch.equal(base[2], unscaled[2] * 0.5)
    configs = ["", "rows=2", "rows=4,warps=8", "block=4096,warps=8", "pdl=1", "rprogs=264"]
    for config in [*configs, "rows=2,pdl=1,rprogs=264"]:
        for ff in ("0", "1"):
            monkeypatch.setenv(CONFIG_ENV, config)
            monkeypatch.setenv(FF_ENV, ff)
            a, b = run(), run()
            assert torch.equal(a[1], base[1]) and torch.equal(a[2], base[2]), (config, ff)
            assert all(torch.equal(x, y) for x, y in zip(a, b)), (config, ff)
            torch.testing.assert_close(a[0], base[0], rtol=1e-6, atol=0)


def test_default_rescale_grid_is_two_programs_per_sm(monkeypatch):
    """The backward's rescale defaults to 2 programs per SM on a compiled GPU (measured best on
    an H200: the same launch as WMDP_FAST_RMU_MSE_CONFIG=rprogs=264 there); interpreted or on
    the CPU, one program per block (0); an explicit rprogs still wins."""
    from types import SimpleNamespace

    from wmdp_fast import kernels

    K = kernels.load("rmu_mse")
    monkeypatch.setattr(K, "INTERPRETED", False)
    monkeypatch.setattr(kernels, "_sm_counts", {})
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(multi_processor_count=132)
    )
    assert K._default_rescale_programs(torch.device("cuda", 0)) == 264
    assert K._default_rescale_programs(torch.device("cpu")) == 0
    monkeypatch.setattr(K, "INTERPRETED", True)
    assert K._default_rescale_programs(torch.device("cuda", 0)) == 0
    seen = []

    class Grid:
        def __getitem__(self, grid):
            seen.append(grid)
            return lambda *a, **kw: seen.append(kw.get("GRID_STRIDE", False))

    monkeypatch.setattr(K, "_rescale_kernel", Grid())
    monkeypatch.setattr(K, "_default_rescale_programs", lambda dev: 4)
    g = [torch.zeros(10 * K.RESCALE_BLOCK)]
    K.rescale_(g, torch.ones(()))
    monkeypatch.setenv(K.CONFIG_ENV, "rprogs=0")
    K.rescale_(g, torch.ones(()))
    assert seen == [(4,), True, (10,), False]
