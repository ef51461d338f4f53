"""``python -m numstab.sweep`` (``numstab sweep``): run a grid of training runs, resumably, and
collect the results; ``... collect DIR`` only collects. The sweep itself is
:mod:`numstab.sweep`; docs/sweep.md describes SPECs, the folder and the executors.

Exit codes: 0 every run of the SPEC is ok; 1 at least one run failed (now or in an earlier
invocation; they are listed), or a local worker could not start; 2 bad SPEC or option (one
line, before anything runs or is written), dask missing or its scheduler unreachable, CuPy or a
GPU missing for ``backend = "cupy"``, or another numstab process writes to ``DIR``; 130 SIGINT,
143 SIGTERM (workers stopped, finished runs kept and collected; invoke again to resume); 141
``--dry-run`` or ``collect`` whose stdout was closed early (``| head``). ``collect DIR``: 0, or
1 when a file of a run folder was skipped as malformed.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys

from numstab.cli import EXIT_BROKEN_PIPE, HelpFormatter, Parser, PipeGuard, UsageError, fmt_value
from numstab.cli.progress import format_duration
from numstab.run.footprint import MEMORY_FRACTION
from numstab.sweep.cells import _cell_axis
from numstab.sweep.folder import checkpoint_progress
from numstab.sweep.run import PROG, _check_options, _continues, _plan, _print_skipped, run_sweep
from numstab.sweep.spec import MAX_RUNS, SpecError, Sweep, load_spec
from numstab.sweep.tables import collect

__all__ = ["build_collect_parser", "build_parser", "main", "print_dry_run"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Run a grid of training runs described by a TOML SPEC (resumable; local "
        "processes or a Dask cluster), then collect the results. "
        f"'{PROG} collect DIR' only collects.",
        formatter_class=HelpFormatter,
    )
    a = p.add_argument
    a("spec", metavar="SPEC", help="TOML file: [base], [axes], [[runs]]")
    a("--out", metavar="DIR", default=None, help="sweep folder (one subfolder per run)")
    a("--executor", choices=["local", "dask"], default="local", help="where runs execute")
    a("--workers", type=int, default=1, help="local worker processes / LocalCluster workers")
    a("--threads", type=int, default=1, help="BLAS threads pinned in each worker")
    a(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="dask: scheduler address (tcp://host:8786) or 'local' for an in-process LocalCluster",
    )
    a(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="each run writes a checkpoint into its folder every N steps and at the end; an "
        "interrupted run then continues from its last one when the sweep is invoked again "
        "(local executor or --scheduler local)",
    )
    a("--force", action="store_true", help="rerun every run, finished or not (from step 0)")
    a("--retry-failed", action="store_true", help="rerun runs that failed before")
    a("--dry-run", action="store_true", help="list the runs (id, axes, state) and exit")
    a("--quiet", action="store_true", help="no progress bar")
    a(
        "--allow-large",
        action="store_true",
        help=f"accept a SPEC of more than {MAX_RUNS:,} runs",
    )
    a(
        "--max-run-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="refuse a run whose estimated memory exceeds this many GiB "
        f"(default: {MEMORY_FRACTION:g} of the physical memory)",
    )
    return p


def build_collect_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=f"{PROG} collect",
        description="Collect every run of a sweep folder into collected_metrics.csv, "
        "collected_summary.csv and collected_grouped.csv.",
    )
    p.add_argument("dir", metavar="DIR", help="sweep folder")
    p.add_argument("--quiet", action="store_true", help="do not print the summary table")
    return p


def main(argv=None, *, stdout=None, stderr=None) -> int:
    """The command line; returns the exit code (see the module docstring)."""
    stdout = PipeGuard(stdout or sys.stdout)
    stderr = stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "collect":
            return _collect_main(argv[1:], stdout, stderr)
        return _sweep_main(argv, stdout, stderr)
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was being handled
        print(f"{PROG}: interrupted", file=stderr)
        return 128 + signal.SIGINT


def _sweep_main(argv: list, stdout: PipeGuard, stderr) -> int:
    args = build_parser().parse_args(argv)
    try:
        sweep = load_spec(args.spec, **_limits(args))
        _check_options(
            args.executor, args.workers, args.threads, args.scheduler, args.checkpoint_every
        )
        if args.dry_run:
            _dry_run(sweep, args, stdout)
            stdout.flush()
            return EXIT_BROKEN_PIPE if stdout.broken else 0
        if args.out is None:
            raise UsageError("--out DIR is required (except with --dry-run)")
        report = run_sweep(
            sweep,
            args.out,
            executor=args.executor,
            workers=args.workers,
            threads=args.threads,
            scheduler=args.scheduler,
            force=args.force,
            retry_failed=args.retry_failed,
            checkpoint_every=args.checkpoint_every,
            quiet=args.quiet,
            stdout=stdout,
            stderr=stderr,
        )
    except (SpecError, UsageError) as exc:
        print(f"{PROG}: error: {exc}", file=stderr)
        return 2
    # A closed stdout never stops a sweep: its record is the files, not the progress lines.
    stdout.flush()
    return report.exit_code


def _limits(args) -> dict:
    """The SPEC limits of :func:`numstab.sweep.parse_spec` from the options."""
    gib = args.max_run_gib
    if gib is not None and not (math.isfinite(gib) and gib > 0):
        raise UsageError(f"--max-run-gib must be a positive number of GiB, got {gib}")
    return {
        "max_runs": None if args.allow_large else MAX_RUNS,
        "max_run_bytes": "default" if gib is None else int(gib * 2**30),
    }


def _dry_run(sweep: Sweep, args, stdout) -> None:
    print_dry_run(
        sweep,
        args.out,
        stdout,
        force=args.force,
        retry_failed=args.retry_failed,
        executor=args.executor,
        scheduler=args.scheduler,
    )


def print_dry_run(
    sweep: Sweep,
    out: str | None,
    stdout,
    *,
    force: bool = False,
    retry_failed: bool = False,
    executor: str = "local",
    scheduler: str | None = None,
) -> None:
    """What running ``sweep`` into ``out`` would do, one line per run: its id, source, axes
    and steps, its state in ``out`` and the action (run; resume at the checkpoint's step, with
    the time left at the pace of its last leg, :func:`checkpoint_progress`; rerun; skip).
    Reads the folder, writes nothing."""
    todo, skip = _plan(sweep, out, force, retry_failed)

    def action(r, st) -> str:
        if st in ("ok", "failed"):
            return "rerun"
        if _continues(out, r.id, st, executor, scheduler, force):
            step, pace = checkpoint_progress(os.path.join(out, r.id))
            if step is None:
                return "resume"
            left = r.config.steps - step
            if not pace or left <= 0:
                return f"resume at step {step}"
            eta = format_duration(left * pace)
            return f"resume at step {step} (~{eta} left at {1e3 * pace:.0f} ms/step)"
        return "run"

    will = {r.id: action(r, st) for r, st in todo}
    state = {r.id: st for r, st in todo} | {r.id: st for r, st, _ in skip}
    header = ["id", "source", *sweep.columns, "steps", "state", "action"]
    rows = [
        [
            r.id,
            r.source,
            *(_cell_axis(r.axes[c]) for c in sweep.columns),
            str(r.config.steps),
            state[r.id],
            will.get(r.id, "skip"),
        ]
        for r in sweep.runs
    ]
    print(
        f"{len(sweep.runs)} runs in {sweep.source} ({sum(r.source == 'grid' for r in sweep.runs)}"
        f" grid, {sum(r.source != 'grid' for r in sweep.runs)} explicit); {len(todo)} would "
        f"run" + (f" into {out}" if out else ""),
        file=stdout,
    )
    for note in sweep.notes:
        print(f"note: {note}", file=stdout)
    print(_text_table(header, rows), file=stdout)


def _collect_main(argv: list, stdout: PipeGuard, stderr) -> int:
    args = build_collect_parser().parse_args(argv)
    if not os.path.isdir(args.dir):
        print(f"{PROG} collect: error: {args.dir!r} is not a folder", file=stderr)
        return 2
    res = collect(args.dir)
    if not args.quiet:
        _print_collected(res, stdout)
    print(f"{len(res['summary'])} runs collected into {args.dir}", file=stdout)
    stdout.flush()
    _print_skipped(res, stderr)
    if stdout.broken:
        return EXIT_BROKEN_PIPE
    return 1 if res["skipped"] else 0


def _print_collected(res: dict, stdout) -> None:
    cols = res["columns"]
    header = [
        "run_id",
        *cols,
        "status",
        "SC onset",
        "SC-50",
        "train 100%",
        "grok",
        "train acc",
        "test acc",
        "wall s",
    ]
    body = []
    for r in res["summary"]:
        body.append(
            [
                r["run_id"],
                *(_cell_axis(r[c]) for c in cols),
                r["status"],
                fmt_value(r["sc_onset_step"], "d"),
                fmt_value(r["sc50_step"], "d"),
                fmt_value(r["train100_step"], "d"),
                fmt_value(r["grok_step"], "d"),
                fmt_value(r["final_train_acc"], ".4f"),
                fmt_value(r["final_test_acc"], ".4f"),
                fmt_value(r["wall_seconds"], ".1f"),
            ]
        )
    print(_text_table(header, body), file=stdout)
    for r in res["summary"]:
        if r["error"]:
            print(f"  {r['run_id']}: {r['error']}", file=stdout)


def _text_table(header: list, rows: list) -> str:
    """Columns padded to their widest cell, two spaces apart, no trailing blanks."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
