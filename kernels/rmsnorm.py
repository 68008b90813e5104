"""Fused RMSNorm (Llama / Mistral / Qwen2 form), forward and backward.

The eager HF module is about seven kernels forward (to float32, pow, mean, rsqrt, mul, to the
input dtype, mul by the weight) and more backward, each a full pass over the activations. Here:

  forward   one program per row: reads x once, sums x^2 in float32, writes
            `y = w * round_x(x * rstd)` and the row's float32 rstd (4 bytes per row, for the
            backward); nothing else is saved (eager keeps float32 copies of x).
  backward  reads dy and x once per row: `gh = round_x(dy * w)` (the gradient eager hands the
            `.to(input_dtype)`), `dx = rstd * gh - (sum(gh * x) * rstd^3 / D) * x`. When the
            weight needs a gradient, each program takes a contiguous block of rows and keeps a
            float32 partial of `sum_rows round_y(dy * round_x(x * rstd))` in registers, stores
            it, and a second kernel sums the partials column by column in program order.
            No float atomics: bitwise the same result on every run on a given GPU.

Rounding follows `reference.rms_norm` (the HF code) step for step: `x * rstd` is rounded to x's
dtype before the weight multiplies it, and the product to the output dtype
`torch.promote_types(w.dtype, x.dtype)`; the backward rounds where eager's autograd holds a
tensor of a narrower dtype. What differs: the order of the float32 sums (x^2 over the row;
the weight gradient's sum over rows), so float32 results agree to a few ulp, not bitwise.

Rows must fit one block (D <= MAX_D); `wmdp_fast.ops.rms_norm` runs the reference beyond that.
Use these through `wmdp_fast.ops` (argument checks live there).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

MAX_D = 65536
DW_BLOCK = 256  # columns per program of the weight-gradient sum
# triton.jit picked the interpreter for this module's kernels iff TRITON_INTERPRET was set when
# it was imported (kernels.load sets it for the interpreted copy).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _cast_out(x, out_ty: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """x (float32) -> out_ty, rounding to nearest even (see rmu_mse._cast_out; a copy, not an
    import, for the reason pack._cast_out gives). MANUAL_BF16: Triton's interpreter truncates
    float32 -> bf16 (the GPU rounds)."""
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(out_ty)
    return y


@triton.jit
def _round(x, ty: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """x (float32) rounded to `ty` and back to float32 (what a tensor of dtype ty holds)."""
    return _cast_out(x, ty, MANUAL_BF16).to(tl.float32)


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    x_stride,
    w_ptr,
    y_ptr,
    rstd_ptr,
    D,
    inv_d,
    eps,
    X_BF16: tl.constexpr,
    Y_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    x = tl.load(x_ptr + row * x_stride + cols, mask=m, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) * inv_d + eps)
    tl.store(rstd_ptr + row, rstd)
    h = _round(x * rstd, x_ptr.dtype.element_ty, X_BF16)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    y = _cast_out(w * h, y_ptr.dtype.element_ty, Y_BF16)
    tl.store(y_ptr + row * D + cols, y, mask=m)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    dy_stride,
    x_ptr,
    x_stride,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    part_ptr,
    n_rows,
    rows_per_prog,
    D,
    inv_d,
    X_BF16: tl.constexpr,
    Y_BF16: tl.constexpr,
    HAS_DX: tl.constexpr,
    HAS_DW: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows [pid * rows_per_prog, ...) of dx; with HAS_DW, the block's weight-gradient partial
    (float32) into part_ptr[pid, :]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_prog
    last = tl.minimum(first + rows_per_prog, n_rows)
    for row in range(first, last):
        dy = tl.load(dy_ptr + row * dy_stride + cols, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_stride + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        if HAS_DX:
            # eager: grad of `w * h.to(dtype)` w.r.t. the rounded h, cast back to float32
            gh = _round(dy * w, x_ptr.dtype.element_ty, X_BF16)
            c = tl.sum(gh * x, axis=0) * (rstd * rstd * rstd) * inv_d
            dx = _cast_out(rstd * gh - c * x, dx_ptr.dtype.element_ty, X_BF16)
            tl.store(dx_ptr + row * D + cols, dx, mask=m)
        if HAS_DW:
            h = _round(x * rstd, x_ptr.dtype.element_ty, X_BF16)
            acc += _round(dy * h, dy_ptr.dtype.element_ty, Y_BF16)
    if HAS_DW:
        tl.store(part_ptr + pid.to(tl.int64) * D + cols, acc, mask=m)


@triton.jit
def _sum_partials_kernel(part_ptr, n_parts, dw_ptr, D, DW_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """dw[cols] = sum over p = 0, 1, ... of part[p, cols] in float32, in that order."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in range(0, n_parts):
        acc += tl.load(part_ptr + p * D + cols, mask=m, other=0.0)
    tl.store(dw_ptr + cols, _cast_out(acc, dw_ptr.dtype.element_ty, DW_BF16), mask=m)


# --- host side ---------------------------------------------------------------------------------


def block_settings(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): the whole row in one block (Liger-Kernel's rms_norm choice)."""
    block = triton.next_power_of_2(D)
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    else:
        num_warps = 4 if block >= 512 else 2
    return block, num_warps


def _launch_ctx():
    if not INTERPRETED:
        return contextlib.nullcontext()
    from wmdp_fast.kernels import interpreter_launch

    return interpreter_launch()


def _bf16(t: torch.Tensor) -> bool:
    return INTERPRETED and t.dtype == torch.bfloat16


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [n, D] with a unit column stride (a view when the strides allow it)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _dw_programs(n_rows: int, device: torch.device) -> int:
    """How many row blocks the weight gradient is split into (fixed per device and shape, so
    the summation order, and so the bits, are the same on every run)."""
    if device.type == "cuda":
        from wmdp_fast.kernels import sm_count

        n = sm_count(device) * 2
    else:
        n = 4  # interpreter: few partials
    return max(1, min(n_rows, n))


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """(y [..., D] in promote_types(weight, x), rstd float32 [n_rows], x as [n_rows, D])."""
    D = x.shape[-1]
    x2 = _rows(x)
    n = x2.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n:
        block, warps = block_settings(D)
        with _launch_ctx():
            _rms_norm_fwd_kernel[(n,)](
                x2, x2.stride(0), weight, y, rstd, D, 1.0 / D, float(eps),
                X_BF16=_bf16(x), Y_BF16=_bf16(y), BLOCK_D=block, num_warps=warps,
            )  # fmt: skip
    return y, rstd, x2


def backward(dy, x2, weight, rstd, need_dx: bool, need_dw: bool):
    """(dx like x2 or None, dw like weight or None) for dy [..., D]."""
    n, D = x2.shape
    dy2 = _rows(dy)
    dx = torch.empty_like(x2, memory_format=torch.contiguous_format) if need_dx else None
    dw = None
    if n == 0:
        return dx, (torch.zeros_like(weight) if need_dw else None)
    if need_dw:
        progs = _dw_programs(n, x2.device)
        per = triton.cdiv(n, progs)
        progs = triton.cdiv(n, per)
        part = torch.empty(progs, D, dtype=torch.float32, device=x2.device)
    else:
        progs, per, part = n, 1, rstd  # part unused
    block, warps = block_settings(D)
    with _launch_ctx():
        _rms_norm_bwd_kernel[(progs,)](
            dy2, dy2.stride(0), x2, x2.stride(0), weight, rstd,
            dx if need_dx else x2, part, n, per, D, 1.0 / D,
            X_BF16=_bf16(x2), Y_BF16=_bf16(dy2), HAS_DX=need_dx, HAS_DW=need_dw,
            BLOCK_D=block, num_warps=warps,
        )  # fmt: skip
        if need_dw:
            dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
            _sum_partials_kernel[(triton.cdiv(D, DW_BLOCK),)](
                part, progs, dw, D, DW_BF16=_bf16(dw), BLOCK=DW_BLOCK, num_warps=4
            )
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd, x2 = forward(x, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    @once_differentiable  # a second-order gradient raises instead of being silently 0
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = backward(dy, x2, weight, rstd, need_dx, need_dw)
        return (None if dx is None else dx.view(ctx.x_shape)), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton twin of `ops.rms_norm` (arguments already checked)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps)
    return forward(x, weight, eps)[0]
