"""Prints the sha256 of everything that goes into wmdp_fast._C (setup.py and csrc/), so that
benchmarks/gpu_check.sh uses a prebuilt extension (benchmarks/make_gpu_build.sh) only when it was
built from exactly these sources.

  python benchmarks/ext_source_hash.py    # run from anywhere
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def source_hash(root: Path = ROOT) -> str:
    files = [root / "setup.py", *sorted(p for p in (root / "csrc").rglob("*") if p.is_file())]
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


if __name__ == "__main__":
    print(source_hash(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT))
