#!/usr/bin/env python
"""Plot one or more ``python -m numstab.train --out DIR`` runs side by side (a PNG).

Usage::

    python scripts/plot_runs.py DIR [DIR ...] --out docs/figures/run.png [--title T]
        [--plots accuracy sc_fraction weight_norm nlm_cosine] [--log-x]

Each DIR is a training run's output folder (``metrics.csv`` and ``summary.json``, whose
``config`` tells the runs apart in the legend). The figure has one row and one column per plot
kind, drawn by :func:`analysis.plots.plot_figure` (the same code as the reproduced figures).
Exit codes: 0 written; 2 a folder without ``metrics.csv`` / ``summary.json``, an unknown plot
kind, or matplotlib missing.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from analysis.plots import PLOTS, plot_figure, require_matplotlib  # noqa: E402
from analysis.results import Results  # noqa: E402

PROG = "scripts/plot_runs.py"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="training output folders")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument(
        "--plots",
        nargs="+",
        default=["accuracy", "sc_fraction", "weight_norm"],
        help=f"plot kinds, of {', '.join(PLOTS)}",
    )
    p.add_argument("--log-x", action="store_true", help="symmetric-log step axis")
    args = p.parse_args(argv)
    unknown = [k for k in args.plots if k not in PLOTS]
    try:
        if unknown:
            raise ValueError(f"unknown plot kind {unknown[0]!r}; valid: {', '.join(PLOTS)}")
        require_matplotlib()
        results = Results.from_train_dirs(args.dirs)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    panel = {"name": "", "title": "", "match": {}, "plots": args.plots, "log_x": args.log_x}
    print(plot_figure(results, [panel], args.out, title=args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
