"""Activation-cache packing: per-position symmetric absmax int8 (plus a float32 scale), and the
matching unpack.

One program per position (row of D values): pass 1 finds absmax over the row, pass 2 writes
`q = floor(x / scale + 0.5)` clamped to [-127, 127] with `scale = absmax / 127` (IEEE division,
so the bits equal `reference.int8_quantize`). Pass 2 re-reads the row from cache (L1/L2),
not from memory. The loss kernels in rmu_mse.py dequantise int8 cache
entries themselves; `unpack_int8` is for callers that want the tensor back.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from wmdp_fast.reference import INT8_QMAX, PackedActivations

MAX_BLOCK_D = 2048
# triton.jit picked the interpreter for this module's kernels iff TRITON_INTERPRET was set when
# it was imported (kernels.load sets it for the interpreted copy).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _max_keep_nan(a, b):
    # tl.maximum / tl.max drop NaN by default; a NaN must reach the scale (the host raises)
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _pack_int8_kernel(
    x_ptr,
    x_sb,
    x_st,
    x_sd,
    q_ptr,
    s_ptr,
    T,
    D,
    QMAX: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row - b * T
    x_row = x_ptr + b * x_sb + t * x_st
    amax = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_row + cols * x_sd, mask=cols < D, other=0.0).to(tl.float32)
        amax = _max_keep_nan(amax, tl.abs(x))
    # div_rn: Triton's `/` on float32 compiles to div.full.f32 (approximate, up to 2 ulp) on
    # the GPU; the interpreter and the reference divide exactly
    scale = tl.math.div_rn(tl.reduce(amax, 0, _max_keep_nan), QMAX)
    tl.store(s_ptr + row, scale)
    safe = tl.where(scale > 0, scale, 1.0)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_row + cols * x_sd, mask=cols < D, other=0.0).to(tl.float32)
        q = tl.floor(tl.math.div_rn(x, safe) + 0.5)
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
        tl.store(q_ptr + row * D + cols, q.to(tl.int8), mask=cols < D)


@triton.jit
def _cast_out(x, out_ty: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """x (float32) -> out_ty, rounding to nearest even (see rmu_mse._cast_out). A copy, not an
    import: kernels.load re-executes each kernel module for its interpreted twin, and a shared
    helper module imported first under TRITON_INTERPRET=1 would hand the compiled kernels an
    interpreted function."""
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(out_ty)
    return y


@triton.jit
def _unpack_int8_kernel(q_ptr, s_ptr, out_ptr, D, MANUAL_BF16: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(s_ptr + row)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + row * D + cols, mask=cols < D, other=0).to(tl.float32)
        y = _cast_out(q * scale, out_ptr.dtype.element_ty, MANUAL_BF16)
        tl.store(out_ptr + row * D + cols, y, mask=cols < D)


def _settings(D: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(D), MAX_BLOCK_D)
    return block, 4 if block >= 1024 else (2 if block >= 256 else 1)


def _launch_ctx():
    if not INTERPRETED:
        return contextlib.nullcontext()
    from wmdp_fast.kernels import interpreter_launch

    return interpreter_launch()


def pack_int8(hidden: torch.Tensor) -> PackedActivations:
    """[..., D] float tensor (any strides) -> PackedActivations(fmt="int8"), data contiguous."""
    x = hidden.detach()
    D = x.shape[-1]
    if x.dim() == 1:
        x3 = x.view(1, 1, D)
    elif x.dim() == 2:
        x3 = x.unsqueeze(0)
    else:
        x3 = x.reshape(-1, x.shape[-2], D)
    B, T, _ = x3.shape
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    block, num_warps = _settings(D)
    with _launch_ctx():
        _pack_int8_kernel[(B * T,)](
            x3, *x3.stride(), q, scale, T, D, QMAX=INT8_QMAX, BLOCK_D=block, num_warps=num_warps
        )
    return PackedActivations(q, scale, "int8", hidden.dtype)


def unpack_int8(packed: PackedActivations, dtype: torch.dtype) -> torch.Tensor:
    """q * scale (float32) cast to `dtype`, in one pass."""
    q = packed.data.contiguous()
    scale = packed.scale.contiguous()
    D = q.shape[-1]
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    block, num_warps = _settings(D)
    with _launch_ctx():
        _unpack_int8_kernel[(scale.numel(),)](
            q,
            scale,
            out,
            D,
            MANUAL_BF16=INTERPRETED and dtype == torch.bfloat16,
            BLOCK_D=block,
            num_warps=num_warps,
        )
    return out
