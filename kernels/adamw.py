"""The published AdamW step (wmdp_fast.rmu.PublishedAdamW) as one elementwise pass.

The eager step is 7 elementwise kernels per tensor (mul_, add_, mul_, addcmul_, sqrt, add_,
addcdiv_): ~19 element accesses. This kernel reads p, g, m, v once and writes p, m, v once
(7 accesses) and does, per element, the eager sequence with every intermediate rounded to the
tensor's dtype where the eager op writes a tensor (arithmetic in float32, PyTorch's opmath):

    m = rnd(m * beta1);  m = rnd(m + (1 - beta1) * g)          # mul_, add_(g, alpha)
    v = rnd(v * beta2);  v = rnd(v + (1 - beta2) * (g * g))    # mul_, addcmul_(g, g, value)
    d = rnd(sqrt(v));    d = rnd(d + eps)                       # sqrt, add_(eps)
    p = rnd(p + (-step_size) * (m / d))                         # addcdiv_(m, d, value)

Scalars are float32, as in PyTorch's CUDA kernels (a Python float becomes opmath float32).
How PyTorch's CUDA kernels group and fuse these (read from pytorch/pytorch):
  - add_(g, alpha): ufunc/add.h `self + alpha * other`; nvcc's default --fmad=true contracts it
    to fma(alpha, other, self).
  - addcmul_ / addcdiv_: PointwiseOpsKernel.cu `a + alpha * (b * c)` / `a + alpha * (b / c)`
    (older releases, contracted by nvcc), since DeviceAddCmulCdiv.cuh `pointwise_op_impl`:
    explicit std::fma(alpha, op(b, c), a). The product g * g (and the quotient m / d) is rounded
    to float32 first: the grouping is alpha * (g * g), not (alpha * g) * g.
  - mul_ (scalar), sqrt (::sqrt, IEEE with nvcc's default -prec-sqrt=true), add_(eps) (alpha 1:
    fma(1, eps, d) == d + eps): nothing to fuse. Division is IEEE (-prec-div=true).
(PyTorch special-cases value == 1 in addcmul_ as fma(g, g, v): reached only when
float32(1 - beta2) == 1, i.e. 0 < beta2 < 2^-25 (beta2 == 0 gives the same bits); not
reproduced.) So the default is CONTRACT=True: explicit tl.fma in those three places.
CONTRACT=False does a separate multiply and add instead (a check for the GPU test). Every launch disables LLVM's fp
fusion (enable_fp_fusion=False), so the kernel rounds exactly where it is written, whatever
the setting.

Contiguous tensors only (the launcher refuses others; `wmdp_fast.ops.published_adamw_step`
routes them to the eager sequence). Use it through `wmdp_fast.ops` (argument checks live there).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from wmdp_fast.errors import ConfigError

CONTRACT_DEFAULT = True
BLOCK = 2048
NUM_WARPS = 8
# triton.jit picked the interpreter for this module's kernels iff TRITON_INTERPRET was set when
# it was imported (kernels.load sets it for the interpreted copy).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _load(ptr, offs, live, MANUAL_BF16: tl.constexpr):
    """ptr[offs] as float32. MANUAL_BF16 widens bf16 on the bits: Triton's interpreter converts
    bf16 subnormals to float32 wrongly (the GPU's conversion is exact)."""
    if MANUAL_BF16:
        bits = tl.load(ptr + offs, mask=live, other=0.0).to(tl.uint16, bitcast=True)
        x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + offs, mask=live, other=0.0).to(tl.float32)
    return x


@triton.jit
def _round(x, ty: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """x (float32) rounded to ty (nearest even) and back to float32: what storing an eager
    op's result in a ty tensor does. MANUAL_BF16 rounds on the bits: Triton's interpreter
    truncates float32 -> bf16 (the GPU rounds) and mangles subnormals. (The rounding of
    rmu_mse._cast_out; see pack._cast_out for why kernel modules do not share helpers.)"""
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    else:
        y = x.to(ty).to(tl.float32)
    return y


@triton.jit
def _store(ptr, offs, x, live, MANUAL_BF16: tl.constexpr):
    """Stores x (float32, already rounded to ptr's dtype: the conversion is exact)."""
    if MANUAL_BF16:
        bits = (x.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16)
        tl.store(ptr + offs, bits.to(tl.bfloat16, bitcast=True), mask=live)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=live)


@triton.jit
def _axpy(alpha, x, y, CONTRACT: tl.constexpr):
    """y + alpha * x: one rounding (fma) or two."""
    if CONTRACT:
        r = tl.fma(alpha, x, y)
    else:
        r = y + alpha * x
    return r


@triton.jit
def _adamw_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    n,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    neg_step_size,
    CONTRACT: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    ty = p_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    p = _load(p_ptr, offs, live, MANUAL_BF16)
    g = _load(g_ptr, offs, live, MANUAL_BF16)
    m = _load(m_ptr, offs, live, MANUAL_BF16)
    v = _load(v_ptr, offs, live, MANUAL_BF16)
    m = _round(m * beta1, ty, MANUAL_BF16)
    m = _round(_axpy(one_minus_beta1, g, m, CONTRACT), ty, MANUAL_BF16)
    v = _round(v * beta2, ty, MANUAL_BF16)
    v = _round(_axpy(one_minus_beta2, g * g, v, CONTRACT), ty, MANUAL_BF16)
    d = _round(tl.sqrt_rn(v), ty, MANUAL_BF16)
    d = _round(d + eps, ty, MANUAL_BF16)
    p = _round(_axpy(neg_step_size, tl.div_rn(m, d), p, CONTRACT), ty, MANUAL_BF16)
    _store(p_ptr, offs, p, live, MANUAL_BF16)
    _store(m_ptr, offs, m, live, MANUAL_BF16)
    _store(v_ptr, offs, v, live, MANUAL_BF16)


def _launch_ctx(device: torch.device):
    if INTERPRETED:
        from wmdp_fast.kernels import interpreter_launch

        return interpreter_launch()
    if device.type == "cuda":  # the launch goes to the current device
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def adamw_step(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    contract: bool = CONTRACT_DEFAULT,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> None:
    """One published-AdamW step on one tensor, in place: p, m (exp_avg), v (exp_avg_sq)
    updated from the gradient g. All four contiguous, of one shape, dtype (float32, bfloat16
    or float16) and device. step_size = lr * sqrt(1 - beta2**t) / (1 - beta1**t), computed by
    the caller in Python floats as PublishedAdamW does."""
    for name, t in (("p", p), ("g", g), ("m", m), ("v", v)):
        if not t.is_contiguous():
            raise ConfigError(
                f"adamw_step: {name} is not contiguous (strides {t.stride()}); the fused step "
                "needs contiguous tensors (ops.published_adamw_step runs the eager sequence "
                "for such tensors)"
            )
    n = p.numel()
    if n == 0:
        return
    with _launch_ctx(p.device):
        _adamw_kernel[(triton.cdiv(n, block),)](
            p,
            g,
            m,
            v,
            n,
            beta1,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            eps,
            -step_size,
            CONTRACT=contract,
            MANUAL_BF16=INTERPRETED and p.dtype == torch.bfloat16,
            BLOCK=block,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )


@triton.jit
def _fma_probe_kernel(a_ptr, b_ptr, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    a = tl.load(a_ptr + offs, mask=live, other=0.0)
    b = tl.load(b_ptr + offs, mask=live, other=0.0)
    c = tl.load(c_ptr + offs, mask=live, other=0.0)
    tl.store(out_ptr + offs, tl.fma(a, b, c), mask=live)


def fma_probe(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """tl.fma(a, b, c) elementwise (float32, contiguous, one shape): the tests ask the
    interpreter whether its fma rounds once, as the GPU's does (triton 3.6's interpreter
    rounds a * b and then the sum; 3.9's rounds once)."""
    out = torch.empty_like(a)
    n = a.numel()
    with _launch_ctx(a.device):
        _fma_probe_kernel[(triton.cdiv(n, 1024),)](a, b, c, out, n, BLOCK=1024)
    return out
