"""What the command-line tools share: run options, validation, outputs, exit codes.

Exit codes of every numstab command: 0 success; 2 bad input (an option, an unavailable backend,
an unwritable output directory, an unusable checkpoint), detected before any training;
3 a run produced NaN/inf (everything logged so far is kept); 130 SIGINT, 143 SIGTERM (a final
checkpoint and partial outputs are written first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

import numpy as np

import numstab
from numstab.atomic import write_text
from numstab.options import add_arguments, flag_of, options_of
from numstab.train import TrainConfig

__all__ = [
    "UsageError",
    "add_output_options",
    "add_run_options",
    "check_backend",
    "check_out_dir",
    "config_from_args",
    "json_default",
    "versions",
    "write_atomic",
]

class UsageError(Exception):
    """Bad input detected after parsing (exit 2)."""


class Parser(argparse.ArgumentParser):
    """``argparse`` with bad input reported as one line (``prog: error: ...``) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_run_options(
    p: argparse.ArgumentParser, *, steps: int, lr: float, log_every: int, test_run: bool = False
) -> None:
    """The options of one training run, derived from :class:`~numstab.train.TrainConfig`'s
    declarations (:mod:`numstab.options`): parsed values are validated and canonical."""
    which = "the test run" if test_run else "the run"
    add_arguments(
        p,
        TrainConfig,
        defaults={"steps": steps, "lr": lr, "log_every": log_every},
        help_overrides={"dtype": f"format of {which}: parameters, GEMMs and loss"},
    )


def _count(lo: int):
    """An argparse ``type=`` for an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
        return v

    parse.__name__ = "int"
    return parse


def add_output_options(p: argparse.ArgumentParser, *, what: str) -> None:
    """Threads, output directory, checkpoints, resume, JSON, quiet."""
    a = p.add_argument
    a(
        "--threads",
        type=_count(1),
        default=None,
        help="BLAS threads (threadpoolctl); default: the library's own setting",
    )
    a("--out", default=None, help=f"directory for {what}")
    a(
        "--checkpoint-every",
        type=_count(1),
        default=None,
        help="write a checkpoint every N steps into --out (one is always written at the end)",
    )
    a(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run whose outputs and checkpoint are in DIR (implies --out DIR)",
    )
    a("--json", action="store_true", help="print the summary JSON instead of the report")
    a("--quiet", action="store_true", help="no progress bar")


def config_from_args(args, **overrides) -> TrainConfig:
    """A validated :class:`TrainConfig` from parsed run options (``UsageError`` if invalid).

    Single values were checked by the parser; this adds the checks across options (e.g. an
    Adam eps that underflows in the optimizer-state format), from ``TrainConfig`` itself.
    """
    names = [n for n, spec in options_of(TrainConfig).items() if flag_of(n, spec) is not None]
    fields = {n: getattr(args, n) for n in names if hasattr(args, n)}
    fields.update(overrides)
    try:
        return TrainConfig(**fields)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def check_backend(name: str) -> None:
    """``UsageError`` unless the backend can run here (CuPy needs CuPy and a CUDA device)."""
    if name == "numpy":
        return
    from numstab.backend import get_backend

    try:
        get_backend(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def resolve_out(args) -> str | None:
    """``--resume DIR`` implies ``--out DIR``; a different ``--out`` is an error."""
    if args.resume is not None:
        if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
            raise UsageError(
                f"--resume {args.resume!r} writes into that directory; drop --out "
                f"{args.out!r} or make it the same"
            )
        args.out = args.resume
    if args.checkpoint_every is not None and args.out is None:
        raise UsageError("--checkpoint-every needs --out DIR (where the checkpoints go)")
    if args.out is not None:
        check_out_dir(args.out)
    return args.out


def check_out_dir(path: str) -> None:
    """``UsageError`` unless ``path`` exists or can be created, and can be written."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"--out {path!r} cannot be written: {exc.strerror or exc}") from None


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`numstab.atomic.write_text`)."""
    write_text(path, text)


def versions() -> dict:
    """Versions of everything that can change a result."""
    import ml_dtypes
    import mpmath
    import scipy

    from numstab.runtime import runtime_info

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "mpmath": mpmath.__version__,
        "mpmath_backend": mpmath.libmp.BACKEND,
        "ml_dtypes": ml_dtypes.__version__,
        "numstab": numstab.__version__,
        "blas": runtime_info()["blas"],
        "platform": platform.platform(),
    }


def json_default(o):
    """JSON encoder hook for NumPy scalars and tuples."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, default=json_default) + "\n"


def progress_bar(total: int, desc: str, quiet: bool, initial: int = 0):
    """A tqdm bar on stderr, or None with ``quiet`` or when stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, unit="step")


# --- python -m numstab.train ----------------------------------------------------------------


def build_train_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m numstab.train",
        description="Train one run of the paper's setup and log its metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_options(p, steps=1000, lr=0.01, log_every=10)
    add_output_options(p, what="metrics.csv, summary.json and checkpoints")
    return p


def train_main(argv=None) -> int:
    """``python -m numstab.train``: one run; exit codes as in the module docstring."""
    import time

    from threadpoolctl import threadpool_limits

    from numstab.checkpoint import CheckpointError
    from numstab.driver import Stopped, graceful_stop
    from numstab.runtime import runtime_info, tune_allocator
    from numstab.train import MetricLog, NonFiniteError, summarize, train

    parser = build_train_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        check_backend(args.backend)
        resolve_out(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    tune_allocator()
    log = MetricLog(os.path.join(args.out, "metrics.csv") if args.out else None)
    bar = progress_bar(config.steps, config.dtype, args.quiet)
    error, code = None, 0
    t0 = time.perf_counter()
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
        error, code = (
            {"kind": "interrupted", "signal": exc.signum, "step": exc.step, "message": str(exc)},
            exc.exit_code,
        )
    finally:
        if bar is not None:
            bar.close()
        log.close()
    summary = {
        "config": {**vars(args), "resolved": config.to_dict()},
        "versions": versions(),
        "runtime": runtime_info(),
        "run": summarize(log, "run"),
        "wall_seconds": time.perf_counter() - t0,
        "status": "ok" if error is None else error,
    }
    if args.out:
        write_atomic(os.path.join(args.out, "summary.json"), dump_json(summary))
    if args.json:
        print(dump_json(summary), end="")
    else:
        r = summary["run"]
        print(
            f"numstab.train: {config.dtype}, {config.task} mod {config.p}, {config.optimizer} "
            f"lr {config.lr}, {config.steps} steps"
        )
        print(
            f"  SC onset {r['sc_onset_step']}, SC-50 % {r['sc50_step']}, train 100 % "
            f"{r['train100_step']}, grokking (test >= 0.9) {r['grok_step']}"
        )
        f = r["final"]
        print(
            f"  final train/test accuracy {f['train_acc']}/{f['test_acc']}, SC fraction "
            f"{f['sc_fraction']}, wall {summary['wall_seconds']:.1f} s"
        )
    if error is not None:
        print(f"{parser.prog}: {error['message']}", file=sys.stderr)
    return code
