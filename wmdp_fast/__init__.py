"""wmdp_fast: fast WMDP/MMLU evaluation with lm-eval parity, and RMU unlearning on one GPU."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "build_info"]


def build_info() -> dict:
    """What this installation can do: library versions, compiled backends, and which backend
    each op uses on the CPU and (if present) on the GPU."""
    import importlib.metadata as md

    import torch

    from wmdp_fast import _ext, ops

    def version(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    C = _ext.load_C()
    cuda_ok = torch.cuda.is_available()
    try:
        import triton  # noqa: F401

        triton_mode = "gpu" if cuda_ok else "interpreter-only (TRITON_INTERPRET=1)"
    except ImportError:
        triton_mode = "not installed"
    devices = ["cpu"] + (["cuda"] if cuda_ok else [])
    return {
        "wmdp_fast": __version__,
        "versions": {
            "python": __import__("sys").version.split()[0],
            "torch": torch.__version__,
            "triton": version("triton"),
            "transformers": version("transformers"),
            "bitsandbytes": version("bitsandbytes"),
        },
        "cuda_available": cuda_ok,
        "cuda_device": torch.cuda.get_device_name(0) if cuda_ok else None,
        "C_cpu_compiled": C is not None,
        "C_cuda_compiled": bool(C is not None and C.with_cuda()),
        "C_error": _ext.load_error(),
        "triton": triton_mode,
        "backends": {dev: {op: ops.backend_of(op, dev) for op in ops.OPS} for dev in devices},
    }
