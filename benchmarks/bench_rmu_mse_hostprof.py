"""Host-side (Python) profile of ops.rmu_mse forward + backward on a GPU: where the
microseconds per call go when the activations are small. Backward runs in the calling thread
so that cProfile sees it.

    python benchmarks/bench_rmu_mse_hostprof.py
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch
from wmdp_fast.kernels import rmu_mse as K

from wmdp_fast import ops


def main() -> None:
    h = torch.randn(1, 4, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(1, 4, 4096, device="cuda", dtype=torch.bfloat16)

    def step():
        h.grad = None
        ops.rmu_mse(h, t).backward()

    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            step()
        torch.cuda.synchronize()
        print(f"fwd+bwd, backward in this thread: {(time.perf_counter() - t0) / 200 * 1e6:.1f} us")
        g = torch.empty_like(h)
        go = torch.ones((), device="cuda")
        t0 = time.perf_counter()
        for _ in range(200):
            K.rescale_([g], go)
        torch.cuda.synchronize()
        print(f"rescale_ alone: {(time.perf_counter() - t0) / 200 * 1e6:.1f} us")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            step()
        torch.cuda.synchronize()
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
