"""``numstab train`` (also ``python -m numstab.train``): train one run and log its metrics."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from threadpoolctl import threadpool_limits

from numstab.cli import (
    HelpFormatter,
    Parser,
    UsageError,
    add_output_options,
    add_run_options,
    adopt_saved_options,
    check_backend,
    config_from_args,
    dump_json,
    fmt_step,
    fmt_value,
    given_options,
    holds_out_dir,
    progress_bar,
    resolve_out,
    task_label,
    versions,
    wall_legs,
    write_atomic,
)
from numstab.run import MetricLog, NonFiniteError, TrainConfig, summarize, train
from numstab.run.checkpoint import CheckpointError, load_checkpoint
from numstab.run.driver import OutputError, Stopped, graceful_stop
from numstab.run.runtime import runtime_info, tune_allocator

__all__ = ["build_train_parser", "main", "train_main"]


def build_train_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m numstab.train",
        description="Train one run of the paper's setup and log its metrics.",
        formatter_class=HelpFormatter,
    )
    add_run_options(p, steps=1000, lr=0.01, log_every=10)
    add_output_options(p, what="metrics.csv, summary.json and checkpoints")
    return p


def _adopt_train_checkpoint(parser, argv, args) -> dict:
    """``--resume DIR``: the run's options from its checkpoint, in place on ``args``.

    The configuration is the checkpointed run's (options given explicitly must equal it,
    except ``--steps``: a finished run continues to a larger one); ``--threads`` must equal
    the checkpoint's, ``--checkpoint-every`` defaults to it. Returns the checkpoint's step and
    the wall seconds of the earlier legs. ``UsageError`` when the checkpoint is unusable or an
    explicit option differs (no file is touched).
    """

    try:
        ckpt = load_checkpoint(args.resume)
    except CheckpointError as exc:
        raise UsageError(f"cannot resume: {exc}") from None
    runs = ckpt.manifest.get("runs")
    meta = runs.get("run") if isinstance(runs, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        names = sorted(runs) if isinstance(runs, dict) else runs
        raise UsageError(
            f"cannot resume: the checkpoint in {args.resume!r} holds no numstab.train run "
            f"({_owner(args.resume, names)})"
        )
    extra = ckpt.extra if isinstance(ckpt.extra, dict) else {}
    saved = {k: v for k, v in meta["config"].items() if k != "steps"}
    options = extra.get("options", {})
    saved.update(options if isinstance(options, dict) else {})
    free = extra.get("free_options", {})
    given = given_options(parser, argv, args)
    adopt_saved_options(parser, args, given, saved, free if isinstance(free, dict) else {})
    if "steps" not in given:
        args.steps = meta["config"].get("steps", args.steps)
    step = meta.get("step")
    return {
        "step": step if isinstance(step, int) and not isinstance(step, bool) else 0,
        "legs": wall_legs(extra),
    }


def _owner(directory: str, names) -> str:
    """Whose checkpoint ``directory`` holds (runs ``names``), and how it continues."""
    if isinstance(names, list) and "test" in names and set(names) <= {"test", "reference"}:
        return "a numstab.compare run: continue it with python -m numstab.compare --resume DIR"
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            sweep_id = json.load(f).get("id")
    except (OSError, ValueError, AttributeError):
        sweep_id = None
    if isinstance(names, list) and names == [sweep_id]:
        parent = os.path.dirname(os.path.abspath(directory))
        return (
            f"run {sweep_id} of the sweep in {parent!r}: the sweep's command run again with "
            "that --out continues it where it is incomplete"
        )
    return f"runs: {names!r}"


@holds_out_dir
def train_main(argv=None) -> int:
    """``python -m numstab.train``: one run; exit codes as in the module docstring.

    ``--resume DIR`` alone continues the run in DIR with its own options.
    """


    parser = build_train_parser()
    args = parser.parse_args(argv)
    before = {"step": 0, "legs": []}
    try:
        if args.resume is not None:
            before = _adopt_train_checkpoint(parser, argv, args)
        config = config_from_args(args)
        check_backend(args.backend)
        resolve_out(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    tune_allocator()
    log = MetricLog(os.path.join(args.out, "metrics.csv") if args.out else None)
    bar = progress_bar(config.steps, config.dtype, args.quiet, initial=before["step"])
    error, code = None, 0
    t0 = time.perf_counter()

    def extra() -> dict:
        # Saved in every checkpoint: what `--resume DIR` alone needs besides the config.
        return {
            "options": {"threads": args.threads},
            "free_options": {"checkpoint_every": args.checkpoint_every},
            "wall_seconds_legs": [*before["legs"], time.perf_counter() - t0],
        }

    try:
        with threadpool_limits(limits=args.threads), graceful_stop() as stop:
            train(
                config,
                log=log,
                checkpoint_dir=args.out,
                checkpoint_every=args.checkpoint_every,
                resume=args.resume is not None,
                stop=stop,
                progress=(lambda t: bar.update(1)) if bar is not None else None,
                extra=extra,
            )
    except CheckpointError as exc:
        print(f"{parser.prog}: error: cannot resume: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        error, code = (
            {"kind": "non-finite", "run": exc.run, "step": exc.step, "message": str(exc)},
            3,
        )
    except Stopped as exc:
        message = str(exc) + (f"; continue with --resume {args.out}" if args.out else "")
        error, code = (
            {"kind": "interrupted", "signal": exc.signum, "step": exc.step, "message": message},
            exc.exit_code,
        )
    except OutputError as exc:
        if exc.before_training:  # the outputs are still the previous command's: keep them
            print(f"{parser.prog}: {exc}", file=sys.stderr)
            return exc.exit_code
        error, code = exc.status(args.out), exc.exit_code
    finally:
        if bar is not None:
            bar.close()
        log.close()
    legs = extra()["wall_seconds_legs"]
    summary = {
        "config": {**vars(args), "resolved": config.to_dict()},
        "versions": versions(),
        "runtime": runtime_info(),
        "run": summarize(log, "run"),
        "wall_seconds": sum(legs),
        "wall_seconds_legs": legs,
        "status": "ok" if error is None else error,
    }
    if args.out:
        try:
            write_atomic(os.path.join(args.out, "summary.json"), dump_json(summary))
        except OSError as exc:
            failed = OutputError(exc, summary["run"]["final"]["step"])
            print(f"{parser.prog}: {failed}", file=sys.stderr)
            code = code or OutputError.exit_code
    if args.json:
        print(dump_json(summary), end="")
    else:
        _print_train_report(summary, config, error)
    if error is not None:
        print(f"{parser.prog}: {error['message']}", file=sys.stderr)
    return code


def _print_train_report(summary: dict, config: TrainConfig, error: dict | None) -> None:
    r = summary["run"]
    f = r["final"]
    stopped = "" if error is None else f" (stopped at step {error['step']})"
    print(
        f"numstab.train: {config.dtype}, {task_label(config)}, {config.optimizer} "
        f"lr {config.lr}, {config.steps} steps{stopped}"
    )
    print(
        f"  SC onset {fmt_step(r['sc_onset_step'])}, SC-50 % {fmt_step(r['sc50_step'])}, "
        f"train 100 % {fmt_step(r['train100_step'])}, grokking (test >= 0.9) "
        f"{fmt_step(r['grok_step'])}"
    )
    legs = summary["wall_seconds_legs"]
    print(
        f"  final train/test accuracy {fmt_value(f['train_acc'])}/{fmt_value(f['test_acc'])} "
        f"(step {fmt_step(f['step'])}), SC fraction {fmt_value(f['sc_fraction'])}, wall "
        f"{summary['wall_seconds']:.1f} s"
        + (f" ({len(legs)} legs)" if len(legs) > 1 else "")
    )


#: The command's entry (``numstab train``).
main = train_main
