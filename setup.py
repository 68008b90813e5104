"""Builds wmdp_fast._C (torch cpp_extension + ninja) and maps kernels/ to wmdp_fast.kernels.

Environment:
  WMDP_FAST_CUDA=1   build the CUDA kernels (fails loudly if they cannot be built)
  WMDP_FAST_CUDA=0   never build them
  (unset)            build them when the installed torch has CUDA and torch's nvcc
                     (CUDA_HOME/bin/nvcc) exists; if that build fails, the CPU-only extension is
                     built instead, with a warning saying why

If the C++ extension cannot be compiled at all (no compiler, say) the install still completes with
a warning; wmdp_fast then falls back to its plain-PyTorch reference ops and says so once.
pip shows these warnings only with -v; `python -m wmdp_fast.info` says what was compiled.
Build with `pip install --no-build-isolation ...` so that the torch you run with is the one the
extension is compiled against (build isolation would download a second, possibly different torch).
"""

import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NAME = "wmdp_fast._C"
CPU_SOURCES = ["csrc/bindings.cpp", "csrc/gather_logprobs_cpu.cpp"]
CUDA_SOURCES = ["csrc/gather_logprobs_cuda.cu"]
CXX_FLAGS = ["-O3", "-g0", "-std=c++17", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17"]


def _warn(msg: str) -> None:
    print(f"wmdp_fast: WARNING: {msg}", file=sys.stderr)


def _torch_nvcc(cuda_home: str | None) -> str | None:
    """The nvcc torch's cpp_extension compiles .cu files with (CUDA_HOME/bin/nvcc), if it exists.
    torch sets CUDA_HOME whenever /usr/local/cuda exists, even without nvcc in it."""
    if not cuda_home:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc.exe" if os.name == "nt" else "nvcc")
    return nvcc if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK) else None


def _want_cuda(torch_cuda: bool) -> tuple[bool, str]:
    """(build the CUDA kernels?, why), from WMDP_FAST_CUDA, torch's CUDA support and nvcc.

    WMDP_FAST_CUDA=1 with a CPU-only torch or without nvcc raises at once (fail loudly)."""
    flag = os.environ.get("WMDP_FAST_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"WMDP_FAST_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False, "WMDP_FAST_CUDA=0"
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = _torch_nvcc(CUDA_HOME)
    if not torch_cuda:
        why = "the installed torch has no CUDA support"
    elif nvcc is None:
        why = f"no nvcc at CUDA_HOME/bin/nvcc (CUDA_HOME={CUDA_HOME})"
        on_path = shutil.which("nvcc")
        if on_path:
            why += f"; nvcc on PATH ({on_path}) is not used: set CUDA_HOME to its toolkit"
    else:
        return True, f"torch has CUDA and nvcc is {nvcc}"
    if flag == "1":
        raise RuntimeError(f"WMDP_FAST_CUDA=1 but the CUDA kernels cannot be built: {why}")
    return False, why


def _extension(cuda: bool):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    if cuda:
        return CUDAExtension(
            NAME,
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("WMDP_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        NAME,
        CPU_SOURCES,
        extra_compile_args={"cxx": list(CXX_FLAGS)},
        extra_link_args=["-fopenmp"],
    )


def _has_cuda_sources(ext) -> bool:
    return any(str(s).endswith(".cu") for s in ext.sources)


def _tolerant_build(base, make_cpu_extension, cuda_forced: bool):
    """A build_ext class on top of `base` (torch's BuildExtension) that never loses the CPU
    extension to a CUDA failure:
    - CUDA part fails, WMDP_FAST_CUDA=1: the error propagates (the build fails loudly);
    - CUDA part fails otherwise: warns with the reason and builds `make_cpu_extension()` instead;
    - the CPU build fails (no compiler, say): warns; the install completes without _C.
    torch checks the compiler in build_extensions, before any build_extension call, so both
    failures surface from build_extensions."""

    class TolerantBuild(base):
        def build_extensions(self):
            # torch's build_extensions patches the compiler object; a retry must start clean
            saved = {k: self.compiler.__dict__.get(k) for k in ("compile", "_compile")}
            try:
                return super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                cuda = [e for e in self.extensions if _has_cuda_sources(e)]
                if cuda and cuda_forced:
                    raise
                if not cuda:
                    _warn(
                        f"could not build {NAME} ({exc}); the plain-PyTorch fallback will be used"
                    )
                    self.extensions = []  # nothing to copy or package
                    return None
                _warn(
                    f"building the CUDA kernels of {NAME} failed ({exc}; the compiler output is above); "
                    "CUDA dropped, building "
                    "the CPU-only extension instead (CUDA tensors will use the plain-PyTorch ops). "
                    "Set WMDP_FAST_CUDA=1 to make this an error, WMDP_FAST_CUDA=0 to skip CUDA."
                )
            for k, v in saved.items():
                if v is None:
                    self.compiler.__dict__.pop(k, None)
                else:
                    setattr(self.compiler, k, v)
            self.extensions = [_cpu_twin(self, e, make_cpu_extension) for e in self.extensions]
            try:
                return super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                _warn(
                    f"could not build the CPU-only {NAME} either ({exc}); the plain-PyTorch "
                    "fallback will be used"
                )
                self.extensions = []
                return None

    return TolerantBuild


def _cpu_twin(cmd, ext, make_cpu_extension):
    """`ext` itself if it has no CUDA sources, else a fresh CPU-only extension carrying the
    attributes setuptools' build_ext.finalize_options set on `ext`."""
    if not _has_cuda_sources(ext):
        return ext
    new = make_cpu_extension()
    for attr in ("_full_name", "_links_to_dynamic", "_needs_stub"):
        if hasattr(ext, attr):
            setattr(new, attr, getattr(ext, attr))
    ext_map = getattr(cmd, "ext_map", None)
    if isinstance(ext_map, dict):
        for key, value in list(ext_map.items()):
            if value is ext:
                ext_map[key] = new
    return new


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        _warn(
            "torch is not importable at build time; skipping the C++ extension "
            "(install torch first and use --no-build-isolation)"
        )
        return [], {}

    cuda, why = _want_cuda(torch.version.cuda is not None)
    print(
        f"wmdp_fast: building {NAME} {'with' if cuda else 'without'} CUDA ({why})", file=sys.stderr
    )
    build = _tolerant_build(
        BuildExtension.with_options(use_ninja=True),
        lambda: _extension(cuda=False),
        cuda_forced=os.environ.get("WMDP_FAST_CUDA", "").strip() == "1",
    )
    return [_extension(cuda)], {"build_ext": build}


ext_modules, cmdclass = _extensions()

setup(
    packages=["wmdp_fast", "wmdp_fast.kernels", "wmdp_fast.demo"],
    package_dir={"wmdp_fast": "wmdp_fast", "wmdp_fast.kernels": "kernels"},
    package_data={"wmdp_fast.demo": ["*.json", "*.jsonl", "data/*", "model/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
