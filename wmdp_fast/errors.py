"""The error hierarchy of wmdp_fast.

Every error a user can cause derives from `WmdpFastError`; the CLIs turn it into one clear
line and a non-zero exit (traceback only with --debug). Messages say what was wrong, where
(file, row, argument) and, where possible, what to do.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class WmdpFastError(Exception):
    """Base class of all wmdp_fast errors."""


class DataError(WmdpFastError, ValueError):
    """A dataset or corpus is missing, malformed or empty (names file, row and field)."""


class ConfigError(WmdpFastError, ValueError):
    """An option or combination of options is invalid (names the option)."""


class ModelError(WmdpFastError):
    """A model cannot be loaded or does not have the expected structure (layers, params)."""


class CacheError(WmdpFastError):
    """An activation cache file is stale, corrupted or unreadable."""


class TrainingError(WmdpFastError):
    """Training diverged (NaN/inf loss) or could not continue."""


class ResourceError(WmdpFastError):
    """Not enough (GPU) memory for the requested run; names the flag that would make it fit."""


def run_cli(body: Callable[[], int], debug: bool = False) -> int:
    """Run a CLI's work and return its exit status: a WmdpFastError prints `error: <message>`
    and gives 1, Ctrl-C prints `interrupted` and gives 130 (outputs are written atomically, so
    nothing half-written is left behind); with `debug` both re-raise, traceback and all.

    SIGTERM (`kill`, `timeout`, a Slurm time limit) is handled as Ctrl-C: by default it ends
    Python without running `finally` blocks, which would leave temporary files and folders
    behind (and, in training, no checkpoint)."""
    import signal
    import threading

    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return body()
    except WmdpFastError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
