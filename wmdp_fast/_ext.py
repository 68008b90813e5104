"""Loads the compiled extension wmdp_fast._C once, warning once if it is missing."""

from __future__ import annotations

import logging
import os
from types import ModuleType

log = logging.getLogger("wmdp_fast")

_C: ModuleType | None = None
_tried = False
_error: str | None = None


def load_C() -> ModuleType | None:
    """Return the compiled extension, or None (after ONE warning) if it is not available.

    Setting WMDP_FAST_DISABLE_C=1 forces the plain-PyTorch fallback (used by tests).
    """
    global _C, _tried, _error
    if _tried:
        return _C
    _tried = True
    if os.environ.get("WMDP_FAST_DISABLE_C") == "1":
        _error = "disabled by WMDP_FAST_DISABLE_C=1"
        log.warning("wmdp_fast: C++ extension %s; using the plain-PyTorch reference ops", _error)
        return None
    try:
        from wmdp_fast import _C as mod  # type: ignore[attr-defined]
    except ImportError as exc:
        _error = f"not available ({exc})"
        log.warning(
            "wmdp_fast: C++ extension wmdp_fast._C is %s; using the slower plain-PyTorch "
            "reference ops. Reinstall with a C++ compiler: "
            "pip install --no-build-isolation -e .",
            _error,
        )
        return None
    _C = mod
    return _C


def load_error() -> str | None:
    """Why the extension is not used (None when it is)."""
    load_C()
    return _error


def _reset_for_tests() -> None:
    global _C, _tried, _error
    _C, _tried, _error = None, False, None
