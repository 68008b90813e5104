"""The fused RMSNorm and SwiGLU kernels (kernels/rmsnorm.py, kernels/swiglu.py) behind
ops.rms_norm / ops.swiglu, forward and backward, against the reference twins (the HF code).

On the CPU they run in Triton's interpreter (WMDP_FAST_FORCE_TRITON=1), on small shapes; the
`cuda` variants run the compiled kernels at Zephyr-7B width (marked gpu).

Tolerances (stated per dtype; the reference is eager autograd through the HF code):
- float32: rtol 1e-5, atol 1e-6. Both compute in float32; they differ only in the order of the
  row sums (x^2, sum(gh * x), the weight gradient over rows) and in float32 exp's last bit.
- bfloat16 / float16: a few units in the last place of the output dtype (rtol 2^-6 / 2^-9 on
  outputs and dx, atol set by the magnitude), and the weight gradient (a sum over rows of
  rounded products) rtol 2^-6 / 2^-9 relative to the sum of magnitudes. Both sides round at the
  same points, so most elements are bitwise equal: the tests also check (and print) that
  fraction (>= 90% in the interpreter; the GPU's exp and rsqrt differ from the CPU's, so >= 80%
  there).
"""

from __future__ import annotations

import re

import pytest
import torch

from wmdp_fast import ops, reference
from wmdp_fast.errors import ConfigError

HAS_CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2**-6, "atol": 2**-6},
    torch.float16: {"rtol": 2**-9, "atol": 2**-10},
}
MIN_BITWISE = {"cpu": 0.90, "cuda": 0.80}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=["interp", pytest.param("cuda", marks=gpu)])
def device(request, monkeypatch):
    """'cpu' with the kernels forced on (interpreter), or 'cuda'."""
    if request.param == "interp":
        monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")
        return "cpu"
    return "cuda"


def _rand(*shape, dtype=torch.float32, seed=0, device="cpu", scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dtype)


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def _check(name, got, want, dtype, device, report):
    torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    frac = _bitwise(got, want)
    report.append(f"{name} {dtype} bitwise {frac:.3f}")
    if dtype != torch.float32:
        assert frac >= MIN_BITWISE[device], f"{name}: only {frac:.3f} bitwise equal"


def _check_dw(got, want, dy, h, dtype):
    """Weight gradient: a sum over rows, compared relative to the sum of |dy * h|."""
    mag = (dy.float() * h.float()).abs().reshape(-1, h.shape[-1]).sum(0)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-9}[dtype]
    err = (got.float() - want.float()).abs()
    assert bool((err <= rtol * mag + 1e-6).all()), f"dw max err {err.max()}"


def _norm_case(shape, dtype, device, w_dtype=None, w_grad=True, seed=0):
    D = shape[-1]
    x = _rand(*shape, dtype=dtype, seed=seed, device=device, scale=2.0, shift=0.3)
    w = _rand(D, dtype=w_dtype or dtype, seed=seed + 1, device=device, scale=0.5, shift=1.0)
    dy = _rand(*shape, dtype=torch.promote_types(w.dtype, dtype), seed=seed + 2, device=device)
    return x, w.requires_grad_(w_grad), dy


def _norm_grads(fn, x, w, dy, eps=1e-6):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(w.requires_grad)
    y = fn(x, w, eps)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 97), (2, 4097)], ids=str)
def test_rms_norm_matches_reference(device, dtype, shape):
    x, w, dy = _norm_case(shape, dtype, device)
    y, dx, dw = _norm_grads(ops.rms_norm, x, w, dy)
    ry, rdx, rdw = _norm_grads(reference.rms_norm, x, w, dy)
    assert y.dtype == ry.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    report = []
    _check("y", y, ry, dtype, device, report)
    _check("dx", dx, rdx, dtype, device, report)
    h = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    _check_dw(dw, rdw, dy, h, dtype)
    print(shape, "; ".join(report), f"dw bitwise {_bitwise(dw, rdw):.3f}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_without_weight_grad_and_mixed_dtypes(device, dtype):
    """weight frozen (RMU: only down_proj trains): dx only, and no weight gradient. A float32
    weight on bf16 x gives a float32 output, as in HF (type promotion)."""
    x, w, dy = _norm_case((6, 96), dtype, device, w_grad=False)
    y, dx, dw = _norm_grads(ops.rms_norm, x, w, dy)
    ry, rdx, _ = _norm_grads(reference.rms_norm, x, w, dy)
    assert dw is None
    torch.testing.assert_close(y, ry, **TOL[dtype])
    torch.testing.assert_close(dx, rdx, **TOL[dtype])
    x, w, dy = _norm_case((6, 96), dtype, device, w_dtype=torch.float32)
    y, dx, dw = _norm_grads(ops.rms_norm, x, w, dy)
    ry, rdx, rdw = _norm_grads(reference.rms_norm, x, w, dy)
    assert y.dtype == torch.float32 and dx.dtype == dtype and dw.dtype == torch.float32
    torch.testing.assert_close(
        y, ry, **TOL[torch.float32] if dtype == torch.float32 else TOL[dtype]
    )
    torch.testing.assert_close(dx, rdx, **TOL[dtype])
    torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-4)


def test_rms_norm_weight_grad_only(device):
    """x constant, weight trained: only the weight gradient is computed."""
    x, w, dy = _norm_case((5, 40), torch.float32, device)
    y = ops.rms_norm(x, w, 1e-5)
    y.backward(dy)
    w2 = w.detach().clone().requires_grad_()
    reference.rms_norm(x, w2, 1e-5).backward(dy)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_rms_norm_non_contiguous_input(device):
    """Strided rows (a slice of a wider tensor) are read in place; a transposed input (column
    stride != 1) is copied. Both give the reference's values and gradients."""
    base = _rand(4, 6, 80, seed=3, device=device, dtype=torch.bfloat16)
    for x in (base[:, :, 8:72], base.transpose(0, 1)[:, :, :64].transpose(1, 2)):
        x = x.detach()
        w = _rand(x.shape[-1], seed=4, device=device, shift=1.0, dtype=torch.bfloat16)
        dy = _rand(*x.shape, seed=5, device=device, dtype=torch.bfloat16)
        y, dx, dw = _norm_grads(ops.rms_norm, x, w.requires_grad_(), dy)
        ry, rdx, rdw = _norm_grads(reference.rms_norm, x, w, dy)
        torch.testing.assert_close(y, ry, **TOL[torch.bfloat16])
        torch.testing.assert_close(dx, rdx, **TOL[torch.bfloat16])
        assert dx.shape == x.shape
        assert _bitwise(y, ry) >= 0.9 and _bitwise(dx, rdx) >= 0.9


def test_rms_norm_is_deterministic(device):
    x, w, dy = _norm_case((33, 72), torch.bfloat16, device, seed=7)
    runs = [_norm_grads(ops.rms_norm, x, w, dy) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_rms_norm_eps_and_zero_rows(device):
    """A zero row gives 0 (rsqrt(eps) * 0), not NaN; eps is the module's, e.g. 1e-5."""
    x = torch.zeros(3, 32, device=device)
    x[1] = _rand(32, seed=8, device=device)
    w = torch.full((32,), 2.0, device=device)
    for eps in (1e-5, 0.25):
        y = ops.rms_norm(x, w, eps)
        torch.testing.assert_close(y, reference.rms_norm(x, w, eps), rtol=1e-6, atol=1e-7)
    assert torch.equal(y[0], torch.zeros(32, device=device))


def _swiglu_grads(fn, g, u, dy, grads=(True, True)):
    g = g.detach().clone().requires_grad_(grads[0])
    u = u.detach().clone().requires_grad_(grads[1])
    y = fn(g, u)
    y.backward(dy)
    return y.detach(), g.grad, u.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 96), (5, 1001)], ids=str)
def test_swiglu_matches_reference(device, dtype, shape):
    g = _rand(*shape, dtype=dtype, seed=10, device=device, scale=3.0)
    u = _rand(*shape, dtype=dtype, seed=11, device=device)
    dy = _rand(*shape, dtype=dtype, seed=12, device=device, scale=0.5)
    y, dg, du = _swiglu_grads(ops.swiglu, g, u, dy)
    ry, rdg, rdu = _swiglu_grads(reference.swiglu, g, u, dy)
    assert y.dtype == dg.dtype == du.dtype == dtype
    report = []
    _check("y", y, ry, dtype, device, report)
    _check("dgate", dg, rdg, dtype, device, report)
    _check("dup", du, rdu, dtype, device, report)
    print(shape, "; ".join(report))


def test_swiglu_partial_grads_non_contiguous_and_deterministic(device):
    dtype = torch.bfloat16
    g = _rand(40, 24, dtype=dtype, seed=13, device=device, scale=3.0).t()  # non-contiguous
    u = _rand(24, 40, dtype=dtype, seed=14, device=device)
    dy = _rand(24, 40, dtype=dtype, seed=15, device=device)
    for grads in ((True, False), (False, True)):
        y, dg, du = _swiglu_grads(ops.swiglu, g, u, dy, grads)
        ry, rdg, rdu = _swiglu_grads(reference.swiglu, g, u, dy, grads)
        torch.testing.assert_close(y, ry, **TOL[dtype])
        for a, b in ((dg, rdg), (du, rdu)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, **TOL[dtype])
    runs = [_swiglu_grads(ops.swiglu, g, u, dy) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    with torch.no_grad():  # no graph: the forward kernel alone
        torch.testing.assert_close(ops.swiglu(g, u), reference.swiglu(g, u), **TOL[dtype])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_swiglu_extreme_gates(device):
    """Large |gate| (exp overflows to inf for g < -88): silu -> -0/0 and g, no NaN; the
    gradient tends to 0 and 1."""
    g = torch.tensor([-120.0, -89.0, -20.0, 0.0, 20.0, 89.0, 120.0], device=device)
    u = torch.ones_like(g)
    y, dg, du = _swiglu_grads(ops.swiglu, g, u, torch.ones_like(g))
    ry, rdg, rdu = _swiglu_grads(reference.swiglu, g, u, torch.ones_like(g))
    torch.testing.assert_close(y, ry, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(dg, rdg, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(du, rdu, rtol=1e-6, atol=1e-30)


def test_second_order_gradients_raise(device):
    """The backward kernels are not differentiable: create_graph=True must not silently give
    zero second derivatives."""
    x = _rand(3, 16, seed=30, device=device).requires_grad_(True)
    w = torch.ones(16, device=device)
    for y in (ops.rms_norm(x, w), ops.swiglu(x, x * 2.0)):
        (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):
            g.sum().backward()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, w: ops.rms_norm(x, w[:-1]), r"rms_norm: weight must be \[D=16\]"),
        (lambda x, w: ops.rms_norm(x.long(), w), "rms_norm: x dtype must be"),
        (lambda x, w: ops.rms_norm(x, w, -1.0), "rms_norm: eps must be >= 0"),
        (lambda x, w: ops.rms_norm(x, w, float("nan")), "rms_norm: eps must be finite"),
        (lambda x, w: ops.rms_norm(x, w.double()), "rms_norm: weight dtype must be"),
        (lambda x, w: ops.swiglu(x, x[:, :8]), "swiglu: gate .* and up .* must have the same"),
        (lambda x, w: ops.swiglu(x, x.half()), "swiglu: gate is torch.float32 but up is"),
        (lambda x, w: ops.swiglu(x, "u"), "swiglu: up must be a tensor"),
    ],
)
def test_argument_errors(call, match):
    x, w = torch.randn(3, 16), torch.ones(16)
    with pytest.raises(ConfigError, match=match):
        call(x, w)


def test_ops_registered_and_dispatch(monkeypatch):
    """Both ops are Triton ops (CUDA -> Triton, CPU -> reference unless forced), and the
    fallback width limit in ops equals the kernel's."""
    from wmdp_fast import kernels

    assert {"rms_norm", "swiglu"} <= set(ops.TRITON_OPS) and "rms_norm" in ops.OPS
    monkeypatch.delenv("WMDP_FAST_FORCE_TRITON", raising=False)
    assert ops.backend_of("rms_norm", "cpu") == "reference"
    monkeypatch.setenv("WMDP_FAST_FORCE_TRITON", "1")
    assert ops.backend_of("swiglu", "cpu") == "triton-interpret"
    assert ops.RMS_NORM_MAX_D == kernels.load("rmsnorm", interpret=True).MAX_D


def test_kernels_compile_for_sm90_without_atomics():
    """Every kernel variant compiles for an H100 (sm_90) without a GPU (the interpreter never
    compiles: this catches GPU-only compile errors), holds no atomic (the results are
    deterministic by construction), and swiglu's exp is libdevice's expf (fma-based range
    reduction) rather than tl.exp's bare ex2.approx, as torch's silu kernels use."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from wmdp_fast.kernels import compile_for, load

    R, S = load("rmsnorm"), load("swiglu")
    x = torch.empty(2048, 4096, dtype=torch.bfloat16)
    w = torch.empty(4096, dtype=torch.bfloat16)
    rstd, part = torch.empty(2048), torch.empty(264, 4096)
    block, warps = R.block_settings(4096)
    knobs = {"BLOCK_D": block, "num_warps": warps}
    ptx = [
        compile_for(
            R._rms_norm_fwd_kernel,
            x,
            4096,
            w,
            x,
            rstd,
            4096,
            1 / 4096,
            1e-5,
            X_BF16=False,
            Y_BF16=False,
            **knobs,
        )  # fmt: skip
    ]
    for dx, dw in ((True, False), (True, True), (False, True)):
        ptx.append(
            compile_for(
                R._rms_norm_bwd_kernel,
                x,
                4096,
                x,
                4096,
                w,
                rstd,
                x,
                part,
                2048,
                8,
                4096,
                1 / 4096,
                X_BF16=False,
                Y_BF16=False,
                HAS_DX=dx,
                HAS_DW=dw,
                **knobs,
            )  # fmt: skip
        )
    ptx.append(compile_for(R._sum_partials_kernel, part, 264, w, 4096, DW_BF16=False, BLOCK=256))
    g = torch.empty(4 * 512 * 14336, dtype=torch.bfloat16)
    glu = {"MANUAL_BF16": False, "BLOCK": S.BLOCK, "num_warps": S.NUM_WARPS}
    fwd = {
        lib: compile_for(S._swiglu_fwd_kernel, g, g, g, g.numel(), LIBDEVICE=lib, **glu)
        for lib in (True, False)
    }
    ptx.append(
        compile_for(
            S._swiglu_bwd_kernel,
            g,
            g,
            g,
            g,
            g,
            g.numel(),
            HAS_DG=True,
            HAS_DU=True,
            LIBDEVICE=True,
            **glu,
        )  # fmt: skip
    )
    ptx = [k.asm["ptx"] for k in ptx] + [fwd[True].asm["ptx"]]
    atomic = re.compile(r"^\s*(@!?%p\d+\s+)?(atom|red)\.", re.M)  # optionally predicated
    assert atomic.search("\t@%p3 atom.global.gpu.acq_rel.add.u32 \t%r1, [%rd2], 1;")
    assert not [p for p in ptx if atomic.search(p)]
    assert "rsqrt.approx" in ptx[0]  # the instruction torch's CUDA rsqrt compiles to
    assert fwd[True].asm["ptx"].count("fma.rn") > fwd[False].asm["ptx"].count("fma.rn")
    assert all("div.rn.f32" in p for p in (ptx[-1], ptx[-2]))


# --- GPU: Zephyr-7B width, bf16 ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("w_grad", [False, True])
def test_gpu_zephyr_width_rms_norm(w_grad):
    dtype = torch.bfloat16
    x, w, dy = _norm_case((4, 512, 4096), dtype, "cuda", w_grad=w_grad, seed=20)
    y, dx, dw = _norm_grads(ops.rms_norm, x, w, dy)
    ry, rdx, rdw = _norm_grads(reference.rms_norm, x, w, dy)
    report = []
    _check("y", y, ry, dtype, "cuda", report)
    _check("dx", dx, rdx, dtype, "cuda", report)
    if w_grad:
        h = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        _check_dw(dw, rdw, dy, h, dtype)
    print("zephyr rms_norm", "; ".join(report))
    again = _norm_grads(ops.rms_norm, x, w, dy)
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(again, (y, dx, dw)))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_zephyr_width_swiglu():
    dtype = torch.bfloat16
    shape = (4, 512, 14336)
    g = _rand(*shape, dtype=dtype, seed=21, device="cuda", scale=2.0)
    u = _rand(*shape, dtype=dtype, seed=22, device="cuda")
    dy = _rand(*shape, dtype=dtype, seed=23, device="cuda")
    y, dg, du = _swiglu_grads(ops.swiglu, g, u, dy)
    ry, rdg, rdu = _swiglu_grads(reference.swiglu, g, u, dy)
    report = []
    _check("y", y, ry, dtype, "cuda", report)
    _check("dgate", dg, rdg, dtype, "cuda", report)
    _check("dup", du, rdu, dtype, "cuda", report)
    print("zephyr swiglu", "; ".join(report))
