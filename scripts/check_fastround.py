#!/usr/bin/env python
"""Exhaustive check: ``numstab.fastround.quantize_into`` equals ``numstab.precision.quantize``
bit for bit on all 2**32 float32 patterns, for float16 and bfloat16 (a few minutes).

Usage::

    python scripts/check_fastround.py                 # both formats
    python scripts/check_fastround.py --formats float16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from numstab import workspace  # noqa: E402
from numstab.fastround import quantize_into  # noqa: E402
from numstab.precision import get_format, quantize  # noqa: E402

CHUNK = 1 << 24


def check(name: str) -> int:
    """Number of float32 patterns whose results differ (NaNs compared by bits too)."""
    fmt = get_format(name)
    bad = 0
    base = np.arange(CHUNK, dtype=np.uint32)
    with workspace.using(workspace.Workspace()):
        for start in range(0, 1 << 32, CHUNK):
            x = (base + np.uint32(start)).view(np.float32)
            got = quantize_into(x, fmt)
            bad += int(np.count_nonzero(got.view(np.uint32) != quantize(x, fmt).view(np.uint32)))
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--formats", nargs="+", default=["float16", "bfloat16"], choices=["float16", "bfloat16"]
    )
    args = p.parse_args(argv)
    status = 0
    for name in args.formats:
        t0 = time.perf_counter()
        bad = check(name)
        print(f"{name}: {bad} of 2**32 float32 patterns differ ({time.perf_counter() - t0:.0f} s)")
        status |= bad != 0
    return status


if __name__ == "__main__":
    sys.exit(main())
