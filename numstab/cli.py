"""What the command-line tools share: run options, validation, outputs, exit codes.

Exit codes of every numstab command: 0 success; 2 bad input (an option, an unavailable backend,
an unwritable output directory, an unusable checkpoint), detected before any training;
3 a run produced NaN/inf (everything logged so far is kept); 130 SIGINT, 143 SIGTERM (a final
checkpoint and partial outputs are written first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile

import numpy as np

import numstab
from numstab.atomic import write_text
from numstab.precision import REDUCTION_ORDERS, available_formats
from numstab.train import TrainConfig

__all__ = [
    "LOSS_NAMES",
    "TASKS",
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

LOSS_NAMES = {"softmax": "softmax", "stablemax": "stablemax", "softmax-stable": "softmax_stable"}
TASKS = ("add", "sub", "mul", "div", "parity")


class UsageError(Exception):
    """Bad input detected after parsing (exit 2)."""


def add_run_options(
    p: argparse.ArgumentParser, *, steps: int, lr: float, log_every: int, test_run: bool = False
) -> None:
    """The options of one training run (the fields of :class:`~numstab.train.TrainConfig`)."""
    fmts = [*available_formats()]
    a = p.add_argument
    which = "the test run" if test_run else "the run"
    a(
        "--dtype",
        default="float32",
        choices=fmts,
        help=f"format of {which}: parameters, GEMMs and loss",
    )
    a(
        "--loss-dtype",
        default=None,
        choices=fmts,
        help=f"loss format of {which} alone (the paper's softmax_precision); default: --dtype",
    )
    a(
        "--state-dtype",
        default=None,
        choices=fmts,
        help="optimizer-state format; default float32 for float16/bfloat16, else --dtype",
    )
    a(
        "--loss",
        default="softmax",
        choices=list(LOSS_NAMES),
        help="cross-entropy: framework softmax, StableMax, or the absorption-free softmax",
    )
    a(
        "--stablemax-eps",
        type=float,
        default=0.0,
        help="epsilon in StableMax's 1/(1 - x + eps) (the authors' code: 1e-30)",
    )
    a("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"], help="optimizer")
    a("--lr", type=float, default=lr, help="learning rate")
    a("--beta1", type=float, default=0.9, help="Adam beta1")
    a("--beta2", type=float, default=0.99, help="Adam beta2 (paper: 0.99)")
    a("--eps", type=float, default=1e-25, help="Adam epsilon (paper: 1e-25)")
    a("--weight-decay", type=float, default=0.0, help="weight decay (decoupled for AdamW)")
    a("--momentum", type=float, default=0.0, help="SGD momentum")
    a(
        "--perp-grad",
        default=None,
        choices=["tensor", "global"],
        help="⊥Grad: per tensor with rescaling (authors' code) or global (paper); default off",
    )
    a(
        "--normalized-lr",
        action="store_true",
        help="learning rate lr / ||grad|| each step (the paper's normalized schedule)",
    )
    a("--task", default="add", choices=TASKS, help="modular op or sparse parity")
    a("--modulus", type=int, default=113, help="p of the modular task")
    a("--train-fraction", type=float, default=0.4, help="fraction of pairs used for training")
    a("--hidden", type=int, nargs="+", default=[200, 200], help="hidden layer widths")
    a("--bias", action="store_true", help="give the linear layers biases")
    a("--alpha", type=float, default=1.0, help="logit multiplier")
    a("--steps", type=int, default=steps, help="training steps")
    a("--log-every", type=int, default=log_every, help="metric logging interval")
    a(
        "--order",
        default="pairwise",
        choices=list(REDUCTION_ORDERS),
        help="summation order of the loss's normaliser",
    )
    a("--seed", type=int, default=0, help="seed of data split, initialisation and batches")
    a(
        "--zero-target-grad-from",
        type=int,
        default=None,
        help="from this step on, zero the correct-class logit gradient (the paper's Fig. 8)",
    )


def add_output_options(p: argparse.ArgumentParser, *, what: str) -> None:
    """Threads, backend, output directory, checkpoints, resume, JSON, quiet."""
    a = p.add_argument
    a(
        "--threads",
        type=int,
        default=None,
        help="BLAS threads (threadpoolctl); default: the library's own setting",
    )
    a("--backend", default="numpy", choices=["numpy", "cupy"], help="array backend")
    a("--out", default=None, help=f"directory for {what}")
    a(
        "--checkpoint-every",
        type=int,
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


def _check_range(name, v, lo):
    if v is not None and v < lo:
        raise UsageError(f"{name} must be >= {lo}, got {v}")


def config_from_args(args, **overrides) -> TrainConfig:
    """A validated :class:`TrainConfig` from parsed run options (``UsageError`` if invalid)."""
    _check_range("--steps", args.steps, 0)
    _check_range("--log-every", args.log_every, 1)
    _check_range("--modulus", args.modulus, 2)
    _check_range("--threads", getattr(args, "threads", None), 1)
    _check_range("--checkpoint-every", getattr(args, "checkpoint_every", None), 1)
    if not 0 < args.train_fraction < 1:
        raise UsageError(f"--train-fraction must lie in (0, 1), got {args.train_fraction}")
    if any(h < 1 for h in args.hidden):
        raise UsageError(f"--hidden widths must be >= 1, got {args.hidden}")
    for name in (
        "lr",
        "eps",
        "beta1",
        "beta2",
        "weight_decay",
        "momentum",
        "alpha",
        "stablemax_eps",
    ):
        v = getattr(args, name)
        if not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be a positive finite number, got {args.lr}")
    fields = dict(
        task=args.task,
        p=args.modulus,
        train_fraction=args.train_fraction,
        hidden=tuple(args.hidden),
        bias=args.bias,
        alpha=args.alpha,
        dtype=args.dtype,
        loss_dtype=args.loss_dtype,
        state_dtype=args.state_dtype,
        order=args.order,
        loss=LOSS_NAMES[args.loss],
        stablemax_eps=args.stablemax_eps,
        optimizer=args.optimizer,
        lr=args.lr,
        beta1=args.beta1,
        beta2=args.beta2,
        eps=args.eps,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        perp_grad=args.perp_grad,
        normalized_lr=args.normalized_lr,
        steps=args.steps,
        log_every=args.log_every,
        seed=args.seed,
        zero_target_grad_from=args.zero_target_grad_from,
        backend=getattr(args, "backend", "numpy"),
    )
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
    p = argparse.ArgumentParser(
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
