"""Fused SwiGLU: `silu(gate) * up`, the elementwise middle of a Llama / Mistral / Qwen2 MLP.

Eager is two kernels forward (silu, mul) and three backward (two muls, silu_backward), and
saves silu's output besides gate and up. Here one kernel each way, elementwise over the
flattened tensors:

  forward   a = round(silu(g)), y = round(a * u)     (round: to the inputs' dtype)
  backward  du = round(dy * a), da = round(dy * u),
            dg = round(da * s * (1 + g * (1 - s))) with s = 1 / (1 + exp(-g))
            (a and s recomputed from g: only gate and up are saved)

These are torch's own formulas and rounding points (silu is `g / (1 + exp(-g))` in float32
with an IEEE division, rounded to the dtype before the multiply; silu_backward as in ATen),
and on the GPU `exp` is CUDA's expf (libdevice), the one torch's kernels use. What may still
differ from eager: FMA contraction (Triton's and nvcc's choices) and, in the interpreter,
numpy's exp vs the CPU's.

Use these through `wmdp_fast.ops` (argument checks live there).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.language.extra import libdevice

BLOCK = 1024
NUM_WARPS = 4
# triton.jit picked the interpreter for this module's kernels iff TRITON_INTERPRET was set when
# it was imported (kernels.load sets it for the interpreted copy).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _cast_out(x, out_ty: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """x (float32) -> out_ty, rounding to nearest even (see rmu_mse._cast_out; a copy, not an
    import, for the reason pack._cast_out gives)."""
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(out_ty)
    return y


@triton.jit
def _one_plus_exp_neg(g, LIBDEVICE: tl.constexpr):
    """1 + exp(-g) in float32. LIBDEVICE (the GPU): CUDA's own expf, the one torch's silu
    kernels call, instead of Triton's ex2.approx-based tl.exp (a few ulp off for large |g|);
    the interpreter has no libdevice."""
    if LIBDEVICE:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    return 1.0 + e


@triton.jit
def _swiglu_fwd_kernel(
    g_ptr, u_ptr, y_ptr, n, MANUAL_BF16: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ty = y_ptr.dtype.element_ty
    a = _cast_out(tl.math.div_rn(g, _one_plus_exp_neg(g, LIBDEVICE)), ty, MANUAL_BF16)
    a = a.to(tl.float32)
    tl.store(y_ptr + offs, _cast_out(a * u, ty, MANUAL_BF16), mask=m)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr,
    g_ptr,
    u_ptr,
    dg_ptr,
    du_ptr,
    n,
    HAS_DG: tl.constexpr,
    HAS_DU: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    ty = g_ptr.dtype.element_ty
    e = _one_plus_exp_neg(g, LIBDEVICE)
    if HAS_DU:
        a = _cast_out(tl.math.div_rn(g, e), ty, MANUAL_BF16).to(tl.float32)
        tl.store(du_ptr + offs, _cast_out(dy * a, ty, MANUAL_BF16), mask=m)
    if HAS_DG:
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
        da = _cast_out(dy * u, ty, MANUAL_BF16).to(tl.float32)
        s = tl.math.div_rn(1.0, e)
        dg = da * s * (1.0 + g * (1.0 - s))
        tl.store(dg_ptr + offs, _cast_out(dg, ty, MANUAL_BF16), mask=m)


# --- host side ---------------------------------------------------------------------------------


def _launch_ctx():
    if not INTERPRETED:
        return contextlib.nullcontext()
    from wmdp_fast.kernels import interpreter_launch

    return interpreter_launch()


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def forward(
    gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, gate, up), the last two contiguous (copies only of non-contiguous inputs)."""
    g, u = _flat(gate), _flat(up)
    y = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    n = g.numel()
    if n:
        with _launch_ctx():
            _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](
                g, u, y, n, MANUAL_BF16=INTERPRETED and g.dtype == torch.bfloat16,
                LIBDEVICE=not INTERPRETED, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip
    return y, g, u


def backward(dy, g, u, need_dg: bool, need_du: bool):
    """(d_gate or None, d_up or None), contiguous, in g's dtype."""
    dy = _flat(dy)
    dg = torch.empty_like(g) if need_dg else None
    du = torch.empty_like(u) if need_du else None
    n = g.numel()
    if n and (need_dg or need_du):
        with _launch_ctx():
            _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](
                dy, g, u, g if dg is None else dg, u if du is None else du, n,
                HAS_DG=need_dg, HAS_DU=need_du,
                MANUAL_BF16=INTERPRETED and g.dtype == torch.bfloat16,
                LIBDEVICE=not INTERPRETED, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        y, g, u = forward(gate, up)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    @once_differentiable  # a second-order gradient raises instead of being silently 0
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        return backward(dy, g, u, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton twin of `ops.swiglu` (arguments already checked: same shape, dtype, device)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    return forward(gate, up)[0]
