#!/usr/bin/env python
"""A figure's claims computed on ``python -m numstab.train --out DIR`` runs (a markdown table).

Usage::

    python scripts/run_claims.py --figure NAME DIR [DIR ...]

The same claims, table and statistics (mean ± std [min, max] over the runs, the per-seed
values) as ``scripts/reproduce.py`` writes to a sweep's ``claims.md``, for runs trained one by
one: the long resumable legs of a figure at full length, for example. ``NAME`` is a figure
SPEC's ``claims`` (``fig1``, ``fig4``, ...); each DIR is a training output folder
(``summary.json`` and ``metrics.csv``), its id the folder's name. The runs are matched to the
claims by their configurations, as in a sweep. Exit codes: 0 printed; 2 an unknown NAME or a
folder without ``summary.json`` / ``metrics.csv``.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from analysis import claims as C  # noqa: E402
from analysis.results import Results  # noqa: E402

PROG = "scripts/run_claims.py"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", metavar="DIR", help="training output folders")
    p.add_argument("--figure", required=True, metavar="NAME", help=f"one of {', '.join(C.CLAIMS)}")
    args = p.parse_args(argv)
    try:
        if args.figure not in C.CLAIMS:
            raise ValueError(f"unknown figure {args.figure!r}; one of {', '.join(C.CLAIMS)}")
        results = Results.from_train_dirs(args.dirs)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    claims = C.CLAIMS[args.figure](results)
    print(f"## {args.figure} claims of {len(args.dirs)} run(s): {', '.join(args.dirs)}\n")
    print(C.render_markdown(claims), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
