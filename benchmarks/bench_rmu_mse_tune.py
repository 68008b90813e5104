"""GPU tuning aid for kernels/rmu_mse.py: which launch config (BLOCK_D, num_warps, rows per
program, programmatic dependent launch of the finish kernel, grid of the backward's rescale,
fused finish) gives the highest share of the card's copy bandwidth, per shape class; then
the host time per call, part by part (benchmarks/bench_rmu_mse_hostprof.py).

    python benchmarks/bench_rmu_mse_tune.py            # needs a CUDA GPU; about 40 s on an H200
    python benchmarks/bench_rmu_mse_tune.py --quick    # the (4, 768, 4096) classes only
    python benchmarks/bench_rmu_mse_tune.py --dry-run  # CPU, Triton interpreter, tiny shapes:
                                                       # checks the script, times mean nothing

Every config is ops.rmu_mse (or ops.rmu_loss) forward + backward, bf16, run with
WMDP_FAST_RMU_MSE_CONFIG / WMDP_FAST_RMU_MSE_FUSED_FINISH set (kernels/rmu_mse.py,
`launch_config`). Times are GPU-only: N steps captured in one CUDA graph, replayed R times,
median per step (the spread over replays is printed: differences smaller than it are noise).
"% copy" = the bytes a one-pass kernel must move (read hidden and target, write the gradient)
per second, over dst.copy_(src) of the same bytes timed the same way in the same run. A line
per config says whether its loss and gradient are bitwise the default's (the gradient must
be; the loss may differ in the last bits when the per-row sum's order changes, and then the
relative difference is printed). The `decide` line per class names the fastest config and its
gain over the default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import triton

from wmdp_fast import ops

CONFIG_ENV = "WMDP_FAST_RMU_MSE_CONFIG"
FF_ENV = "WMDP_FAST_RMU_MSE_FUSED_FINISH"
# (label, WMDP_FAST_RMU_MSE_CONFIG, WMDP_FAST_RMU_MSE_FUSED_FINISH); the first is the default
CONFIGS = [
    ("default (block 2048, 4 warps, 1 row)", "", "0"),
    ("block=4096,warps=8", "block=4096,warps=8", "0"),
    ("block=4096,warps=4", "block=4096,warps=4", "0"),
    ("block=1024,warps=4", "block=1024,warps=4", "0"),
    ("rows=2", "rows=2", "0"),
    ("rows=4", "rows=4", "0"),
    ("rows=4,warps=8", "rows=4,warps=8", "0"),
    ("rprogs=264 (backward rescale: 2 programs per SM)", "rprogs=264", "0"),
    ("fused-finish", "", "1"),
    ("fused-finish rows=4", "rows=4", "1"),
    ("fused-finish rows=8,warps=8", "rows=8,warps=8", "1"),
    # last: a launch attribute that a CUDA graph capture might refuse
    ("pdl=1", "pdl=1", "0"),
    ("rows=2,pdl=1", "rows=2,pdl=1", "0"),
    ("rows=2,pdl=1,rprogs=264", "rows=2,pdl=1,rprogs=264", "0"),
]
# (class, op, (B, T, D)); rmu_loss: forget term against a control vector and retain term
# against a [B, T, D] target, both of this shape (RMU's training step)
CLASSES = [
    ("retain", "rmu_mse", (4, 768, 4096)),
    ("cv", "rmu_mse", (4, 768, 4096)),
    ("rmu_loss", "rmu_loss", (4, 768, 4096)),
    ("retain", "rmu_mse", (4, 512, 4096)),
    ("retain", "rmu_mse", (8, 2048, 8192)),
]


def set_env(config: str, ff: str) -> None:
    os.environ[CONFIG_ENV] = config
    os.environ[FF_ENV] = ff


def graph_us(step, n: int, replays: int) -> tuple[float, float, float]:
    """(median, min, max) microseconds per step: `n` steps in one CUDA graph, `replays`
    timed replays. Warm-up (and compilation) on a side stream first, as capture requires.
    Without CUDA (--dry-run): wall time of single steps."""
    if not torch.cuda.is_available():
        times = []
        for _ in range(replays):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times), min(times), max(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            step()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n)
    del graph
    return statistics.median(times), min(times), max(times)


def make_case(op: str, kind: str, shape, dev: str):
    """(step, result, nbytes): step() = forward + backward; result() = (loss, grads) of one
    fresh call, for the bitwise comparison; nbytes = what a one-pass kernel moves."""
    gen = torch.Generator().manual_seed(0)
    B, T, D = shape
    h = torch.randn(B, T, D, generator=gen).to(dev, torch.bfloat16).requires_grad_(True)
    full = torch.randn(B, T, D, generator=gen).to(dev, torch.bfloat16)
    cv = torch.rand(1, 1, D, generator=gen).to(dev, torch.bfloat16)
    size = h.numel() * h.element_size()
    if op == "rmu_mse":
        tgt = cv if kind == "cv" else full
        nbytes = 2 * size + tgt.nbytes

        def loss():
            return ops.rmu_mse(h, tgt)

        leaves = [h]
    else:
        hr = torch.randn(B, T, D, generator=gen).to(dev, torch.bfloat16).requires_grad_(True)
        nbytes = 2 * size + cv.nbytes + 3 * size

        def loss():
            return ops.rmu_loss(h, cv, hr, full, 100.0)[0]

        leaves = [h, hr]

    def step():
        for x in leaves:
            x.grad = None
        loss().backward()

    def result():
        step()
        return loss().detach().clone(), [x.grad.clone() for x in leaves]

    return step, result, nbytes


def copy_us(nbytes: int, n: int, replays: int, dev: str) -> float:
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    return graph_us(lambda: dst.copy_(src), n, replays)[0]


def tune(classes, n: int, replays: int, dev: str) -> None:
    print(
        "| class | B,T,D | config | GPU us/step | replay min-max | % copy | vs default | "
        "bitwise |\n|---|---|---|---|---|---|---|---|"
    )
    decisions = []
    for kind, op, shape in classes:
        t0 = time.perf_counter()
        step, result, nbytes = make_case(op, kind, shape, dev)
        base_us = copy_us(nbytes // 2, n, replays, dev)  # counted read + write: 2x the source
        cls = f"{op} {kind}" if op == "rmu_mse" else op
        dims = ",".join(map(str, shape))
        print(f"| {cls} | {dims} | copy_ (same bytes) | {base_us:.2f} | - | 100% | - | - |")
        rows, ref = [], None
        for label, config, ff in CONFIGS:
            set_env(config, ff)
            try:
                med, lo, hi = graph_us(step, n, replays)
                loss, grads = result()
            except Exception as exc:  # noqa: BLE001 - one failing config must not end the run
                msg = " ".join(str(exc).split())[:120]
                print(f"| {cls} | {dims} | {label} | ERROR {type(exc).__name__}: {msg} |||||")
                continue
            if ref is None:
                ref = (loss, grads, med)
            same_g = all(torch.equal(a, b) for a, b in zip(grads, ref[1]))
            rel = abs(loss.item() - ref[0].item()) / max(abs(ref[0].item()), 1e-30)
            bits = "yes" if torch.equal(loss, ref[0]) and same_g else (
                f"loss {rel:.1e}, grad {'same' if same_g else 'DIFFERS'}"
            )  # fmt: skip
            pct = 100.0 * base_us / med
            rows.append((med, label, pct))
            print(
                f"| {cls} | {dims} | {label} | {med:.2f} | {lo:.2f}-{hi:.2f} | {pct:.0f}% | "
                f"{ref[2] / med:.3f}x | {bits} |",
                flush=True,
            )
        set_env("", "0")
        if rows:
            best = min(rows)
            decisions.append(
                f"decide {cls} ({dims}): best {best[1]} {best[0]:.2f} us = {best[2]:.0f}% of copy "
                f"({ref[2] / best[0]:.3f}x the default's {ref[2]:.2f} us); "
                f"{time.perf_counter() - t0:.1f} s for this class"
            )
    print()
    for line in decisions:
        print(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the (4, 768, 4096) classes")
    ap.add_argument("--steps", type=int, default=40, help="steps per CUDA graph (default 40)")
    ap.add_argument("--replays", type=int, default=5, help="timed graph replays (default 5)")
    ap.add_argument(
        "--no-host", action="store_true", help="skip the host-time part (bench_rmu_mse_hostprof)"
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU check of this script: Triton interpreter, tiny shapes, meaningless times",
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.dry_run:
        os.environ["WMDP_FAST_FORCE_TRITON"] = "1"
        classes = [(k, op, (2, 5, 96)) for k, op, _ in CLASSES[:3]]
        tune(classes, args.steps, 1, "cpu")
        print(f"\ntotal {time.perf_counter() - t0:.1f} s (dry run: the times mean nothing)")
        return 0
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU (--dry-run checks the script on the CPU)", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(
        f"{props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton "
        f"{triton.__version__}, bf16, forward + backward\n"
    )
    classes = CLASSES[:3] if args.quick else CLASSES
    tune(classes, args.steps, args.replays, "cuda")
    if not args.no_host:
        print()
        import bench_rmu_mse_hostprof  # this folder is on sys.path when run as a script

        bench_rmu_mse_hostprof.main(["-n", "200"])
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
