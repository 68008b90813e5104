"""Triton kernels of wmdp_fast (installed as wmdp_fast.kernels).

One kernel family per file: the @triton.jit kernels, a host launcher that picks block sizes and
num_warps, and the torch.autograd.Function. Use them through `wmdp_fast.ops`, which picks the
backend by device.

`load(name, interpret=True)` gives a separate copy of kernels/<name>.py whose kernels run in
Triton's interpreter on CPU tensors. `triton.jit` decides between the compiler and the
interpreter when a kernel is DEFINED (it reads TRITON_INTERPRET at decoration time), so the
interpreted copy is made by executing the module's source again with TRITON_INTERPRET=1; the
compiled module is untouched, and both can be used in one process.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType

_lock = threading.Lock()
_interpreted: dict[str, ModuleType] = {}


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


def load(name: str, interpret: bool = False) -> ModuleType:
    """The kernel module `name`: compiled for the GPU, or (interpret=True) an interpreted copy."""
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
            mod.INTERPRETED = True
            _interpreted[name] = mod
        return mod
