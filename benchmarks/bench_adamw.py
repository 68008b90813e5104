"""The published AdamW step: eager PublishedAdamW.step vs the fused ops.published_adamw_step.

    python benchmarks/bench_adamw.py                  # CPU, 3 x [512, 1792] (reference backend)
    python benchmarks/bench_adamw.py --device cuda    # 3 x [4096, 14336] bf16 (Zephyr-7B's
                                                      # mlp.down_proj of layers 5, 6, 7)

Rows (the same step on the same shapes, lr 5e-5 as in the published RMU run):
  eager   wmdp_fast.rmu.PublishedAdamW.step: 7 elementwise kernels per tensor (mul_, add_,
          mul_, addcmul_, sqrt, add_, addcdiv_), ~19 element accesses per element
  fused   ops.published_adamw_step: one pass per tensor (Triton on CUDA; on the CPU this is the
          reference twin, i.e. the eager sequence again: CPU numbers show the op layer only)
  copy_   dst.copy_(src) moving the fused step's bytes (read + write): this card's yardstick

Median of --reps timed steps after --warmup untimed ones (CUDA events around each step on a
GPU, so host launch overhead is included where the GPU waits for it). Effective GB/s = the
bytes of a one-pass step, 7 x numel x itemsize (read p, g, m, v; write p, m, v), divided by the
time, for every row. A line says whether the fused step is bitwise the eager one (p, m and v
after 2 steps from the same state: step 1 with v == 0, and a general step).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wmdp_fast import ops
from wmdp_fast.rmu import PublishedAdamW

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPU_SHAPE, CPU_SHAPE = (4096, 14336), (512, 1792)
LR = 5e-5


def _timed(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of fn over reps calls, after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class Eager:
    def __init__(self, params, grads):
        self.params = [p.clone().requires_grad_(True) for p in params]
        for p, g in zip(self.params, grads):
            p.grad = g
        # eager whatever WMDP_FAST_FUSED_ADAMW says (=1 would make this row the fused step)
        self.opt = PublishedAdamW(self.params, lr=LR, fused=False)

    def step(self):
        self.opt.step()

    def state(self):
        return [
            (p.detach(), self.opt.state[p]["exp_avg"], self.opt.state[p]["exp_avg_sq"])
            for p in self.params
        ]


class Fused:
    def __init__(self, params, grads):
        self.params = [p.clone() for p in params]
        self.grads = grads
        self.ms = [torch.zeros_like(p) for p in params]
        self.vs = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self):
        self.t += 1
        ops.published_adamw_step(
            self.params, self.grads, self.ms, self.vs, self.t, LR, 0.9, 0.999, 1e-6
        )

    def state(self):
        return list(zip(self.params, self.ms, self.vs))


def bitwise_line(params, grads) -> str:
    eager, fused = Eager(params, grads), Fused(params, grads)
    for _ in range(2):
        eager.step()
        fused.step()
    n_diff = 0
    for e, f in zip(eager.state(), fused.state()):
        for a, b in zip(e, f):
            n_diff += int(((a != b) & ~(a.isnan() & b.isnan())).sum())
    n = 3 * sum(p.numel() for p in params)
    if n_diff == 0:
        return f"bitwise equal to eager after 2 steps: YES (all {n} p, m, v values)"
    return f"bitwise equal to eager after 2 steps: NO ({n_diff} of {n} p, m, v values differ)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--shape", default=None, help="rows,cols of each tensor")
    parser.add_argument("--tensors", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.shape:
        shape = tuple(int(x) for x in args.shape.split(","))
    else:
        shape = GPU_SHAPE if device.type == "cuda" else CPU_SHAPE
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(shape, generator=gen, device=device).to(dtype)]
    params += [params[0].roll(i, 0) for i in range(1, args.tensors)]
    grads = [(torch.randn(shape, generator=gen, device=device) * 1e-4).to(dtype)]
    grads += [grads[0].roll(i, 1) for i in range(1, args.tensors)]
    numel = sum(p.numel() for p in params)
    one_pass = 7 * numel * params[0].element_size()
    backend = ops.backend_of("published_adamw_step", device)
    print(
        f"# published AdamW step: {args.tensors} x {list(shape)} {args.dtype} on "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; fused "
        f"backend: {backend}"
    )
    print(bitwise_line(params, grads))
    eager, fused = Eager(params, grads), Fused(params, grads)
    src = torch.ones(one_pass // 2 // params[0].element_size(), dtype=dtype, device=device)
    dst = torch.empty_like(src)
    rows = [
        ("eager (PublishedAdamW.step)", _timed(eager.step, device, args.reps, args.warmup)),
        (f"fused ({backend})", _timed(fused.step, device, args.reps, args.warmup)),
        ("copy_ (same bytes)", _timed(lambda: dst.copy_(src), device, args.reps, args.warmup)),
    ]
    print(f"| step | median ms ({args.reps} reps) | effective GB/s (7 x numel x itemsize) |")
    print("| --- | --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} | {one_pass / (ms * 1e-3) / 1e9:.1f} |")
    print(f"speed-up fused vs eager: {rows[0][1] / rows[1][1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
