#!/usr/bin/env python
"""Plot ``python -m numstab.train --out DIR`` runs side by side (a PNG), and/or print a
figure's claims on them (a markdown table).

Usage::

    python scripts/plot_runs.py DIR [DIR ...] --out docs/figures/run.png [--title T]
        [--plots accuracy sc_fraction weight_norm nlm_cosine] [--log-x]
    python scripts/plot_runs.py DIR [DIR ...] --claims NAME

Each DIR is a training run's output folder (``metrics.csv`` and ``summary.json``, whose
``config`` tells the runs apart in the legend; its id is the folder's name), a sweep's run
folder, or a ``numstab.compare`` folder (two runs, ``<folder>/test`` and
``<folder>/reference``). A run still training has no ``summary.json`` yet: it is drawn and
measured as far as its ``metrics.csv`` goes (a sweep's run folder, which has none until the run
ends: as far as its checkpoint), its configuration taken from its checkpoint
(``--checkpoint-every``), and a line on stderr says so. The figure has one row and one column
per plot kind, drawn by :func:`analysis.plots.plot_figure` (the same code as the reproduced
figures). ``--claims NAME`` (a figure SPEC's ``claims``: ``fig1``, ``fig4``, ...) prints the
table ``scripts/reproduce.py`` writes to a sweep's ``claims.md`` (mean ± std [min, max] over
the runs, the per-seed values), for runs trained one by one: the long resumable legs of a
figure at full length, for example; the runs are matched to the claims by their configurations,
as in a sweep, and claims no run matches are left out. Exit codes: 0 done; 2 a folder with
neither ``metrics.csv`` nor a checkpoint, an unknown plot kind or claims name, neither
``--out`` nor ``--claims``, or matplotlib missing (for ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from analysis import claims as C  # noqa: E402
from analysis.plots import PLOTS, plot_figure, require_matplotlib  # noqa: E402
from analysis.results import Results  # noqa: E402

PROG = "scripts/plot_runs.py"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="training output folders")
    p.add_argument("--out", help="the PNG to write")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument(
        "--plots",
        nargs="+",
        default=["accuracy", "sc_fraction", "weight_norm"],
        help=f"plot kinds, of {', '.join(PLOTS)}",
    )
    p.add_argument("--log-x", action="store_true", help="symmetric-log step axis")
    p.add_argument("--claims", metavar="NAME", help=f"print these claims: {', '.join(C.CLAIMS)}")
    args = p.parse_args(argv)
    unknown = [k for k in args.plots if k not in PLOTS]
    try:
        if args.out is None and args.claims is None:
            raise ValueError("nothing to do: give --out PNG, --claims NAME or both")
        if unknown:
            raise ValueError(f"unknown plot kind {unknown[0]!r}; valid: {', '.join(PLOTS)}")
        if args.claims is not None and args.claims not in C.CLAIMS:
            raise ValueError(f"unknown claims {args.claims!r}; one of {', '.join(C.CLAIMS)}")
        if args.out is not None:
            require_matplotlib()
        results = Results.from_train_dirs(args.dirs, in_flight=True)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for rid, run in results.runs.items():
        if run.status == "in_flight":
            unknown = "" if run.config else "; its configuration is unknown (no checkpoint)"
            print(
                f"{PROG}: {rid}: no summary.json yet (in flight, or stopped without one): "
                f"measured as far as it got, step {run.step}{unknown}",
                file=sys.stderr,
            )
    if args.out is not None:
        panel = {"name": "", "title": "", "match": {}, "plots": args.plots, "log_x": args.log_x}
        print(plot_figure(results, [panel], args.out, title=args.title))
    if args.claims is not None:
        # the claims of the figure's other panels have no runs here: left out
        claims = {k: v for k, v in C.CLAIMS[args.claims](results).items() if v["rows"]}
        print(f"## {args.claims} claims of {len(args.dirs)} run(s): {', '.join(args.dirs)}\n")
        if not claims:
            print(f"(no claim of {args.claims} applies to these runs)")
            return 0
        print(C.render_markdown(claims), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
