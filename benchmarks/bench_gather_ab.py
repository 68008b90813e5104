"""A/B of two builds of wmdp_fast._C's CPU gather_logprobs, called alternately in one process.

On a shared machine, separate benchmark runs drift with the load; calling both builds in turn
on the same inputs exposes them to the same load. Keep a copy of the old build first, e.g.

    cp wmdp_fast/_C*.so /tmp/C_old.so        # before rebuilding
    pip install --no-build-isolation -e .     # the new build
    python benchmarks/bench_gather_ab.py /tmp/C_old.so wmdp_fast/_C*.so

Prints, per dtype, each build's median ms over --reps alternating calls, the ratio, and the
largest loglik difference between them (is_greedy must be identical).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch


def load(path: str, tag: str):
    # the module's init function is PyInit__C, so the name must end in "._C"; a distinct package
    # name lets two builds live in one process
    spec = importlib.util.spec_from_file_location(f"ab_{tag}._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("a", help="path of build A's _C*.so (e.g. the old one)")
    p.add_argument("b", help="path of build B's _C*.so")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    mods = {"A": load(a.a, "a"), "B": load(a.b, "b")}
    R, V = a.rows, a.vocab
    g = torch.Generator().manual_seed(0)
    print(f"R={R} x V={V}, 4 targets/row, {torch.get_num_threads()} threads, {a.reps} calls each")
    print("| dtype | A median ms | B median ms | A/B | max abs loglik diff |")
    print("|---|---|---|---|---|")
    for name in a.dtypes.split(","):
        dtype = getattr(torch, name)
        logits = (torch.randn(R, V, generator=g) * 3).to(dtype)
        ri = torch.arange(R).repeat_interleave(4)
        tg = torch.randint(0, V, (4 * R,), generator=g)
        off = torch.arange(4 * R + 1)
        out = {k: m.gather_logprobs(logits, ri, tg, off) for k, m in mods.items()}
        if not torch.equal(out["A"][1], out["B"][1]):
            print(f"{name}: is_greedy differs between the builds", file=sys.stderr)
            return 1
        diff = (out["A"][0] - out["B"][0]).abs().max().item()
        ts: dict[str, list[float]] = {k: [] for k in mods}
        for _ in range(a.reps):
            for k, m in mods.items():
                t = time.perf_counter()
                m.gather_logprobs(logits, ri, tg, off)
                ts[k].append(time.perf_counter() - t)
        ma, mb = (statistics.median(ts[k]) * 1e3 for k in ("A", "B"))
        print(f"| {name} | {ma:.2f} | {mb:.2f} | {ma / mb:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
