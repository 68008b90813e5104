"""Fused RMU activation-MSE loss: forward and backward in one pass over the activations.

`scale * mean((hidden - target)^2)` for a decoder layer's output `hidden` [B, T, D] against a
broadcast control vector [D] / [1, 1, D], the frozen model's output [B, T, D] or a packed
int8/bf16 cache entry (dequantised here, in registers). One program per position (row):

  stage 1  reads the row of `hidden` and `target` once, accumulates sum((h - t)^2) in float32
           into one partial per row, and writes the gradient `2 * scale / count * (h - t)` in
           hidden's dtype (float32 for float16 hidden, cast in the backward) in the same pass
           (masked-out rows get zeros and are never read);
  stage 2  one program sums the row partials in a fixed order and applies scale / count.

No float atomics: the same inputs give bitwise the same loss and gradient on every run. The
FIRST backward through a graph scales the stored gradient in place by grad_output, in a kernel
that exits at once when grad_output == 1 (checked on the device: no host sync, no memory
traffic). The stored gradient is then spent: a later backward through the same graph
(retain_graph=True), and any backward with create_graph=True, recompute the gradient from
hidden and the target with differentiable torch ops (`reference.rmu_mse_grad`), so that
neither depends on what an earlier grad_output did to the buffer (a grad_output of 0 used to
leave 0 / 0 = NaN for the next one) and second-order gradients flow. `rmu_loss` runs RMU's
forget and retain terms in ONE stage-1 launch (programs [0, N_f) take the forget rows, the
rest the retain rows) and one stage-2 launch.

Opt-in "fused finish" (WMDP_FAST_RMU_MSE_FUSED_FINISH=1, read at every call; default 0): no
stage-2 launch. Each stage-1 program stores its partial and takes a ticket from a per-device
int32 counter; the program that draws the last ticket runs stage 2's code (the same fixed
order) and puts the counter back to 0 for the next launch. See `_last_program_finishes` for why
this is correct on the GPU and `_ticket_counter` for the counter's rules (one stream at a time).

Opt-in launch configs (WMDP_FAST_RMU_MSE_CONFIG, read at every call; unset = the launches
above, with the backward's rescale on 2 programs per SM, measured best on an H200): positions
per program, block size, warps, programmatic dependent launch of the finish kernel, grid of the
backward's rescale (`launch_config`). They exist so that
benchmarks/bench_rmu_mse_tune.py can pick the defaults per shape class on a GPU; every config
gives the default's gradient bits and a deterministic loss.

Use these through `wmdp_fast.ops` (argument checks live there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tlcuda

from wmdp_fast import reference
from wmdp_fast.errors import ConfigError
from wmdp_fast.reference import PackedActivations

log = logging.getLogger("wmdp_fast")

MAX_BLOCK_D = 2048
FINISH_BLOCK = 4096
RESCALE_BLOCK = 4096
FINISH_WARPS = 8
FUSED_FINISH_ENV = "WMDP_FAST_RMU_MSE_FUSED_FINISH"
# triton.jit picked the interpreter for this module's kernels iff TRITON_INTERPRET was set when
# it was imported (kernels.load sets it for the interpreted copy).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@triton.jit
def _cast_out(x, out_ty: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """x (float32) -> out_ty, rounding to nearest even. MANUAL_BF16 does the bf16 rounding on
    the bits: Triton's interpreter truncates float32 -> bf16 (the GPU rounds)."""
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(out_ty)
    return y


@triton.jit
def _mse_row(
    row,
    h_ptr,
    h_sb,
    h_st,
    h_sd,
    t_ptr,
    t_sb,
    t_st,
    t_sd,
    s_ptr,
    s_sb,
    s_st,
    m_ptr,
    m_sb,
    m_st,
    g_ptr,
    T,
    D,
    grad_scale,
    HAS_MASK: tl.constexpr,
    TARGET_INT8: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """sum((h - t)^2) over one row (position) in float32; writes grad_scale * (h - t)."""
    row = row.to(tl.int64)
    b = row // T
    t = row - b * T
    n_live = D  # columns to read: all, or none for a masked-out row
    if HAS_MASK:
        n_live = tl.where(tl.load(m_ptr + b * m_sb + t * m_st) != 0, D, 0)
    h_row = h_ptr + b * h_sb + t * h_st
    t_row = t_ptr + b * t_sb + t * t_st
    if TARGET_INT8:
        qscale = tl.load(s_ptr + b * s_sb + t * s_st)
        if HAS_MASK:  # a masked-out row must not see its scale (a corrupt cache may hold NaN)
            qscale = tl.where(n_live > 0, qscale, 0.0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        in_row = cols < D
        live = cols < n_live
        h = tl.load(h_row + cols * h_sd, mask=live, other=0.0).to(tl.float32)
        tv = tl.load(t_row + cols * t_sd, mask=live, other=0).to(tl.float32)
        if TARGET_INT8:
            tv = tv * qscale
        diff = h - tv
        acc += diff * diff
        if WRITE_GRAD:
            g = _cast_out(diff * grad_scale, g_ptr.dtype.element_ty, MANUAL_BF16)
            tl.store(g_ptr + row * D + cols, g, mask=in_row)
    return tl.sum(acc, axis=0)


@triton.jit
def _mse_rows(
    row0,
    n_rows,
    h_ptr,
    h_sb,
    h_st,
    h_sd,
    t_ptr,
    t_sb,
    t_st,
    t_sd,
    s_ptr,
    s_sb,
    s_st,
    m_ptr,
    m_sb,
    m_st,
    g_ptr,
    T,
    D,
    grad_scale,
    HAS_MASK: tl.constexpr,
    TARGET_INT8: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """`_mse_row` for ROWS rows at once ([ROWS, BLOCK_D] tiles; rows past n_rows are neither
    read nor written): (per-row sums [ROWS], row indices [ROWS], rows that exist [ROWS])."""
    rows = row0.to(tl.int64) + tl.arange(0, ROWS)
    exists = rows < n_rows
    b = rows // T
    t = rows - b * T
    live_row = exists  # rows to read: not the masked-out ones
    if HAS_MASK:
        live_row = live_row & (tl.load(m_ptr + b * m_sb + t * m_st, mask=exists, other=0) != 0)
    h_row = (h_ptr + b * h_sb + t * h_st)[:, None]
    t_row = (t_ptr + b * t_sb + t * t_st)[:, None]
    if TARGET_INT8:  # a masked-out row must not see its scale (a corrupt cache may hold NaN)
        qscale = tl.load(s_ptr + b * s_sb + t * s_st, mask=live_row, other=0.0)[:, None]
    g_row = (g_ptr + rows * D)[:, None]
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = (start + tl.arange(0, BLOCK_D))[None, :]
        in_row = cols < D
        # a row-constant mask AND the column mask: `cols < n_live` per row (as `_mse_row`
        # does) kept Triton from vectorising the loads (scalar ld.global.b16 in sm_90 PTX)
        live = live_row[:, None] & in_row
        h = tl.load(h_row + cols * h_sd, mask=live, other=0.0).to(tl.float32)
        tv = tl.load(t_row + cols * t_sd, mask=live, other=0).to(tl.float32)
        if TARGET_INT8:
            tv = tv * qscale
        diff = h - tv
        acc += diff * diff
        if WRITE_GRAD:
            g = _cast_out(diff * grad_scale, g_ptr.dtype.element_ty, MANUAL_BF16)
            tl.store(g_row + cols, g, mask=exists[:, None] & in_row)
    return tl.sum(acc, axis=1), rows, exists


@triton.jit(do_not_specialize=["n_rows"])  # only read by the fused finish: no extra variants
def _rmu_mse_kernel(
    part_ptr,
    cnt_ptr,
    out_ptr,
    n_rows,
    loss_mul,
    h_ptr,
    h_sb,
    h_st,
    h_sd,
    t_ptr,
    t_sb,
    t_st,
    t_sd,
    s_ptr,
    s_sb,
    s_st,
    m_ptr,
    m_sb,
    m_st,
    g_ptr,
    T,
    D,
    grad_scale,
    HAS_MASK: tl.constexpr,
    TARGET_INT8: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FUSED_FINISH: tl.constexpr,
    FINISH_BLOCK: tl.constexpr,
    ROWS: tl.constexpr = 1,
    LAUNCH_DEPENDENTS: tl.constexpr = False,
):
    """Stage 1 of one term, grid (cdiv(n_rows, ROWS),): each program the partials of ROWS
    positions (one per position, and their gradient). With FUSED_FINISH, also stage 2 in the
    last program (cnt_ptr, out_ptr, loss_mul are only read then). LAUNCH_DEPENDENTS lets a
    finish kernel launched with programmatic dependent launch start early (it waits anyway)."""
    if LAUNCH_DEPENDENTS:
        tlcuda.gdc_launch_dependents()
    if ROWS == 1:
        row = tl.program_id(0)
        s = _mse_row(
            row, h_ptr, h_sb, h_st, h_sd, t_ptr, t_sb, t_st, t_sd, s_ptr, s_sb, s_st,
            m_ptr, m_sb, m_st, g_ptr, T, D, grad_scale,
            HAS_MASK, TARGET_INT8, WRITE_GRAD, MANUAL_BF16, BLOCK_D,
        )  # fmt: skip
        _emit_partial(
            part_ptr, s, cnt_ptr, n_rows, n_rows, loss_mul, 0.0, out_ptr, FUSED_FINISH,
            FINISH_BLOCK,
        )  # fmt: skip
    else:
        s, rows, exists = _mse_rows(
            tl.program_id(0) * ROWS, n_rows, h_ptr, h_sb, h_st, h_sd, t_ptr, t_sb, t_st, t_sd,
            s_ptr, s_sb, s_st, m_ptr, m_sb, m_st, g_ptr, T, D, grad_scale,
            HAS_MASK, TARGET_INT8, WRITE_GRAD, MANUAL_BF16, ROWS, BLOCK_D,
        )  # fmt: skip
        _emit_partials(
            part_ptr, s, rows, exists, cnt_ptr, n_rows, n_rows, loss_mul, 0.0, out_ptr,
            FUSED_FINISH, FINISH_BLOCK,
        )  # fmt: skip


@triton.jit(do_not_specialize=["n_total"])  # only read by the fused finish
def _rmu_loss_kernel(
    part_ptr,
    cnt_ptr,
    out_ptr,
    n_total,
    f_loss_mul,
    r_loss_mul,
    n_forget,
    fh_ptr,
    fh_sb,
    fh_st,
    fh_sd,
    ft_ptr,
    ft_sb,
    ft_st,
    ft_sd,
    fs_ptr,
    fs_sb,
    fs_st,
    fm_ptr,
    fm_sb,
    fm_st,
    fg_ptr,
    fT,
    fD,
    f_grad_scale,
    rh_ptr,
    rh_sb,
    rh_st,
    rh_sd,
    rt_ptr,
    rt_sb,
    rt_st,
    rt_sd,
    rs_ptr,
    rs_sb,
    rs_st,
    rm_ptr,
    rm_sb,
    rm_st,
    rg_ptr,
    rT,
    rD,
    r_grad_scale,
    F_HAS_MASK: tl.constexpr,
    F_TARGET_INT8: tl.constexpr,
    F_WRITE_GRAD: tl.constexpr,
    F_MANUAL_BF16: tl.constexpr,
    R_HAS_MASK: tl.constexpr,
    R_TARGET_INT8: tl.constexpr,
    R_WRITE_GRAD: tl.constexpr,
    R_MANUAL_BF16: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FUSED_FINISH: tl.constexpr,
    FINISH_BLOCK: tl.constexpr,
    ROWS: tl.constexpr = 1,
    LAUNCH_DEPENDENTS: tl.constexpr = False,
):
    """Stage 1 of both RMU terms, grid (n_total,): programs [0, n_forget) take the forget rows,
    the rest the retain rows. With FUSED_FINISH, also stage 2 in the last program. ROWS > 1:
    grid (cdiv(n_forget, ROWS) + cdiv(n_total - n_forget, ROWS),), ROWS rows per program,
    still one partial per row (the retain rows' from n_forget on)."""
    if LAUNCH_DEPENDENTS:
        tlcuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    if ROWS > 1:
        f_progs = (n_forget + ROWS - 1) // ROWS
        if pid < f_progs:
            s, rows, exists = _mse_rows(
                pid * ROWS, n_forget, fh_ptr, fh_sb, fh_st, fh_sd, ft_ptr, ft_sb, ft_st, ft_sd,
                fs_ptr, fs_sb, fs_st, fm_ptr, fm_sb, fm_st, fg_ptr, fT, fD, f_grad_scale,
                F_HAS_MASK, F_TARGET_INT8, F_WRITE_GRAD, F_MANUAL_BF16, ROWS, BLOCK_D,
            )  # fmt: skip
            idx = rows
        else:
            s, rows, exists = _mse_rows(
                (pid - f_progs) * ROWS, n_total - n_forget, rh_ptr, rh_sb, rh_st, rh_sd,
                rt_ptr, rt_sb, rt_st, rt_sd, rs_ptr, rs_sb, rs_st, rm_ptr, rm_sb, rm_st, rg_ptr,
                rT, rD, r_grad_scale,
                R_HAS_MASK, R_TARGET_INT8, R_WRITE_GRAD, R_MANUAL_BF16, ROWS, BLOCK_D,
            )  # fmt: skip
            idx = rows + n_forget
        _emit_partials(
            part_ptr, s, idx, exists, cnt_ptr, n_forget, n_total, f_loss_mul, r_loss_mul,
            out_ptr, FUSED_FINISH, FINISH_BLOCK,
        )  # fmt: skip
    else:
        if pid < n_forget:
            s = _mse_row(
                pid, fh_ptr, fh_sb, fh_st, fh_sd, ft_ptr, ft_sb, ft_st, ft_sd, fs_ptr, fs_sb, fs_st,
                fm_ptr, fm_sb, fm_st, fg_ptr, fT, fD, f_grad_scale,
                F_HAS_MASK, F_TARGET_INT8, F_WRITE_GRAD, F_MANUAL_BF16, BLOCK_D,
            )  # fmt: skip
        else:
            s = _mse_row(
                pid - n_forget, rh_ptr, rh_sb, rh_st, rh_sd, rt_ptr, rt_sb, rt_st, rt_sd,
                rs_ptr, rs_sb, rs_st, rm_ptr, rm_sb, rm_st, rg_ptr, rT, rD, r_grad_scale,
                R_HAS_MASK, R_TARGET_INT8, R_WRITE_GRAD, R_MANUAL_BF16, BLOCK_D,
            )  # fmt: skip
        _emit_partial(
            part_ptr, s, cnt_ptr, n_forget, n_total, f_loss_mul, r_loss_mul, out_ptr,
            FUSED_FINISH, FINISH_BLOCK,
        )  # fmt: skip


@triton.jit
def _sum_partials(
    part_ptr, n_a, n_total, mul_a, mul_b, out_ptr, BLOCK: tl.constexpr, CACHE: tl.constexpr
):
    """out = [a + b, a, b] with a = mul_a * sum(part[:n_a]), b = mul_b * sum(part[n_a:]),
    summed in a fixed order by one program (the finish kernel's body, and the fused finish's:
    one copy of the code, so both sum in the same order). CACHE: the partials' load modifier."""
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_total, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        v = tl.load(part_ptr + idx, mask=idx < n_total, other=0.0, cache_modifier=CACHE)
        acc_a += tl.where(idx < n_a, v, 0.0)
        acc_b += tl.where(idx >= n_a, v, 0.0)
    a = tl.sum(acc_a, axis=0) * mul_a
    b = tl.sum(acc_b, axis=0) * mul_b
    tl.store(out_ptr, a + b)
    tl.store(out_ptr + 1, a)
    tl.store(out_ptr + 2, b)


@triton.jit
def _finish_kernel(
    part_ptr, n_a, n_total, mul_a, mul_b, out_ptr, BLOCK: tl.constexpr, WAIT: tl.constexpr = False
):
    """Stage 2 as its own one-program launch (the default). WAIT: launched with programmatic
    dependent launch, so first wait until stage 1 has finished and its partials are visible."""
    if WAIT:
        tlcuda.gdc_wait()
    _sum_partials(part_ptr, n_a, n_total, mul_a, mul_b, out_ptr, BLOCK, "")


@triton.jit
def _last_program_finishes(
    part_ptr, s, cnt_ptr, n_a, n_total, mul_a, mul_b, out_ptr, FINISH_BLOCK: tl.constexpr
):
    """Fused finish: store this program's partial, take a ticket; the last program (ticket
    n_total - 1) runs stage 2 and resets the counter.

    The single-pass "last block" reduction of NVIDIA's cuda-samples threadFenceReduction
    (reduceSinglePass: __threadfence, atomicInc ticket, the last block sums, resets the count)
    and of the CUDA Programming Guide's memory-fence example, written with Triton's ordered
    atomics as torch inductor's triton_helpers.x_grid_barrier does (debug_barrier, then
    atomic_add with sem=release; acquire on the reading side). Why the last program sees every
    partial (PTX ISA, memory consistency model):
    - a scalar store and a scalar atomic_add are each done by one thread of the program (in
      triton 3.9's sm_90 code both by thread 0; the ticket reaches the other threads through
      shared memory and a bar.sync); the debug_barrier (bar.sync) between them orders the
      partial's store before the ticket whichever thread stored it (causality order includes
      CTA barriers);
    - atomic_add(sem="acq_rel", scope="gpu") is a gpu-scope release: the store is visible
      gpu-wide no later than the counter's new value (cumulative release);
    - all tickets are RMWs of one location, so every earlier program's release precedes the
      last ticket in observation order (RMW chain), and the last program's acquire then
      synchronizes with each of them;
    - after the acquire, a second debug_barrier makes it cover all threads of the last
      program, and the partials are loaded with .cg (L2, not the SM's non-coherent L1), so no
      stale line can be read even if the compiler or hardware acquire did not invalidate L1.
    On sm_90 this compiles to MEMBAR.ALL.GPU; ATOMG.E.ADD.STRONG.GPU; CCTL.IVALL (L1
    invalidated) and LDG.E.128.STRONG.GPU partial loads (tests/test_kernels_rmu.py checks the
    PTX). The membar costs each program the wait for its own stores; whether that is less than
    the launch it saves is what the benchmark's fused-ff row measures.
    The reset is a plain store: every other program has already taken its ticket, and the next
    launch on the stream starts after this one ends. Programs run in any order on the GPU; the
    sum does not depend on which one is last (it reads part[0..n_total) in a fixed order).
    """
    pid = tl.program_id(0)
    tl.store(part_ptr + pid, s)
    _ticket_finish(part_ptr, cnt_ptr, n_total, n_a, n_total, mul_a, mul_b, out_ptr, FINISH_BLOCK)


@triton.jit
def _ticket_finish(
    part_ptr, cnt_ptr, n_progs, n_a, n_total, mul_a, mul_b, out_ptr, FINISH_BLOCK: tl.constexpr
):
    """The ticket of `_last_program_finishes` (this program's partials already stored): the
    program that draws ticket n_progs - 1 sums part[0..n_total) and resets the counter."""
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == n_progs - 1:
        tl.debug_barrier()
        _sum_partials(part_ptr, n_a, n_total, mul_a, mul_b, out_ptr, FINISH_BLOCK, ".cg")
        tl.store(cnt_ptr, 0)


@triton.jit
def _emit_partial(
    part_ptr,
    s,
    cnt_ptr,
    n_a,
    n_total,
    mul_a,
    mul_b,
    out_ptr,
    FUSED_FINISH: tl.constexpr,
    FINISH_BLOCK: tl.constexpr,
):
    """Store this program's partial; with FUSED_FINISH, the last program also runs stage 2."""
    if FUSED_FINISH:
        _last_program_finishes(
            part_ptr, s, cnt_ptr, n_a, n_total, mul_a, mul_b, out_ptr, FINISH_BLOCK
        )
    else:
        tl.store(part_ptr + tl.program_id(0), s)


@triton.jit
def _emit_partials(
    part_ptr,
    s,
    idx,
    exists,
    cnt_ptr,
    n_a,
    n_total,
    mul_a,
    mul_b,
    out_ptr,
    FUSED_FINISH: tl.constexpr,
    FINISH_BLOCK: tl.constexpr,
):
    """`_emit_partial` for a program of ROWS rows: part[idx] = s where the row exists; with
    FUSED_FINISH the last of the grid's programs (not rows) runs stage 2."""
    tl.store(part_ptr + idx, s, mask=exists)
    if FUSED_FINISH:
        _ticket_finish(
            part_ptr, cnt_ptr, tl.num_programs(0), n_a, n_total, mul_a, mul_b, out_ptr,
            FINISH_BLOCK,
        )  # fmt: skip


@triton.jit
def _rescale_kernel(
    a_ptr,
    b_ptr,
    f_ptr,
    na,
    nb,
    blocks_a,
    A_MANUAL_BF16: tl.constexpr,
    B_MANUAL_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
    GRID_STRIDE: tl.constexpr = False,
):
    """a *= f and b *= f in place (blocks [0, blocks_a) of BLOCK elements are a's); nothing
    when f == 1. One program per block, or (GRID_STRIDE) a smaller grid whose programs loop
    over the blocks: then the usual f == 1 case launches a few hundred programs that exit at
    once instead of one per block."""
    f = tl.load(f_ptr)
    if f != 1.0:
        if GRID_STRIDE:
            n_blocks = blocks_a + tl.cdiv(nb, BLOCK)
            for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
                _rescale_block(
                    blk, a_ptr, b_ptr, f, na, nb, blocks_a, A_MANUAL_BF16, B_MANUAL_BF16, BLOCK
                )
        else:
            _rescale_block(
                tl.program_id(0), a_ptr, b_ptr, f, na, nb, blocks_a, A_MANUAL_BF16,
                B_MANUAL_BF16, BLOCK,
            )  # fmt: skip


@triton.jit
def _rescale_block(
    pid,
    a_ptr,
    b_ptr,
    f,
    na,
    nb,
    blocks_a,
    A_MANUAL_BF16: tl.constexpr,
    B_MANUAL_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if pid < blocks_a:
        offs = tl.cast(pid, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(a_ptr + offs, mask=offs < na, other=0.0).to(tl.float32)
        y = _cast_out(x * f, a_ptr.dtype.element_ty, A_MANUAL_BF16)
        tl.store(a_ptr + offs, y, mask=offs < na)
    else:
        offs = tl.cast(pid - blocks_a, tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(b_ptr + offs, mask=offs < nb, other=0.0).to(tl.float32)
        y = _cast_out(x * f, b_ptr.dtype.element_ty, B_MANUAL_BF16)
        tl.store(b_ptr + offs, y, mask=offs < nb)


# --- host side ---------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    # triton.cdiv / next_power_of_2 are constexpr_functions since triton 3.5: about 2 us per
    # host call (argument unwrapping), 4 calls per forward + backward; these are plain ints
    return 1 << (n - 1).bit_length() if n > 1 else 1


def block_settings(D: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for rows of D elements. H100 sweeps (bf16, benchmarks/
    bench_rmu_mse_tune.py): at (8, 2048, 8192) every setting from 1024 to 8192 x 4 to 16 warps
    reached 2.9 TB/s; at (4, 768, 4096) blocks of 1024-2048 with 4 warps beat 4096 x 8 (more
    programs resident per SM). With this setting the whole forward + backward takes 33 us of
    GPU time there (2.3 TB/s effective)."""
    block = min(_next_pow2(D), MAX_BLOCK_D)
    num_warps = 4 if block >= 1024 else (2 if block >= 256 else 1)
    return block, num_warps


CONFIG_ENV = "WMDP_FAST_RMU_MSE_CONFIG"
_CONFIG_KEYS = {
    "block": (16, 16384),
    "warps": (1, 16),
    "rows": (1, 64),
    "pdl": (0, 1),
    "rprogs": (0, 1 << 20),
}
POW2_KEYS = ("block", "warps", "rows")
_parsed_configs: dict[str, dict] = {}


def _parse_config(value: str) -> dict:
    """'block=2048,warps=4,rows=2,pdl=1' (any subset) -> {key: int}; ConfigError if malformed."""
    cfg = _parsed_configs.get(value)
    if cfg is not None:
        return cfg
    cfg = {}
    for item in filter(None, (x.strip() for x in value.split(","))):
        key, _, num = item.partition("=")
        key = key.strip()
        lo, hi = _CONFIG_KEYS.get(key, (None, None))
        try:
            v = int(num)
        except ValueError:
            v = None
        pow2 = v is not None and v > 0 and v & (v - 1) == 0
        if lo is None or v is None or not lo <= v <= hi or (key in POW2_KEYS and not pow2):
            raise ConfigError(
                f"{CONFIG_ENV}={value!r}: bad entry {item!r}; expected comma-separated "
                "block=<power of 2, 16..16384>, warps=<1|2|4|8|16>, rows=<power of 2, 1..64>, "
                "pdl=<0|1>, rprogs=<programs of the backward's rescale, 0: one per block>, "
                "e.g. 'block=2048,warps=4,rows=2' (unset: the defaults)"
            )
        cfg[key] = v
    _parsed_configs[value] = cfg
    return cfg


def _env_config() -> dict:
    value = os.environ.get(CONFIG_ENV, "").strip()
    return _parse_config(value) if value else {}


def launch_config(D: int) -> tuple[int, int, int, bool]:
    """(BLOCK_D, num_warps, ROWS, pdl) for rows of D elements. Default (WMDP_FAST_RMU_MSE_CONFIG
    unset or empty): `block_settings(D)`, one row per program, no programmatic dependent launch.
    The variable (read at every call, for benchmarks/bench_rmu_mse_tune.py) overrides any of:
    block (BLOCK_D, at most next_power_of_2(D)), warps, rows (positions per program: a
    [rows, BLOCK_D] tile), pdl=1 (the finish kernel is launched with programmatic dependent
    launch, so its launch overlaps stage 1's tail; sm_90+, compiled GPU only); and for the
    backward's `rescale_`, rprogs=N (a grid of at most N programs looping over the blocks;
    0: one program per block; unset: 2 per SM on a GPU, `_default_rescale_programs`). Every
    setting
    gives the same gradient bits and a deterministic loss (one partial per position, summed in
    the same order); only the per-position sums' internal order may differ."""
    block, warps = block_settings(D)
    cfg = _env_config()
    if not cfg:
        return block, warps, 1, False
    block = min(cfg.get("block", block), _next_pow2(D))
    pdl = bool(cfg.get("pdl", 0)) and not INTERPRETED
    return block, cfg.get("warps", warps), cfg.get("rows", 1), pdl


def _launch_ctx():
    if not INTERPRETED:
        return contextlib.nullcontext()
    from wmdp_fast.kernels import interpreter_launch

    return interpreter_launch()


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> a [B, T, D] view (a copy only when leading dims cannot be merged)."""
    if x.dim() == 3:
        return x
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


class _Term:
    """One MSE term prepared for the kernel: tensors, strides and flags."""

    def __init__(self, hidden, target, mask, count, scale, write_grad):
        self.target, self.mask, self.scale = target, mask, scale  # as given, see _Recompute
        h3 = _as_3d(hidden)
        B, T, D = h3.shape
        self.hidden, self.h3, self.T, self.D = hidden, h3, T, D
        self.n_rows = B * T
        self.count = (count if count is not None else self.n_rows) * D
        self.loss_mul = scale / self.count
        self.grad_scale = 2.0 * scale / self.count
        self.write_grad = write_grad
        self.int8 = isinstance(target, PackedActivations) and target.fmt == "int8"
        data = target.data if isinstance(target, PackedActivations) else target
        broadcast = data.shape != hidden.shape
        if broadcast:  # [D] or [1, ..., 1, D]
            t1 = data.reshape(D)
            self.t, self.t_strides = t1, (0, 0, t1.stride(0))
        else:
            t3 = _as_3d(data)
            self.t, self.t_strides = t3, tuple(t3.stride())
        if self.int8:
            sc = target.scale
            if broadcast:
                sc = sc.reshape(1)
                self.s, self.s_strides = sc, (0, 0)
            else:
                s3 = _as_3d(sc.unsqueeze(-1))
                self.s, self.s_strides = s3, tuple(s3.stride()[:2])
        else:
            self.s, self.s_strides = h3, (0, 0)
        if mask is not None:
            m = (
                mask.view(torch.uint8)
                if mask.dtype == torch.bool
                else (mask != 0).view(torch.uint8)
            )
            m3 = _as_3d(m.unsqueeze(-1))
            self.m, self.m_strides = m3, tuple(m3.stride()[:2])
        else:
            self.m, self.m_strides = h3, (0, 0)
        self.has_mask = mask is not None
        if write_grad:
            # float16 gradients are staged in float32: 2 * scale / count * (h - t) is often
            # below float16's normal range, and rounding it before the backward multiplies by
            # grad_output (e.g. a loss scale) would lose most of its bits
            dt = torch.float32 if hidden.dtype == torch.float16 else hidden.dtype
            self.grad = torch.empty(hidden.shape, dtype=dt, device=hidden.device)
        else:
            self.grad = h3  # never written (WRITE_GRAD is off)

    def args(self) -> list:
        return [
            self.h3, *self.h3.stride(), self.t, *self.t_strides, self.s, *self.s_strides,
            self.m, *self.m_strides, self.grad, self.T, self.D, self.grad_scale,
        ]  # fmt: skip

    def flags(self) -> list:
        manual_bf16 = INTERPRETED and self.hidden.dtype == torch.bfloat16
        return [self.has_mask, self.int8, self.write_grad, manual_bf16]


def _finish(
    partials: torch.Tensor, n_a: int, mul_a: float, mul_b: float, pdl: bool = False
) -> torch.Tensor:
    out = torch.empty(3, dtype=torch.float32, device=partials.device)
    extra = {"WAIT": True, "launch_pdl": True} if pdl else {}
    _finish_kernel[(1,)](
        partials, n_a, partials.numel(), mul_a, mul_b, out, BLOCK=FINISH_BLOCK,
        num_warps=FINISH_WARPS, **extra,
    )  # fmt: skip
    return out


def fused_finish_enabled() -> bool:
    """WMDP_FAST_RMU_MSE_FUSED_FINISH: 1 = fused finish, 0 or unset = the finish kernel."""
    value = os.environ.get(FUSED_FINISH_ENV, "0").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise ConfigError(
        f"{FUSED_FINISH_ENV}={value!r}: expected 1 (stage 2 fused into the main kernel's last "
        "program) or 0 / unset (the default: a separate one-program finish kernel)"
    )


_counters: dict[tuple, torch.Tensor] = {}  # (device type, index) -> int32 [1], zero between uses
_counter_streams: dict[tuple, torch.cuda.Stream] = {}  # the stream of the latest eager use
_capture_warned: set[tuple] = set()


def _ticket_counter(device: torch.device) -> torch.Tensor | None:
    """The fused finish's ticket counter for `device` (int32 [1], 0 between launches: the last
    program puts it back), or None when this call must use the finish kernel instead.

    One counter per device, zeroed once when first needed (a per-call zeroed counter would cost
    the memset launch the fused finish saves), as torch inductor's per-graph semaphores are.
    Two launches that use it at the same time would mix their tickets, so uses are kept in
    order: a call on another CUDA stream than the previous one first makes its stream wait for
    that stream (a device-side wait, no host sync), under `_counter_lock` until the launch is
    enqueued (see `_fused_finish_counter`, the only caller). Not covered, and the caller's to avoid:
    replaying a CUDA graph that holds the op while another call (or graph) using it runs on
    another stream. While a stream is capturing a CUDA graph and no counter exists yet, None:
    allocating it then would put it in the graph's private memory pool (call the op once
    before capturing, as one does anyway to compile the kernels)."""
    key = (device.type, device.index)
    counter = _counters.get(key)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if counter is None:
        if capturing:
            if key not in _capture_warned:
                _capture_warned.add(key)
                log.warning(
                    "%s=1: no ticket counter exists yet for %s and the stream is capturing a "
                    "CUDA graph, so this call uses the separate finish kernel; call the op "
                    "once before capturing to get the fused finish in the graph",
                    FUSED_FINISH_ENV,
                    device,
                )
            return None
        counter = _counters[key] = torch.zeros(1, dtype=torch.int32, device=device)
    if device.type == "cuda" and not capturing:
        stream = torch.cuda.current_stream(device)
        last = _counter_streams.get(key)
        if last is not None and last != stream:
            stream.wait_stream(last)
        _counter_streams[key] = stream
    return counter


_counter_lock = threading.Lock()


@contextlib.contextmanager
def _fused_finish_counter(device: torch.device):
    """The ticket counter for this call (None: use the finish kernel), held until the launch
    is enqueued. A lock keeps host threads from interleaving between taking the counter (and
    ordering the streams) and enqueuing the launch: two threads on two streams could otherwise
    run two launches on one counter at once. If the launch raises (an interpreted launch cut
    short may have taken some tickets), the counter is dropped, so the next call starts from a
    fresh zero instead of a count that would make every later loss wrong."""
    if not fused_finish_enabled():
        yield None
        return
    with _counter_lock:
        counter = _ticket_counter(device)
        try:
            yield counter
        except BaseException:
            if counter is not None:
                _counters.pop((device.type, device.index), None)
            raise


def mse_forward(hidden, target, mask, scale, count, write_grad):
    """Stage 1 + stage 2 for one term: (loss float32 scalar, grad or None)."""
    return term_forward(_Term(hidden, target, mask, count, scale, write_grad))


def _variant(rows: int, pdl: bool) -> dict:
    """The stage-1 kernel's extra constexprs: none for the default (so its launch, and its
    compiled code, are those of the kernel before these options existed)."""
    extra = {}
    if rows != 1:
        extra["ROWS"] = rows
    if pdl:
        extra["LAUNCH_DEPENDENTS"] = True
    return extra


def term_forward(term: _Term):
    """mse_forward for a prepared term."""
    hidden, write_grad = term.hidden, term.write_grad
    block, num_warps, rows, pdl = launch_config(term.D)
    partials = torch.empty(term.n_rows, dtype=torch.float32, device=hidden.device)
    with _fused_finish_counter(hidden.device) as counter, _launch_ctx():
        fused = counter is not None
        out = torch.empty(3, dtype=torch.float32, device=hidden.device) if fused else partials
        extra = _variant(rows, pdl and not fused)
        _rmu_mse_kernel[(_cdiv(term.n_rows, rows),)](
            partials, counter if fused else partials, out, term.n_rows, term.loss_mul,
            *term.args(), *term.flags(), BLOCK_D=block, FUSED_FINISH=fused,
            FINISH_BLOCK=FINISH_BLOCK, num_warps=num_warps, **extra,
        )  # fmt: skip
        if not fused:
            out = _finish(partials, term.n_rows, term.loss_mul, 0.0, pdl)
    return out[1], (term.grad if write_grad else None)


def loss_forward(fterm: _Term, rterm: _Term):
    """Both RMU terms in one stage-1 launch: (out [total, forget, retain], grad_f, grad_r)."""
    block, num_warps, rows, pdl = launch_config(max(fterm.D, rterm.D))
    n = fterm.n_rows + rterm.n_rows
    device = fterm.hidden.device
    partials = torch.empty(n, dtype=torch.float32, device=device)
    with _fused_finish_counter(device) as counter, _launch_ctx():
        fused = counter is not None
        out = torch.empty(3, dtype=torch.float32, device=device) if fused else partials
        extra = _variant(rows, pdl and not fused)
        grid = _cdiv(fterm.n_rows, rows) + _cdiv(rterm.n_rows, rows)
        _rmu_loss_kernel[(grid,)](
            partials, counter if fused else partials, out, n, fterm.loss_mul, rterm.loss_mul,
            fterm.n_rows, *fterm.args(), *rterm.args(), *fterm.flags(), *rterm.flags(),
            BLOCK_D=block, FUSED_FINISH=fused, FINISH_BLOCK=FINISH_BLOCK, num_warps=num_warps,
            **extra,
        )  # fmt: skip
        if not fused:
            out = _finish(partials, fterm.n_rows, fterm.loss_mul, rterm.loss_mul, pdl)
    return out, fterm.grad, rterm.grad


def _default_rescale_programs(device: torch.device) -> int:
    """The backward's rescale grid on a GPU: 2 programs per SM looping over the blocks. It is a
    no-op when grad_output is 1 (every training step), and launching one program per block
    (3,072 at [4, 768, 4096]) cost more than the op's memory time: on an H200 (session 6,
    benchmarks/bench_rmu_mse_tune.py, forward + backward) 2 per SM made rmu_mse 1.04-1.10x
    faster, (4, 768, 4096) from 76% to 81% of copy bandwidth and (8, 2048, 8192) from 88% to
    97%, with the same gradient bits. Interpreted: 0 (one program per block)."""
    if INTERPRETED or device.type != "cuda":
        return 0
    from wmdp_fast.kernels import sm_count

    return 2 * sm_count(device)


def rescale_(grads: list, grad_output: torch.Tensor) -> None:
    """grads[i] *= grad_output in place, in one launch, skipped on the device when grad_output
    is 1 (no host sync, no memory traffic)."""
    factor = grad_output.detach()
    if factor.dtype != torch.float32:
        factor = factor.float()
    ga = grads[0]
    gb = grads[1] if len(grads) > 1 else ga  # ga again as a placeholder, 0 elements taken
    na, nb = ga.numel(), (gb.numel() if len(grads) > 1 else 0)
    ba, bb = _cdiv(na, RESCALE_BLOCK), _cdiv(nb, RESCALE_BLOCK)
    cfg = _env_config()
    progs = cfg["rprogs"] if "rprogs" in cfg else _default_rescale_programs(ga.device)
    extra = {"GRID_STRIDE": True} if 0 < progs < ba + bb else {}
    with _launch_ctx():
        _rescale_kernel[(progs if extra else ba + bb,)](
            ga, gb, factor, na, nb, ba,
            A_MANUAL_BF16=INTERPRETED and ga.dtype == torch.bfloat16,
            B_MANUAL_BF16=INTERPRETED and gb.dtype == torch.bfloat16,
            BLOCK=RESCALE_BLOCK, num_warps=8, **extra,
        )  # fmt: skip


class _Recompute:
    """What a recomputing backward needs besides hidden (saved with save_for_backward): the
    target, mask and scale of one term, and the version counters of target and mask, so that an
    in-place change before such a backward is refused, as torch refuses it for saved tensors.
    Held as a ctx attribute, not saved: a target made under inference_mode (a cache) cannot be
    saved for backward, and the first backward must not fail for a target that changed after
    the forward (the stored gradient does not read it)."""

    def __init__(self, op: str, term: _Term):
        self.op, self.target, self.mask, self.scale = op, term.target, term.mask, term.scale
        self.versions = []  # inference tensors have no version counter (and are left out)
        for name, x in (("target", term.target), ("mask", term.mask)):
            parts = [(name, x)]
            if isinstance(x, PackedActivations):
                parts = [(f"{name}.data", x.data), (f"{name}.scale", x.scale)]
            for n, t in parts:
                if isinstance(t, torch.Tensor) and not t.is_inference():
                    self.versions.append((n, t, t._version))

    def grad(self, hidden: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
        """grad_output * d(loss)/d(hidden) from hidden and the target, with torch ops
        (differentiable when grad mode is on, i.e. under create_graph=True)."""
        for name, t, version in self.versions:
            if t._version != version:
                raise RuntimeError(
                    f"{self.op}: {name} was modified by an inplace operation after the loss "
                    f"was computed (version {t._version}, expected {version}); a second "
                    "backward (retain_graph=True) or create_graph=True recomputes the gradient "
                    "from it. Modify a clone instead."
                )
        return reference.rmu_mse_grad(hidden, self.target, self.mask, self.scale, grad_output)


def _alias(g: torch.Tensor) -> torch.Tensor:
    """g's memory as a new tensor with its own version counter: whoever receives the gradient
    may modify it in place without tripping the version check of the saved buffer (which a
    later backward unpacks, although it never reads it again)."""
    out = torch.empty((0,), dtype=g.dtype, device=g.device)
    return out.set_(g.untyped_storage(), g.storage_offset(), g.shape, g.stride())


def _backward(ctx, grad_output: torch.Tensor) -> list:
    """The gradients w.r.t. the terms' hidden tensors (None where a term needs none).

    The forward stored d(loss)/d(hidden) for grad_output == 1. The first backward without
    create_graph spends it: scaled in place (a no-op on the device when grad_output is 1) and
    handed out (float16 cast from its float32 staging). Every later backward through the same
    graph (retain_graph=True), and any backward with create_graph=True, recomputes it from the
    saved hidden tensors (`_Recompute.grad`).
    """
    saved = ctx.saved_tensors  # torch's "backward through the graph a second time" error
    n = len(saved) // 2
    grads, hiddens = saved[:n], saved[n:]
    if ctx.spent or torch.is_grad_enabled():
        return [None if h is None else r.grad(h, grad_output) for h, r in zip(hiddens, ctx.rec)]
    ctx.spent = True
    live = [g for g in grads if g is not None]
    if live:
        rescale_(live, grad_output)
    return [
        None if g is None else (_alias(g) if g.dtype == h.dtype else g.to(h.dtype))
        for g, h in zip(grads, hiddens)
    ]


class RMUMSEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, target, mask, term):
        loss, grad = term_forward(term)
        term.grad = None  # the term must not keep the buffer alive
        # saved (not an attribute) so that autograd can hand the buffer to hidden.grad without a
        # copy once the graph is freed; the backward scales it in place with a Triton kernel,
        # which autograd's version counter does not see, and reads it at most once. hidden is
        # saved (a reference, no copy) for a recomputing backward (see _backward).
        ctx.save_for_backward(grad, hidden)
        ctx.rec, ctx.spent = [_Recompute("rmu_mse", term)], False
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = _backward(ctx, grad_output)
        return grad, None, None, None


class RMULossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_forget, h_retain, fterm, rterm):
        out, grad_f, grad_r = loss_forward(fterm, rterm)
        fterm.grad = rterm.grad = None  # the terms must not keep the buffers alive
        wf, wr = fterm.write_grad, rterm.write_grad
        ctx.save_for_backward(
            grad_f if wf else None, grad_r if wr else None, h_forget if wf else None,
            h_retain if wr else None,
        )  # fmt: skip
        ctx.rec, ctx.spent = [_Recompute("rmu_loss", fterm), _Recompute("rmu_loss", rterm)], False
        total, forget, retain = out[0], out[1], out[2]
        ctx.mark_non_differentiable(forget, retain)
        return total, forget, retain

    @staticmethod
    def backward(ctx, grad_total, _grad_forget, _grad_retain):
        gf, gr = _backward(ctx, grad_total)
        return gf, gr, None, None


def rmu_mse(hidden, target, mask=None, scale=1.0, count=None) -> torch.Tensor:
    """Triton twin of `ops.rmu_mse` (arguments already checked; `count` = number of true mask
    positions, None without a mask)."""
    write_grad = torch.is_grad_enabled() and hidden.requires_grad
    term = _Term(hidden, target, mask, count, float(scale), write_grad)
    if write_grad:
        return RMUMSEFunction.apply(hidden, target, mask, term)
    loss, _ = term_forward(term)
    return loss


def rmu_loss(
    h_forget,
    control_vec,
    h_retain,
    retain_target,
    alpha,
    forget_mask=None,
    retain_mask=None,
    count_forget=None,
    count_retain=None,
):
    """Triton twin of `ops.rmu_loss`: (total, forget_term, retain_term), both terms in one
    launch. Arguments already checked."""
    grad_on = torch.is_grad_enabled()
    wf = grad_on and h_forget.requires_grad
    wr = grad_on and h_retain.requires_grad
    fterm = _Term(h_forget, control_vec, forget_mask, count_forget, 1.0, wf)
    rterm = _Term(h_retain, retain_target, retain_mask, count_retain, float(alpha), wr)
    if wf or wr:
        return RMULossFunction.apply(h_forget, h_retain, fterm, rterm)
    out, _, _ = loss_forward(fterm, rterm)
    return out[0], out[1], out[2]
