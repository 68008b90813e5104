"""Timing helpers shared by the kernel benchmark scripts (run as `python benchmarks/X.py`, so
this folder is on sys.path)."""

from __future__ import annotations

import statistics
import sys
import time

import torch


def bench_cpu(fn, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) wall time of fn in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times) * 1e3, q[1] * 1e3, q[7] * 1e3


def bench_cuda(fn, grad_to_none) -> tuple[float, float, float]:
    """(median, p20, p80) in ms by triton.testing.do_bench (L2 flushed between calls)."""
    import triton.testing

    med, lo, hi = triton.testing.do_bench(
        fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
    )
    return med, lo, hi


def bench_cuda_graph(fn, grad_to_none) -> float | None:
    """GPU time alone: fn captured in a CUDA graph and replayed (no Python/launch overhead),
    as it runs inside a training step whose GPU work hides the host time. None if capture
    fails."""
    import triton.testing

    try:
        r = triton.testing.do_bench_cudagraph(fn, rep=100, grad_to_none=grad_to_none)
        return float(r[0] if isinstance(r, (list, tuple)) else r)
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"(CUDA graph capture failed: {exc!r})", file=sys.stderr)
        return None


def time_fn(fn, device, reps: int, grad_to_none) -> tuple[float, float, float, float | None]:
    """(median, p20, p80, GPU-only or None) in ms."""
    if device.type == "cuda":
        return (*bench_cuda(fn, grad_to_none), bench_cuda_graph(fn, grad_to_none))
    return (*bench_cpu(fn, reps), None)


def peak_extra_mb(fn, device, grad_to_none) -> float | None:
    """Peak CUDA memory allocated during fn above what was allocated before (the tensors in
    grad_to_none lose their .grad first: the gradient is part of the cost). None on the CPU."""
    if device.type != "cuda":
        return None
    for t in grad_to_none:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
