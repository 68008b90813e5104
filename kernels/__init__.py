"""Triton kernels of wmdp_fast (installed as wmdp_fast.kernels).

One kernel family per file: the @triton.jit kernels, a host launcher that picks block sizes and
num_warps, and the torch.autograd.Function. Use them through `wmdp_fast.ops`, which picks the
backend by device.

`load(name, interpret=True)` gives a separate copy of kernels/<name>.py whose kernels run in
Triton's interpreter on CPU tensors. `triton.jit` decides between the compiler and the
interpreter when a kernel is DEFINED (it reads TRITON_INTERPRET at decoration time), so the
interpreted copy is made by executing the module's source again with TRITON_INTERPRET=1; the
compiled module is untouched, and both can be used in one process.

`compile_for(kernel, *args, arch=90, **kwargs)` compiles a kernel of the compiled module for a
CUDA target without a GPU (specialised as a launch with these arguments would be), to read its
PTX and TTGIR.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import threading
from types import ModuleType

_lock = threading.Lock()
_launch_lock = threading.RLock()
_interpreted: dict[str, ModuleType] = {}
_shadows: dict = {}
_triton_imported = False
_MISSING = object()


@contextlib.contextmanager
def interpret_env():
    """Sets TRITON_INTERPRET=1 for the duration (restoring the previous value)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _import_triton_compiled() -> None:
    """Imports triton (and the parts it imports lazily at launch) with TRITON_INTERPRET unset,
    unless the user set it: importing triton under the interpreter turns its standard library
    (tl.sum, ...) into interpreted functions that the GPU compiler cannot use."""
    global _triton_imported
    if _triton_imported:
        return
    import triton
    import triton.language  # noqa: F401

    with contextlib.suppress(Exception):
        import triton.experimental.gluon  # noqa: F401
    _triton_imported = True


@contextlib.contextmanager
def interpreter_launch():
    """Context for launching an interpreted kernel in a process whose triton was imported for
    the compiler: calls from the kernel into @triton.jit helpers (ours and triton's standard
    library, e.g. tl.sum) run in the interpreter too. Launches are serialised."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def call(self, *args, **kwargs):
        # keyed by id: hashing a JITFunction parses its source (and fails mid-interpretation)
        entry = _shadows.get(id(self))
        if entry is None or entry[0] is not self:
            entry = _shadows[id(self)] = (self, InterpretedFunction(self.fn))
        return entry[1](*args, **kwargs)

    with _launch_lock, interpret_env():
        original = JITFunction.__call__
        JITFunction.__call__ = call
        saved = _language_attrs()
        try:
            yield
        finally:
            JITFunction.__call__ = original
            _restore_language_attrs(saved)


def _language_objects() -> list:
    import triton.language as tl

    objects = [tl, tl.core, tl.math, tl.core.tensor]
    descriptor = getattr(tl.core, "tensor_descriptor_base", None)  # not in older triton
    return objects + ([descriptor] if descriptor is not None else [])


def _language_attrs() -> list:
    return [(obj, dict(vars(obj))) for obj in _language_objects()]


def _restore_language_attrs(saved: list) -> None:
    """Undoes what the interpreter patched into triton.language: a call from an interpreted
    kernel into a @triton.jit helper (InterpretedFunction.__call__, triton 3.9) replaces
    tl.tensor's methods and tl's builtins with interpreter versions and never restores them, so
    a kernel compiled for the GPU later in the same process failed to compile ('block_argument'
    object has no attribute 'dtype')."""
    for obj, attrs in saved:
        added = [n for n, v in vars(obj).items() if n not in attrs and not inspect.ismodule(v)]
        for name in added:  # (a submodule imported meanwhile stays)
            delattr(obj, name)
        for name, value in attrs.items():
            if vars(obj).get(name, _MISSING) is not value:
                setattr(obj, name, value)


_sm_counts: dict[int, int] = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of CUDA `device` (cached per device index): the unit the
    kernels size their fixed grids in (rmsnorm's weight-gradient partials, rmu_mse's rescale)."""
    import torch

    device = torch.device(device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _sm_counts.get(idx)
    if n is None:
        n = _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def load(name: str, interpret: bool = False) -> ModuleType:
    """The kernel module `name`: compiled for the GPU, or (interpret=True) an interpreted copy."""
    _import_triton_compiled()
    if not interpret:
        return importlib.import_module(f"{__name__}.{name}")
    with _lock:
        mod = _interpreted.get(name)
        if mod is None:
            path = os.path.join(os.path.dirname(__file__), f"{name}.py")
            full = f"{__name__}._interpreted_{name}"
            spec = importlib.util.spec_from_file_location(full, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[full] = mod
            with interpret_env():
                spec.loader.exec_module(mod)
            _interpreted[name] = mod
        return mod


def compile_for(kernel, *args, arch: int = 90, **kwargs):
    """`kernel` (a @triton.jit function of a compiled module, see `load`) compiled for CUDA
    compute capability `arch` as a launch `kernel[grid](*args, **kwargs)` would compile it (same
    argument specialisation: 16-byte aligned pointers, ints divisible by 16 or equal to 1,
    options such as num_warps; the debug / instrumentation knobs that a launch fills in from the
    environment are left at their defaults). Needs no GPU: tensors may be CPU tensors (only their dtype and
    data_ptr alignment matter). Returns triton's CompiledKernel; `.asm["ptx"]`, `.asm["ttgir"]`
    hold the code. Uses triton's launch internals (triton 3.x: JITFunction._pack_args and
    runtime.jit.create_function_from_signature)."""
    _import_triton_compiled()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    src = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)
