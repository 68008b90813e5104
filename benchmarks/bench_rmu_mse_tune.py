"""GPU tuning aid for kernels/rmu_mse.py: block-size / num_warps sweep of the fused forward
(stage 1 + 2, gradient written), host overhead per call, and the card's copy bandwidth.

    python benchmarks/bench_rmu_mse_tune.py          # needs a CUDA GPU
"""

from __future__ import annotations

import time

import torch
import triton
import triton.testing
from wmdp_fast.kernels import rmu_mse as K

from wmdp_fast import ops


def gpu_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def host_us(fn, n=300) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main() -> None:
    dev = "cuda"
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__)
    src = torch.empty(2**28, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src))
    print(f"copy bandwidth (read + write): {2 * src.numel() / ms / 1e6:.0f} GB/s")

    small = torch.randn(1, 4, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True)
    st = torch.randn(1, 4, 4096, device=dev, dtype=torch.bfloat16)

    def fwd_bwd_small():
        small.grad = None
        ops.rmu_mse(small, st).backward()

    def fwd_small():
        with torch.no_grad():
            ops.rmu_mse(small, st)

    print(
        f"host time per call: fwd+bwd {host_us(fwd_bwd_small):.1f} us, "
        f"fwd only {host_us(fwd_small):.1f} us, "
        f"rmu_loss fwd+bwd {host_us(lambda: ops.rmu_loss(small, st[:, :1], small, st, 2.0)[0].backward()):.1f} us"
    )

    part = torch.randn(3072, device=dev)
    out = torch.empty(3, device=dev)
    launch = host_us(lambda: K._finish_kernel[(1,)](part, 3072, 3072, 1.0, 1.0, out, BLOCK=4096))
    print(f"host time of one bare Triton launch (7 args): {launch:.1f} us")
    profile_host(small, st)
    for shape in [(4, 768, 4096), (8, 2048, 8192)]:
        tune_shape(shape)


def profile_host(h, t) -> None:
    from torch.profiler import ProfilerActivity, profile

    def step():
        h.grad = None
        ops.rmu_mse(h, t).backward()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def tune_shape(shape, dev="cuda") -> None:
    h = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
    t = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
    nbytes = 3 * h.numel() * 2

    def fwd():
        K.mse_forward(h, t, None, 1.0, None, True)

    orig = K.block_settings
    results = []
    for block in (1024, 2048, 4096, 8192):
        for warps in (2, 4, 8, 16):
            if block // (32 * warps) < 2 or block // (32 * warps) > 64:
                continue
            K.block_settings = lambda D, b=block, w=warps: (b, w)
            results.append((gpu_ms(fwd), block, warps))
    K.block_settings = orig
    results.sort()
    print(f"shape {shape}: fused forward (grad written), best first:")
    for ms, block, warps in results[:6]:
        print(
            f"  BLOCK_D={block:5d} warps={warps:2d}: {ms * 1e3:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s"
        )
    b, w = orig(shape[-1])
    print(f"  current default BLOCK_D={b} warps={w}: {gpu_ms(fwd) * 1e3:.1f} us")
    hg = h.clone().requires_grad_(True)

    def full():
        hg.grad = None
        ops.rmu_mse(hg, t).backward()

    print(f"  ops.rmu_mse fwd+bwd (do_bench): {gpu_ms(full) * 1e3:.1f} us")


if __name__ == "__main__":
    main()
