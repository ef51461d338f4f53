#!/usr/bin/env python
"""Reproduce a figure of "Grokking at the Edge of Numerical Stability" (arXiv 2501.04697).

Usage::

    python scripts/reproduce.py --figure {1,2,4,5,6,8,13,14,15,16,appI,extra,glitch,
        logitscale,slingshot,zerosum}
        --budget {smoke,short,full} [--seeds N] [--variant authors] [--out DIR]
        [--workers N] [--threads T]
        [--plots-dir DIR] [--band minmax|std|none] [--no-plots] [--spec FILE]
        [--panels NAME [NAME ...]] [--retry-failed] [--dry-run | --report] [--quiet]

Steps:

1. Load ``numstab/specs/fig<N>.toml`` (or ``extra.toml``, or ``--spec FILE``), strip its
   ``[reproduce]`` table and resolve the rest for the budget (``smoke``: seconds, tiny problem,
   for CI; ``short``: reduced step counts for a 2-core machine, stated in the SPEC; ``full``:
   the paper's step counts), the seeds (``--seeds N``: seeds 0 .. N-1) and the variant
   (``--variant authors``: the authors' released code where it differs from the paper's text).
   See :mod:`analysis.repro` for the rules.
2. Run it through ``numstab.sweep.run_sweep`` into ``--out`` (default
   ``runs/repro/<stem>``, e.g. ``runs/repro/fig1-short``). Resumable: finished runs are
   skipped when the command is repeated; an interrupted sweep loses only the runs in flight.
   The resolved SPEC is written to ``<out>/reproduce.json`` (``reproduce-panels-….json``
   for a panel subset).
3. Collect, draw ``<plots-dir>/<stem>.png`` (default ``docs/figures/fig1-short.png``), compute
   the claims (:mod:`analysis.claims`), print them as a markdown table and write
   ``<out>/claims.md`` and ``<out>/claims.json``. With ``--panels b c`` only those panels'
   runs are run (in the same folder) and the files are ``<stem>-panels-b-c.png`` and
   ``claims-panels-b-c.md`` / ``.json``.

``--report`` runs nothing: step 3 alone, on the runs in ``--out`` as they stand, a run still
training there (or interrupted) measured up to its latest checkpoint (marked "in flight" with
its step in the claims and the figure's title). It only reads the runs, so it is safe beside
the sweep that is writing the folder; its claims files and PNG replace the previous ones, and
the sweep's own report replaces them when it ends.

Exit codes: 0 every run ok; 1 some run failed (the figure and claims are still made from the
ok runs); 2 bad arguments or SPEC (``--report``: no sweep folder), or matplotlib missing
without ``--no-plots`` (before anything runs); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from analysis import claims as C  # noqa: E402
from analysis import repro as R  # noqa: E402
from analysis.results import Results  # noqa: E402
from numstab.cli import EXIT_BROKEN_PIPE, HelpFormatter, PipeGuard  # noqa: E402
from numstab.run.atomic import write_text  # noqa: E402

PROG = "scripts/reproduce.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run a figure's sweep at a budget, then plot it and compute its claims.",
        formatter_class=HelpFormatter,
    )
    a = p.add_argument
    a("--figure", required=True, choices=list(R.FIGURES), help="figure to reproduce")
    a("--budget", required=True, choices=list(R.BUDGETS), help="step budget")
    a("--seeds", type=int, default=None, help="number of seeds (0..N-1); default: the budget's")
    a("--variant", default=None, help="a variant of the SPEC, e.g. 'authors' (released code)")
    a("--out", default=None, help="sweep folder (default runs/repro/<figure>-<budget>)")
    a("--workers", type=int, default=1, help="worker processes")
    a("--threads", type=int, default=1, help="BLAS threads per worker")
    a("--plots-dir", default=os.path.join("docs", "figures"), help="where the PNG goes")
    a("--band", default="minmax", choices=["minmax", "std", "none"], help="band over seeds")
    a("--no-plots", action="store_true", help="skip the figure (no matplotlib needed)")
    a("--spec", default=None, help="use this figure SPEC file instead of numstab/specs/")
    a(
        "--panels",
        nargs="+",
        default=None,
        metavar="NAME",
        help="run, plot and assess only these panels of the figure (default: all); the runs "
        "go to the same folder, so a later run of all panels reuses them",
    )
    a(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="each run writes a checkpoint into its folder every N steps and at the end; an "
        "interrupted run continues from its last one when the command is run again",
    )
    a("--retry-failed", action="store_true", help="rerun runs that failed before")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the resolved runs and exit")
    mode.add_argument(
        "--report",
        action="store_true",
        help="run nothing: the figure and claims of the runs in --out as they stand, a run "
        "still training (or interrupted) measured up to its latest checkpoint; safe beside "
        "the sweep writing the folder",
    )
    a("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from numstab import sweep as S

    try:
        spec = R.load_figure_spec(args.spec or R.spec_path(args.figure))
        resolved = R.resolve(spec, args.budget, seeds=args.seeds, variant=args.variant)
        sweep = S.parse_spec(resolved, source=f"{spec.path} [{args.budget}]")
        if spec.claims not in C.CLAIMS:
            raise R.FigureSpecError(f"{spec.path}: unknown claims {spec.claims!r}")
        if args.workers < 1 or args.threads < 1:
            raise R.FigureSpecError("--workers and --threads must be >= 1")
        if args.checkpoint_every is not None and args.checkpoint_every < 1:
            raise R.FigureSpecError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
        panels = _select_panels(spec, args.panels)
        if args.panels:
            sweep = dataclasses.replace(sweep, runs=_runs_in_panels(sweep.runs, panels))
    except (R.FigureSpecError, S.SpecError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    stem = spec.stem(args.budget, args.variant)
    out = args.out or os.path.join("runs", "repro", stem)
    # A panel subset shares the figure's run folder (its runs are reused) but gets its own
    # PNG and claims files, so it never overwrites the whole figure's.
    part = "-panels-" + "-".join(args.panels) if args.panels else ""
    if args.dry_run:
        _dry_run(sweep, out, args.retry_failed)
        return 0
    if args.report and not os.path.isdir(out):
        print(f"{PROG}: error: --report: no sweep folder {out!r} (run it first)", file=sys.stderr)
        return 2
    if not args.no_plots:
        from analysis.plots import require_matplotlib

        try:
            require_matplotlib()
        except ImportError as exc:
            print(f"{PROG}: error: {exc}; or pass --no-plots", file=sys.stderr)
            return 2

    exit_code = None  # --report: runs nothing
    if not args.report:
        argv = sys.argv if argv is None else [PROG, *argv]
        exit_code = _run(args, argv, spec, resolved, sweep, out, part)
        if exit_code is None:  # refused (the reason is on stderr)
            return 2
    results = Results.from_dir(out, ids=[r.id for r in sweep.runs], in_flight=args.report)
    flying = {rid: r.step for rid, r in results.runs.items() if r.status == "in_flight"}
    unstarted = [r.id for r in sweep.runs if r.id not in results.runs]  # no folder yet
    if not args.no_plots:
        from analysis.plots import plot_figure

        png = os.path.join(args.plots_dir, f"{stem}{part}.png")
        title = (
            spec.title
            + f" — budget {args.budget}"
            + (f", variant {args.variant}" if args.variant else "")
            + (f", panels {' '.join(args.panels)}" if args.panels else "")
            + (f"; in flight at step {_step_range(flying.values())}" if flying else "")
        )
        plot_figure(results, panels, png, title=title, band=args.band)
        print(f"figure: {png}")

    claims = C.CLAIMS[spec.claims](results)
    doc = {
        "figure": spec.figure,
        "budget": args.budget,
        "variant": args.variant,
        "out": out,
        "n_runs": len(sweep.runs),
        "status": {
            st: sum(1 for r in results.runs.values() if r.status == st)
            for st in ("ok", "in_flight", "failed", "incomplete")
        },
        "in_flight": {rid: {"step": k, "steps": _steps(results, rid)} for rid, k in flying.items()},
        "not_started": unstarted,
        "claims": claims,
    }
    write_text(
        os.path.join(out, f"claims{part}.json"),
        json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n",
    )
    table = C.render_markdown(claims)
    header = f"## {spec.title} (budget {args.budget}"
    header += f", variant {args.variant}" if args.variant else ""
    header += f", panels {' '.join(args.panels)})" if args.panels else ")"
    # below the heading, so that a page's copy of the table keeps them
    if flying:
        where = "; ".join(f"`{r}` at step {k} of {_steps(results, r)}" for r, k in flying.items())
        header += f"\n\nIn flight, measured up to their latest checkpoint: {where}."
    if args.report and unstarted:
        header += f"\n\nNot started: {len(unstarted)} of the {len(sweep.runs)} runs."
    write_text(os.path.join(out, f"claims{part}.md"), header + "\n\n" + table)
    print()
    print(header)
    print()
    print(table)
    print(
        f"claims: {os.path.join(out, f'claims{part}.md')}, "
        f"{os.path.join(out, f'claims{part}.json')}"
    )
    if exit_code is None:  # --report: 1 where a run failed, as after a sweep
        exit_code = 1 if any(r.status == "failed" for r in results.runs.values()) else 0
    return exit_code


def _run(args, argv, spec, resolved, sweep, out, part) -> int | None:
    """Record the command in ``<out>/reproduce<part>.json`` and run the sweep: its exit code,
    or None where it was refused (one line on stderr)."""
    from numstab import sweep as S

    record = {
        "figure": spec.figure,
        "budget": args.budget,
        "variant": args.variant,
        "seeds": args.seeds,
        "panels": args.panels,
        "spec_file": os.path.relpath(spec.path),
        "argv": argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resolved_spec": resolved,
        "run_ids": [r.id for r in sweep.runs],
    }

    def write_record():  # once the sweep holds the folder: a refused command writes nothing
        path = os.path.join(out, f"reproduce{part}.json")
        write_text(path, json.dumps(record, indent=2) + "\n")

    try:
        report = S.run_sweep(
            sweep,
            out,
            workers=args.workers,
            threads=args.threads,
            retry_failed=args.retry_failed,
            checkpoint_every=args.checkpoint_every,
            quiet=args.quiet,
            on_start=write_record,
        )
    except (S.SpecError, S.UsageError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return None
    return report.exit_code


def _steps(results, rid):
    """The run's configured number of steps (None if not recorded)."""
    return results.runs[rid].config.get("steps")


def _step_range(steps) -> str:
    lo, hi = min(steps), max(steps)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _select_panels(spec, names) -> list:
    """The figure's panels named in ``names`` (all of them for None), in the figure's order."""
    panels = spec.panels
    if names is None:
        return panels
    known = [p.get("name") for p in panels]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise R.FigureSpecError(
            f"unknown panel {unknown[0]!r} for figure {spec.figure}; its panels are "
            f"{', '.join(map(str, known)) or '(none)'}"
        )
    return [p for p in panels if p.get("name") in names]


def _runs_in_panels(runs, panels) -> list:
    """The planned runs that appear in at least one of ``panels`` (a panel's ``match``)."""
    return [
        r
        for r in runs
        if any(R.config_matches(R.config_dict(r.config), p.get("match")) for p in panels)
    ]


def _dry_run(sweep, out, retry_failed: bool) -> None:
    """The sweep's dry run (``python -m numstab.sweep --dry-run``): per run its axes, the
    budget's steps, its state in ``out`` and what this command would do with it."""
    from numstab.cli.sweep import print_dry_run

    print_dry_run(sweep, out, sys.stdout, retry_failed=retry_failed)


def _json_safe(o):
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


if __name__ == "__main__":
    sys.stdout = PipeGuard(sys.stdout)  # `--dry-run | head` ends quietly, not with a traceback
    code = main()
    sys.exit(EXIT_BROKEN_PIPE if sys.stdout.broken else code)
