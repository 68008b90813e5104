"""Builds wmdp_fast._C (torch cpp_extension + ninja) and maps kernels/ to wmdp_fast.kernels.

Environment:
  WMDP_FAST_CUDA=1   build the CUDA kernels (fails loudly if they cannot be built)
  WMDP_FAST_CUDA=0   never build them
  (unset)            build them when the installed torch has CUDA and nvcc is found

If the C++ extension cannot be compiled (no compiler, say) the install still completes with a
warning; wmdp_fast then falls back to its plain-PyTorch reference ops and says so once.
Build with `pip install --no-build-isolation ...` so that the torch you run with is the one the
extension is compiled against (build isolation would download a second, possibly different torch).
"""

import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda(torch_cuda: bool) -> bool:
    flag = os.environ.get("WMDP_FAST_CUDA", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        return True
    from torch.utils.cpp_extension import CUDA_HOME

    return torch_cuda and (CUDA_HOME is not None or shutil.which("nvcc") is not None)


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "wmdp_fast: torch is not importable at build time; skipping the C++ extension "
            "(install torch first and use --no-build-isolation)",
            file=sys.stderr,
        )
        return [], {}

    cpu_sources = ["csrc/bindings.cpp", "csrc/gather_logprobs_cpu.cpp"]
    cxx_flags = ["-O3", "-g0", "-std=c++17", "-fopenmp"]
    if _want_cuda(torch.version.cuda is not None):
        ext = CUDAExtension(
            "wmdp_fast._C",
            cpu_sources + ["csrc/gather_logprobs_cuda.cu"],
            define_macros=[("WMDP_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "wmdp_fast._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )

    class TolerantBuild(BuildExtension):
        """Builds the extension, but lets the install finish if the compiler is missing or fails
        (torch checks the compiler in build_extensions, before any build_extension call)."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if os.environ.get("WMDP_FAST_CUDA") == "1":
                    raise
                print(
                    f"wmdp_fast: WARNING: could not build wmdp_fast._C ({exc}); "
                    "the plain-PyTorch fallback will be used",
                    file=sys.stderr,
                )
                self.extensions = []  # nothing to copy or package

    return [ext], {"build_ext": TolerantBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["wmdp_fast", "wmdp_fast.kernels", "wmdp_fast.demo"],
    package_dir={"wmdp_fast": "wmdp_fast", "wmdp_fast.kernels": "kernels"},
    package_data={"wmdp_fast.demo": ["*.json", "*.jsonl", "data/*", "model/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
