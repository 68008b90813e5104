"""gather_logprobs: the C++/CUDA op vs the reference (log_softmax + gather), as a table.

CPU (default):  python benchmarks/bench_gather_table.py            # 4,096 x 32,000
GPU:            python benchmarks/bench_gather_table.py --device cuda --rows 16384

Times are medians with 0.2/0.8 quantiles over --reps runs. "peak extra MB" is the memory the call
needs beyond its inputs: on the GPU from torch.cuda.max_memory_allocated, on the CPU from the
process's peak RSS measured in a fresh subprocess per (provider, dtype). GB/s counts the logits
read once (R x V x itemsize), the op's minimum traffic. The reference here is the plain
`log_softmax(logits.float()) + gather` an evaluation loop would write (float32, as lm-eval does),
not the float64 test reference.

On the GPU the table also breaks the op down, for every row_stats kernel variant
(WMDP_FAST_GATHER_CUDA_VARIANT, csrc/gather_logprobs_cuda.cu), all on the same inputs and card:
- "copy_" and "amax" rows: the card's bandwidth measured right here on a tensor of the same
  bytes (dst.copy_(logits), counted read + write; torch.amax(logits), read once), timed with
  CUDA events back to back. "% copy" and "% read" compare each row's GB/s with these.
- "whole op": wmdp_fast.ops.gather_logprobs (Python argument checks included), wall clock with a
  synchronize before and after each call, as a caller sees it.
- "raw _C": wmdp_fast._C.gather_logprobs, skipping the Python checks.
- "row_stats": that kernel's own device time, the mean over 10 raw calls under torch.profiler
  (n/a if the profiler fails); "GPU ms" is all device work per raw call (the fill of the row map,
  the three kernels, the 8-byte read back), and "host ms" = raw _C - GPU ms, the launch and
  synchronisation overhead. A "device ms per raw call" line per variant lists the kernels.
- "max diff": max |loglik - eager| and, in brackets, how many is_greedy flags differ from eager.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VARIANT_ENV = "WMDP_FAST_GATHER_CUDA_VARIANT"
CUDA_VARIANTS = (1, 2, 3, 4)


def make_inputs(R: int, V: int, dtype: torch.dtype, device: str):
    # generated where they live, in slices, so that making them leaves no high-water mark above
    # them (and 16k x 32k normals on the CPU would take longer than the whole GPU table)
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.empty(R, V, dtype=dtype, device=device)
    for i in range(0, R, 256):
        n = min(256, R - i)
        logits[i : i + n] = (torch.randn(n, V, generator=g, device=device) * 3).to(dtype)
    row_index = torch.arange(R, device=device).repeat_interleave(4)
    target = torch.randint(0, V, (4 * R,), generator=g, device=device)
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
    """Wall-clock seconds per call, synchronising before and after each (host overhead counts)."""
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


def time_device(fn, reps: int) -> list[float]:
    """Device seconds per call from CUDA events, calls queued back to back (no host gaps)."""
    fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def summary(ts: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) in milliseconds."""
    q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else ts * 9
    return statistics.median(ts) * 1e3, q[1] * 1e3, q[7] * 1e3


def device_ms_per_call(fn, args, calls: int = 10) -> dict[str, float]:
    """Device time per call (ms) of every kernel / memcpy / memset name, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(*args)
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for e in prof.events():
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            per[e.name] = per.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3 / calls
    if not per:
        raise RuntimeError("the profiler recorded no device activity")
    return per


def peak_extra_mb(fn, args, device: str) -> float:
    import resource

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(*args)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fn(*args)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20


def one(name: str, R: int, V: int, dtype: str, device: str, reps: int) -> dict:
    args = make_inputs(R, V, DT[dtype], device)
    fn = provider(name)
    peak = peak_extra_mb(fn, args, device)
    med, p20, p80 = summary(timeit(fn, args, device, reps))
    nbytes = R * V * DT[dtype].itemsize
    return {
        "provider": name,
        "dtype": dtype,
        "median_ms": med,
        "p20_ms": p20,
        "p80_ms": p80,
        "gbps": nbytes / med / 1e6,
        "peak_extra_mb": peak,
    }


def cuda_rows(R: int, V: int, dtype: str, reps: int, variants) -> list[dict]:
    """The GPU table's rows for one dtype: bandwidth references, eager, every variant."""
    from wmdp_fast import _ext, ops

    args = make_inputs(R, V, DT[dtype], "cuda")
    logits = args[0]
    nbytes = logits.numel() * logits.element_size()
    rows = []
    med, p20, p80 = summary(time_copy(logits, reps))
    copy_gbps = 2 * nbytes / med / 1e6
    rows.append(dict(provider="copy_ (read+write)", median_ms=med, p20_ms=p20, p80_ms=p80))
    rows[-1]["gbps"] = copy_gbps
    med, p20, p80 = summary(time_device(lambda: torch.amax(logits), reps))
    read_gbps = nbytes / med / 1e6
    rows.append(dict(provider="amax (read)", median_ms=med, p20_ms=p20, p80_ms=p80))
    rows[-1]["gbps"] = read_gbps

    ref_ll, ref_g = eager(*args)
    e = one_cuda("eager", eager, args, reps, nbytes)
    rows.append(e)
    C = _ext.load_C()
    if C is None or not C.with_cuda():
        rows.append({"provider": "wmdp_fast", "error": f"no CUDA extension ({_ext.load_error()})"})
        variants = ()
    saved = os.environ.get(VARIANT_ENV)
    try:
        for v in variants:
            os.environ[VARIANT_ENV] = str(v)
            try:
                r = one_cuda(f"wmdp_fast v{v}", ops.gather_logprobs, args, reps, nbytes)
                ll, g = ops.gather_logprobs(*args)
                r["max_diff"] = float((ll - ref_ll).abs().max())
                r["greedy_mismatch"] = int((g != ref_g).sum())
                r["raw_ms"] = summary(timeit(C.gather_logprobs, args, "cuda", reps))[0]
                try:
                    per = device_ms_per_call(C.gather_logprobs, args)
                    rs = sum(t for k, t in per.items() if "row_stats" in k)
                    r["row_stats_ms"] = rs if rs > 0 else None
                    r["gpu_ms"] = sum(per.values())
                    r["kernels"] = per
                except Exception as exc:  # noqa: BLE001 - the table goes on without it
                    r["profiler_error"] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - report the variant, keep the others
                r = {"provider": f"wmdp_fast v{v}", "error": f"{type(exc).__name__}: {exc}"}
            rows.append(r)
    finally:
        if saved is None:
            os.environ.pop(VARIANT_ENV, None)
        else:
            os.environ[VARIANT_ENV] = saved
    for r in rows:
        r["dtype"] = dtype
        r["copy_gbps"], r["read_gbps"] = copy_gbps, read_gbps
        timed_op = "median_ms" in r and "peak_extra_mb" in r  # not the bandwidth rows
        r["speedup"] = e["median_ms"] / r["median_ms"] if timed_op else None
    return rows


def time_copy(x: torch.Tensor, reps: int) -> list[float]:
    dst = torch.empty_like(x)
    return time_device(lambda: dst.copy_(x), reps)


def short_kernel_name(name: str) -> str:
    """'void (anonymous namespace)::row_stats_kernel<float>(float const*, ...)' -> 'row_stats_kernel'"""
    base = name.split("(")[0] if not name.startswith("void (") else name[5:].split(">(")[0]
    base = base.split("<")[0].replace("(anonymous namespace)::", "")
    return base.removeprefix("void ").split("::")[-1].strip() or name[:40]


def one_cuda(name: str, fn, args, reps: int, nbytes: int) -> dict:
    peak = peak_extra_mb(fn, args, "cuda")
    med, p20, p80 = summary(timeit(fn, args, "cuda", reps))
    return dict(
        provider=name,
        median_ms=med,
        p20_ms=p20,
        p80_ms=p80,
        gbps=nbytes / med / 1e6,
        peak_extra_mb=peak,
    )


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_cuda_table(rows: list[dict], R: int, V: int) -> None:
    print(
        "| dtype | provider | median ms (p20-p80) | GB/s | % copy | % read | raw _C ms "
        "| row_stats ms (GB/s, % copy) | GPU ms | host ms | max diff (greedy) | peak extra MB "
        "| speedup vs eager |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['dtype']} | {r['provider']} | error: {r['error'][:300]} |")
            continue
        nbytes = R * V * DT[r["dtype"]].itemsize
        rs = r.get("row_stats_ms")
        if rs:
            rs_gbps = nbytes / rs / 1e6
            rs_txt = f"{rs:.3f} ({rs_gbps:.0f}, {100 * rs_gbps / r['copy_gbps']:.0f}%)"
        else:
            rs_txt = "n/a" if "raw_ms" in r else "-"
        gpu, raw = r.get("gpu_ms"), r.get("raw_ms")
        host = raw - gpu if gpu is not None and raw is not None else None
        diff = "-"
        if "max_diff" in r:
            diff = f"{r['max_diff']:.1e} ({r['greedy_mismatch']})"
        print(
            f"| {r['dtype']} | {r['provider']} | {r['median_ms']:.3f} ({r['p20_ms']:.3f}-"
            f"{r['p80_ms']:.3f}) | {r['gbps']:.0f} | {100 * r['gbps'] / r['copy_gbps']:.0f}% "
            f"| {100 * r['gbps'] / r['read_gbps']:.0f}% | {_f(raw, '.3f')} | {rs_txt} "
            f"| {_f(gpu, '.3f')} | {_f(host, '.3f')} | {diff} "
            f"| {_f(r.get('peak_extra_mb'), '.0f')} | {_f(r.get('speedup'), '.2f')} |"
        )
    errors: dict[str, list[str]] = {}
    for r in rows:
        if "profiler_error" in r:
            errors.setdefault(r["profiler_error"][:300], []).append(f"{r['dtype']} {r['provider']}")
        if "kernels" in r:
            parts = {}
            for k, t in r["kernels"].items():
                parts[short_kernel_name(k)] = parts.get(short_kernel_name(k), 0.0) + t
            txt = ", ".join(f"{k} {t:.4f}" for k, t in sorted(parts.items(), key=lambda kv: -kv[1]))
            print(f"device ms per raw call, {r['dtype']} {r['provider']}: {txt}")
    for err, who in errors.items():
        print(f"profiler n/a ({', '.join(who)}): {err}")
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        c = next(r for r in rows if r["dtype"] == dtype)
        print(
            f"{dtype}: target (issue 2) 80% of the copy bandwidth measured here = "
            f"{0.8 * c['copy_gbps']:.0f} GB/s, i.e. a whole op of "
            f"{R * V * DT[dtype].itemsize / (0.8 * c['copy_gbps']) / 1e6:.3f} ms"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rows", type=int, default=None, help="R (default 4096 on CPU, 16384 on GPU)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument(
        "--variants",
        default=",".join(map(str, CUDA_VARIANTS)),
        help="CUDA row_stats kernel variants to compare (default: all)",
    )
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
    if a.device == "cuda":
        variants = [int(v) for v in a.variants.split(",") if v]
        for dtype in a.dtypes.split(","):
            rows += cuda_rows(R, a.vocab, dtype, reps, variants)
    else:
        for dtype in a.dtypes.split(","):
            for name in ("eager", "wmdp_fast"):
                cmd = [sys.executable, __file__, "--rows", str(R), "--vocab", str(a.vocab)]
                cmd += ["--reps", str(reps), "--_one", f"{name}:{dtype}"]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(
        f"\ngather_logprobs, R={R} rows x V={a.vocab}, 4 targets/row, {dev}, torch {torch.__version__}"
    )
    if a.device == "cuda":
        print_cuda_table(rows, R, a.vocab)
    else:
        print(
            "| dtype | provider | median ms (p20-p80) | GB/s (logits read once) "
            "| peak extra MB | speedup |"
        )
        print("|---|---|---|---|---|---|")
        for i in range(0, len(rows), 2):
            e, f = rows[i], rows[i + 1]
            for r in (e, f):
                sp = e["median_ms"] / r["median_ms"]
                print(
                    f"| {r['dtype']} | {r['provider']} | {r['median_ms']:.2f} "
                    f"({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) | {r['gbps']:.0f} "
                    f"| {r['peak_extra_mb']:.0f} | {sp:.2f}x |"
                )
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(rows, fh, indent=1)
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
