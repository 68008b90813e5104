"""Atomic writes: everything is written to a temporary sibling, then renamed into place with
os.replace, so a crash or an error never leaves a half-written file or folder behind.

The temporary file or folder gets the permissions a plain new one would get (0666 or 0777 minus
the umask): `tempfile` creates them 0600 / 0700, which would otherwise survive the rename.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def set_new_file_mode(path: str | Path) -> None:
    """Give `path` the permissions a plain new file gets (0666 minus the umask). For files made
    by tempfile or by safetensors' save_file, which both create them 0600."""
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it replaces `path`, on an
    error it is removed. `suffix` ends the temporary name (e.g. ".png" for matplotlib)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        set_new_file_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8, '\\n' line ends) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def make_temp_dir(target: str | Path) -> Path:
    """A new temporary folder beside `target`, to be renamed onto it once complete."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp
