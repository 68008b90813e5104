"""Host-side (Python + launch) cost of ops.rmu_mse forward + backward, part by part: where the
microseconds per call go when the activations are small (the GPU then waits for the host).

    python benchmarks/bench_rmu_mse_hostprof.py              # on a CUDA GPU, about 5 s
    python benchmarks/bench_rmu_mse_hostprof.py --cpu-stub   # CPU, Triton launches replaced by
                                                             # no-ops: the Python layers alone

Each line is the mean over N calls of one part, measured alone (minimum over 3 rounds, to
discount a noisy machine); the parts of a forward + backward are: the argument checks of
wmdp_fast.ops, `_Term` (strides, flags, the gradient buffer), the stage-1 launch, the finish
launch, the autograd.Function machinery, and in the backward the rescale launch. Then
cProfile's top entries for the whole forward + backward (backward in the calling thread so
that cProfile sees it).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from wmdp_fast.kernels import load

from wmdp_fast import ops


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing (--cpu-stub)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, dev: str, n: int) -> float:
    best = float("inf")
    for _ in range(3):
        fn()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()  # host time: the GPU work may still be queued
        _sync(dev)
        best = min(best, (t1 - t0) / n * 1e6)
    return best


class _Identity(torch.autograd.Function):
    """The autograd.Function machinery alone: forward returns a ready scalar, backward a
    ready gradient (what RMUMSEFunction costs besides its launches)."""

    @staticmethod
    def forward(ctx, hidden, loss, grad):
        ctx.save_for_backward(grad, hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, _ = ctx.saved_tensors
        return grad, None, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cpu-stub", action="store_true", help="CPU, kernel launches are no-ops")
    ap.add_argument("-n", type=int, default=300, help="calls per measurement (default 300)")
    args = ap.parse_args(argv)
    K = load("rmu_mse")
    if args.cpu_stub:
        dev = "cpu"
        torch.set_num_threads(1)
        for name in ("_rmu_mse_kernel", "_finish_kernel", "_rescale_kernel", "_rmu_loss_kernel"):
            setattr(K, name, _NoLaunch())
    elif torch.cuda.is_available():
        dev = "cuda"
    else:
        print("error: needs a CUDA GPU (or --cpu-stub)", file=sys.stderr)
        return 2
    h = torch.randn(1, 4, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(1, 4, 4096, device=dev, dtype=torch.bfloat16)
    one = torch.ones((), device=dev)
    loss0, grad0 = torch.zeros((), device=dev), torch.zeros_like(h)
    term = K._Term(h, t, None, None, 1.0, True)
    block, warps, rows, pdl = K.launch_config(term.D)
    part = torch.empty(term.n_rows, device=dev)
    # the real op goes through ops (checks, backend); the stub calls the kernel module directly
    op = ops.rmu_mse if dev == "cuda" else (lambda x, y: K.rmu_mse(x, y, None, 1.0, None))

    def fwd_bwd():
        h.grad = None
        op(h, t).backward()

    def fwd_only():
        with torch.no_grad():
            op(h, t)

    def checks():
        ops._check_hidden("rmu_mse", "hidden", h)
        ops._check_target("rmu_mse", "target", t, "hidden", h)
        ops._check_mask("rmu_mse", "mask", None, "hidden", h)
        ops._check_number("rmu_mse", "scale", 1.0)
        backend = ops._select_backend("rmu_mse", h.device)
        with ops._on_device(backend, h.device):
            ops._kernel_module("rmu_mse", backend)

    def stage1():
        K._rmu_mse_kernel[(term.n_rows,)](
            part, part, part, term.n_rows, term.loss_mul, *term.args(), *term.flags(),
            BLOCK_D=block, FUSED_FINISH=False, FINISH_BLOCK=K.FINISH_BLOCK, num_warps=warps,
        )  # fmt: skip

    def identity_fn():
        h.grad = None
        _Identity.apply(h, loss0, grad0).backward()

    def eager():
        h.grad = None
        F.mse_loss(h.float(), t.float()).backward()

    parts = [
        ("ops.rmu_mse forward + backward (whole)", fwd_bwd),
        ("ops.rmu_mse forward only, no_grad (whole)", fwd_only),
        ("  ops argument checks + backend + device context", checks),
        ("  _Term (strides, flags, gradient buffer)", lambda: K._Term(h, t, None, None, 1.0, True)),
        ("  stage-1 launch alone (35 args)", stage1),
        ("  finish launch alone", lambda: K._finish(part, term.n_rows, 1.0, 0.0)),
        ("  rescale_ launch alone (backward)", lambda: K.rescale_([grad0], one)),
        ("  autograd.Function fwd + bwd, no kernels", identity_fn),
        ("  torch.empty x3", lambda: [torch.empty(3, device=dev) for _ in range(3)]),
        ("eager F.mse_loss(float casts) forward + backward", eager),
    ]
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "CPU, launches stubbed"
    print(f"host us per call, {name}, torch {torch.__version__}, shape (1, 4, 4096) bf16")
    for label, fn in parts:
        print(f"{per_call_us(fn, dev, args.n):8.1f}  {label}")
    ctx = torch.autograd.set_multithreading_enabled(False)
    with ctx if dev == "cuda" else contextlib.nullcontext():
        print(
            f"{per_call_us(fwd_bwd, dev, args.n):8.1f}  forward + backward, backward in this thread"
        )
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            fwd_bwd()
        _sync(dev)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
