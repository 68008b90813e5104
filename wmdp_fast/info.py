"""python -m wmdp_fast.info: print what this installation compiled and which backends run."""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m wmdp_fast.info",
        description="Show versions, compiled extensions and the backend of each op.",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    from wmdp_fast import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"wmdp_fast {info['wmdp_fast']}")
    for k, v in info["versions"].items():
        print(f"  {k:<13} {v}")
    print(f"  cuda          {info['cuda_device'] or 'not available'}")
    print(
        f"  _C (CPU)      {'compiled' if info['C_cpu_compiled'] else 'MISSING: ' + str(info['C_error'])}"
    )
    print(f"  _C (CUDA)     {'compiled' if info['C_cuda_compiled'] else 'not compiled'}")
    print(f"  triton        {info['triton']}")
    for dev, ops in info["backends"].items():
        print(f"  backends on {dev}:")
        width = max(map(len, ops), default=0)
        for op, b in ops.items():
            print(f"    {op:<{width}} {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
