"""Sweep (B, T, D) for the RMU activation-MSE loss, forward + backward: eager vs fused.

    python benchmarks/bench_rmu_mse_table.py                  # CPU, small shapes
    python benchmarks/bench_rmu_mse_table.py --device cuda    # GPU, the issue's shapes

Providers (the same loss, forward + backward w.r.t. hidden, hidden and target in --dtype):
  eager       F.mse_loss(hidden.float(), target.float()) then .backward()  (the published form
              with the float32 casts some forks add)
  fused       ops.rmu_mse(hidden, target) then .backward()  (Triton on CUDA; on the CPU this is
              the reference twin, so CPU numbers only show the overhead of the op layer)
  fused-ff    the same with WMDP_FAST_RMU_MSE_FUSED_FINISH=1 (opt-in: the finish kernel fused
              into the main kernel's last program, one launch fewer); a line per shape says
              whether its loss and gradient are bitwise the "fused" ones. If it fails, its row
              says so and the table goes on.
  fused-int8  ops.rmu_mse(hidden, pack_activations(target, "int8")) then .backward()
  copy_       dst.copy_(src) with src = as many bytes as the fused op moves at that shape
              (read hidden + target, write the gradient), counted read + write: the
              bandwidth this card reaches in this run, the yardstick of the "80% of copy
              bandwidth" target. "% of copy" = a row's effective GB/s / copy_'s, both from
              GPU-only times on CUDA (median on the CPU), so they come from the same card and run.

Columns: median time with the 0.2 / 0.8 quantiles (triton.testing.do_bench on CUDA: host
launch overhead included when it exceeds the GPU time); GPU-only = the same step captured in a
CUDA graph and replayed (what it costs inside a training step whose other GPU work hides the
host time); effective GB/s (from GPU-only time on CUDA) = the bytes a one-pass
kernel must move (read hidden and target, write the gradient in hidden's dtype; int8: 1 byte
per target element plus the scales) divided by the median time, for every provider; peak
memory = peak allocated during forward + backward above what the inputs already hold (CUDA
only). Prints a markdown table.

On the CPU, `ops.rmu_mse` runs its plain-PyTorch reference twin (several passes, float32
temporaries), so the CPU table measures the op layer on top of eager, not the kernels; it says
nothing about the GPU. WMDP_FAST_FORCE_TRITON=1 runs the kernels in Triton's interpreter (far
slower than either; correctness only).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from _timing import peak_extra_mb
from _timing import time_fn as _time

from wmdp_fast import ops

GPU_SHAPES = [(4, 512, 4096), (4, 768, 4096), (8, 2048, 8192)]
CPU_SHAPES = [(4, 128, 1024), (4, 192, 1024), (8, 256, 2048)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FF_ENV = "WMDP_FAST_RMU_MSE_FUSED_FINISH"


@contextlib.contextmanager
def _env(values: dict):
    """Sets environment variables for the duration (restoring the previous values)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _peak_extra_mb(fn, device, h) -> float | None:
    """Peak allocated during fn above the inputs (h.grad freed first: it is part of the cost)."""
    return peak_extra_mb(fn, device, [h])


def copy_row(nbytes: int, device, dtype, reps: int) -> tuple:
    """('copy_', median, p20, p80, GPU-only, GB/s counted read + write, None): dst.copy_(src)
    of a src of `nbytes` bytes (rounded down to whole elements) on `device`."""
    n = max(1, nbytes // torch.tensor([], dtype=dtype).element_size())
    src = torch.empty(n, dtype=dtype, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    med, lo, hi, graph = _time(lambda: dst.copy_(src), device, reps, None)
    gbs = 2 * src.numel() * src.element_size() / ((graph or med) * 1e-3) / 1e9
    return ("copy_ (read+write)", med, lo, hi, graph, gbs, None)


def bench_shape(B, T, D, device, dtype, reps: int, target_kind: str) -> list:
    """[(provider, median ms, p20 ms, p80 ms, GPU-only ms or None, effective GB/s, % of copy,
    peak extra MiB or None)]; the first row is the copy_ reference."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    if target_kind == "cv":
        t = torch.rand(1, 1, D, generator=gen).to(device=device, dtype=dtype)
    else:
        t = torch.randn(B, T, D, generator=gen).to(device=device, dtype=dtype)
    packed = ops.pack_activations(t, "int8")
    off, on = {FF_ENV: "0"}, {FF_ENV: "1"}
    providers = {  # name: (loss function, target, environment while it runs)
        "eager": (lambda: F.mse_loss(h.float(), t.float().expand(B, T, D)), t, off),
        "fused": (lambda: ops.rmu_mse(h, t), t, off),
    }
    if ops.backend_of("rmu_mse", h.device) != "reference":  # on the reference it is "fused" again
        providers["fused-ff"] = (lambda: ops.rmu_mse(h, t), t, on)
    if target_kind != "cv":
        providers["fused-int8"] = (lambda: ops.rmu_mse(h, packed), packed, off)

    def step_of(loss_fn):
        def step():
            h.grad = None
            loss_fn().backward()

        return step

    def traffic(tgt) -> int:  # what a one-pass kernel must move
        return 2 * h.numel() * h.element_size() + tgt.nbytes

    # the copy first, on the same card and in the same run: the same bytes as the fused op
    copy = copy_row(traffic(t) // 2, device, dtype, reps)
    rows = [(*copy[:6], 100.0, None)]
    for name, (loss_fn, tgt, env) in providers.items():
        step = step_of(loss_fn)
        try:
            with _env(env):
                med, lo, hi, graph = _time(step, device, reps, [h])
                peak = _peak_extra_mb(step, device, h)
        except Exception as exc:  # noqa: BLE001 - one failing provider must not end the table
            traceback.print_exc(file=sys.stderr)
            msg = " ".join(str(exc).split())[:100]
            nan = math.nan
            rows.append(
                (f"{name} ERROR {type(exc).__name__}: {msg}", nan, nan, nan, None, nan, nan, None)
            )
            continue
        gbs = traffic(tgt) / ((graph or med) * 1e-3) / 1e9
        rows.append((name, med, lo, hi, graph, gbs, 100.0 * gbs / copy[5], peak))
    return rows


def ff_identity(B, T, D, device, dtype, target_kind: str) -> str:
    """Whether the fused finish gives bitwise the default path's loss and gradient here."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(B, T, D, generator=gen).to(device=device, dtype=dtype)
    shape = (1, 1, D) if target_kind == "cv" else (B, T, D)
    t = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    try:
        res = []
        for value in ("0", "1"):
            x = h.clone().requires_grad_(True)
            with _env({FF_ENV: value}):
                loss = ops.rmu_mse(x, t)
                loss.backward()
            res.append((loss.detach(), x.grad))
        (l0, g0), (l1, g1) = res
        rel = abs(l1.item() - l0.item()) / max(abs(l0.item()), 1e-30)
        return (
            f"fused-ff vs fused at ({B}, {T}, {D}): loss bitwise equal "
            f"{'yes' if torch.equal(l0, l1) else 'NO'} (relative difference {rel:.2e}), "
            f"gradient bitwise equal {'yes' if torch.equal(g0, g1) else 'NO'}"
        )
    except Exception as exc:  # noqa: BLE001 - report and go on
        msg = " ".join(str(exc).split())[:200]
        return f"fused-ff vs fused at ({B}, {T}, {D}): ERROR {type(exc).__name__}: {msg}"


def run(device: torch.device, dtype: torch.dtype, shapes, reps: int, target_kind: str) -> list:
    rows = []
    for B, T, D in shapes:
        for r in bench_shape(B, T, D, device, dtype, reps, target_kind):
            rows.append((B, T, D, *r))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument(
        "--target",
        default="retain",
        choices=["retain", "cv"],
        help="retain: target [B, T, D] (default); cv: control vector [1, 1, D]",
    )
    ap.add_argument(
        "--shapes",
        default=None,
        help="B,T,D;B,T,D;... (default: the issue's shapes on cuda, small on cpu)",
    )
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions on the CPU")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: on a shared machine more threads "
        "make the timings noise)",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    else:
        shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = run(device, DTYPES[args.dtype], shapes, args.reps, args.target)
    identity = [ff_identity(B, T, D, device, DTYPES[args.dtype], args.target) for B, T, D in shapes]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    backend = ops.backend_of("rmu_mse", device)
    print(
        f"RMU MSE forward+backward, {args.dtype}, target {args.target}, {name}, "
        f"backend {backend}, torch {torch.__version__}\n"
    )
    if backend == "reference":
        print(
            "NOTE: the fused op runs its plain-PyTorch reference twin here, not a kernel: "
            "these numbers say nothing about the GPU.\n"
        )
    print(
        "| B | T | D | provider | median ms | p20 ms | p80 ms | GPU-only ms | effective GB/s "
        "| % of copy | peak extra MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for B, T, D, prov, med, lo, hi, graph, gbs, pct, peak in rows:
        pk = "-" if peak is None else f"{peak:.1f}"
        gr = "-" if graph is None else f"{graph:.3f}"
        print(
            f"| {B} | {T} | {D} | {prov} | {med:.3f} | {lo:.3f} | {hi:.3f} | {gr} | {gbs:.1f} "
            f"| {pct:.0f}% | {pk} |"
        )
    print()
    for col, label in ((4, "median"), (7, "GPU-only (CUDA graph)")):
        by = {(r[0], r[1], r[2], r[3]): r[col] for r in rows}
        for B, T, D in shapes:
            e = by.get((B, T, D, "eager"))
            for prov in ("fused", "fused-ff"):
                f = by.get((B, T, D, prov))
                if e and f and math.isfinite(f):
                    print(f"speed-up {prov} vs eager at ({B}, {T}, {D}), {label}: {e / f:.2f}x")
            f, ff = by.get((B, T, D, "fused")), by.get((B, T, D, "fused-ff"))
            if f and ff and math.isfinite(f) and math.isfinite(ff):
                print(f"fused-ff vs fused at ({B}, {T}, {D}), {label}: {f / ff:.3f}x")
    timing = "GPU-only" if device.type == "cuda" else "median"
    for B, T, D, prov, *_, gbs, pct, _peak in rows:
        if prov in ("fused", "fused-ff"):
            print(
                f"{prov} at ({B}, {T}, {D}): {gbs:.1f} GB/s = {pct:.0f}% of the copy bandwidth "
                f"measured in this run ({timing} times; target on the GPU: 80%)"
            )
    for line in identity:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
