"""gather_logprobs: the C++/CUDA op vs the reference (log_softmax + gather), as a table.

CPU (default):  python benchmarks/bench_gather_table.py            # 4,096 x 32,000
GPU:            python benchmarks/bench_gather_table.py --device cuda --rows 16384

Times are medians with 0.2/0.8 quantiles over --reps runs. "peak extra MB" is the memory the call
needs beyond its inputs: on the GPU from torch.cuda.max_memory_allocated, on the CPU from the
process's peak RSS measured in a fresh subprocess per (provider, dtype). GB/s counts the logits
read once (R x V x itemsize), the op's minimum traffic. The reference here is the plain
`log_softmax(logits.float()) + gather` an evaluation loop would write (float32, as lm-eval does),
not the float64 test reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(R: int, V: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    # filled in slices so that making the inputs leaves no high-water mark above them
    logits = torch.empty(R, V, dtype=dtype, device=device)
    for i in range(0, R, 256):
        logits[i : i + 256] = (torch.randn(min(256, R - i), V, generator=g) * 3).to(dtype)
    row_index = torch.arange(R, device=device).repeat_interleave(4)
    target = torch.randint(0, V, (4 * R,), generator=g).to(device)
    offsets = torch.arange(4 * R + 1, device=device)
    return logits, row_index, target, offsets


def eager(logits, row_index, target, offsets):
    lp = torch.log_softmax(logits.float(), dim=-1)
    greedy = lp.argmax(dim=-1)[row_index] == target
    return lp[row_index, target], greedy


def provider(name: str):
    if name == "eager":
        return eager
    from wmdp_fast import ops

    return ops.gather_logprobs


def timeit(fn, args, device: str, reps: int) -> list[float]:
    fn(*args)
    out = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def one(name: str, R: int, V: int, dtype: str, device: str, reps: int) -> dict:
    import resource

    args = make_inputs(R, V, DT[dtype], device)
    fn = provider(name)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn(*args)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    ts = timeit(fn, args, device, reps)
    q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else ts * 9
    return {
        "provider": name,
        "dtype": dtype,
        "median_ms": statistics.median(ts) * 1e3,
        "p20_ms": q[1] * 1e3,
        "p80_ms": q[7] * 1e3,
        "gbps": R
        * V
        * torch.empty(0, dtype=DT[dtype]).element_size()
        / statistics.median(ts)
        / 1e9,
        "peak_extra_mb": peak / 2**20,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rows", type=int, default=None, help="R (default 4096 on CPU, 16384 on GPU)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    R = a.rows or (16384 if a.device == "cuda" else 4096)
    reps = a.reps or (50 if a.device == "cuda" else 7)
    if a._one:  # child process: one (provider, dtype), so the CPU peak RSS is its own
        name, dtype = a._one.split(":")
        print(json.dumps(one(name, R, a.vocab, dtype, a.device, reps)))
        return 0
    rows = []
    for dtype in a.dtypes.split(","):
        for name in ("eager", "wmdp_fast"):
            if a.device == "cpu":
                cmd = [
                    sys.executable,
                    __file__,
                    "--device",
                    "cpu",
                    "--rows",
                    str(R),
                    "--vocab",
                    str(a.vocab),
                    "--reps",
                    str(reps),
                    "--_one",
                    f"{name}:{dtype}",
                ]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            else:
                rows.append(one(name, R, a.vocab, dtype, a.device, reps))
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(
        f"\ngather_logprobs, R={R} rows x V={a.vocab}, 4 targets/row, {dev}, torch {torch.__version__}"
    )
    print(
        "| dtype | provider | median ms (p20-p80) | GB/s (logits read once) | peak extra MB | speedup |"
    )
    print("|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        e, f = rows[i], rows[i + 1]
        for r in (e, f):
            sp = e["median_ms"] / r["median_ms"]
            print(
                f"| {r['dtype']} | {r['provider']} | {r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) "
                f"| {r['gbps']:.0f} | {r['peak_extra_mb']:.0f} | {sp:.2f}x |"
            )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
