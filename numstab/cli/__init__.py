"""What the command-line tools share: run options, validation, outputs, exit codes.

Exit codes of every numstab command: 0 success; 2 bad input (an option, an unavailable backend,
an unwritable output directory, an unusable checkpoint), detected before any training;
3 a run produced NaN/inf (everything logged so far is kept); 4 an output could not be written
(disk full, file too large: every row logged before and the last checkpoint are kept, and the
summary, if it can be written, says where the run stopped); 130 SIGINT, 143 SIGTERM (a final
checkpoint and partial outputs are written first). One process at a time writes to an output
directory: a second one is refused with 2.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import math
import os
import platform
import re

import mpmath
import numpy as np
import scipy

import numstab
from numstab import kernels
from numstab.backend import get_backend
from numstab.cli.progress import progress as _progress  # not `progress`: the submodule's name
from numstab.process_arithmetic import FlushToZeroError, require_gradual_underflow
from numstab.run import TrainConfig, outdir
from numstab.run.atomic import write_text
from numstab.run.footprint import check_fits
from numstab.run.options import add_arguments, flag_of, options_of
from numstab.run.runtime import runtime_info

__all__ = [
    "EXIT_BROKEN_PIPE",
    "PipeGuard",
    "UsageError",
    "add_output_options",
    "add_run_options",
    "check_backend",
    "check_out_dir",
    "config_from_args",
    "holds_out_dir",
    "json_default",
    "versions",
    "write_atomic",
]

class UsageError(Exception):
    """Bad input detected after parsing (exit 2)."""


class Parser(argparse.ArgumentParser):
    """``argparse`` with bad input reported as one line (``prog: error: ...``) and exit 2.

    Every command has ``--version``. Negative numbers in any spelling (``-1e-3``, ``-inf``) are
    values, not options.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--version", action="version", version=f"%(prog)s {numstab.__version__}"
        )
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE
        )

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        """Parse, then refuse (exit 2) a process that flushes subnormals to zero, or whose
        ``NUMSTAB_KERNELS`` names no path (or numba where it is not installed)."""
        parsed = super().parse_args(args, namespace)
        try:
            require_gradual_underflow()
            kernels.backend()
        except (FlushToZeroError, ValueError) as exc:
            self.exit(2, f"{self.prog}: error: {exc}\n")
        return parsed


def add_run_options(
    p: argparse.ArgumentParser, *, steps: int, lr: float, log_every: int, test_run: bool = False
) -> None:
    """The options of one training run, derived from :class:`~numstab.run.TrainConfig`'s
    declarations (:mod:`numstab.run.options`): parsed values are validated and canonical."""
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
        help="continue the run whose outputs and checkpoint are in DIR (implies --out DIR), "
        "with its options from the checkpoint (options given must equal them)",
    )
    a("--json", action="store_true", help="print the summary JSON instead of the report")
    a("--quiet", action="store_true", help="no progress bar or progress lines")


def config_from_args(args, **overrides) -> TrainConfig:
    """A validated :class:`TrainConfig` from parsed run options (``UsageError`` if invalid).

    Single values were checked by the parser; this adds the checks across options (e.g. an
    Adam eps that underflows in the optimizer-state format), from ``TrainConfig`` itself.
    """
    names = [n for n, spec in options_of(TrainConfig).items() if flag_of(n, spec) is not None]
    fields = {n: getattr(args, n) for n in names if hasattr(args, n)}
    fields.update(overrides)
    try:
        config = TrainConfig(**fields)
        check_fits(config)  # a MemoryError an hour in is worse than a refusal now
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return config


def check_backend(name: str) -> None:
    """``UsageError`` unless the backend can run here (CuPy needs CuPy and a CUDA device)."""
    if name == "numpy":
        return

    try:
        get_backend(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def resolve_out(args) -> str | None:
    """``--resume DIR`` implies ``--out DIR``; a different ``--out`` is an error. The output
    directory is then claimed (:func:`check_out_dir`) until the command returns (the command's
    entry point is wrapped by :func:`holds_out_dir`)."""
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
        check_out_dir(args.out, resume=args.resume is not None)
    return args.out


def check_out_dir(path: str, *, resume: bool = False):
    """Claim ``path`` for this process (:func:`numstab.run.outdir.claim`); ``UsageError`` unless it
    exists or can be created (to resume: exists and holds a checkpoint, and nothing is
    created otherwise), can be written, and no other numstab process is writing to it.

    Returns the :class:`~numstab.run.outdir.Claim` (released by :func:`holds_out_dir`).
    """
    try:
        return outdir.claim(path, resume=resume)
    except outdir.DirectoryBusy as exc:  # one writer per folder
        raise UsageError(f"{exc}; wait for it to end, or write into another folder") from None
    except outdir.OutDirError as exc:  # the message starts with the path
        raise UsageError(f"{'--resume' if resume else '--out'} {exc}") from None


def holds_out_dir(main):
    """Decorate a command's ``main(argv)``: the output directory it claims is released when
    it returns or raises (also when called in-process, e.g. by tests)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        with outdir.scope():
            return main(*args, **kwargs)

    return wrapper


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`numstab.run.atomic.write_text`)."""
    write_text(path, text)


def versions() -> dict:
    """Versions of everything that can change a result."""
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "mpmath": mpmath.__version__,
        "mpmath_backend": mpmath.libmp.BACKEND,
        # from its metadata: importing ml_dtypes only for its version costs up to a second
        "ml_dtypes": importlib.metadata.version("ml_dtypes"),
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


def progress_bar(total: int, desc: str, quiet: bool, initial: int = 0, **kw):
    """Progress on stderr (:func:`numstab.cli.progress.progress`): a tqdm bar on a terminal, a
    plain line every 10 s or 5 % of the steps elsewhere; None with ``quiet``. ``kw``:
    ``interval_s``, ``fraction``, ``stream``."""

    return _progress(total, desc, quiet=quiet, initial=initial, **kw)


def fmt_value(v, spec: str = ".3f") -> str:
    """A number for a report: ``format(v, spec)``, or ``"-"`` for None and NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


#: Exit code when the reader of stdout goes away (128 + SIGPIPE, as the shell reports it).
EXIT_BROKEN_PIPE = 141


class PipeGuard:
    """A text stream that goes quiet once its reader has gone (EPIPE, as after ``| head``).

    Python's recommended handling of a closed pipe: stop writing, and point the descriptor at
    ``os.devnull`` so that the interpreter's last flush of stdout cannot fail again.
    """

    def __init__(self, stream):
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._silence()

    def isatty(self) -> bool:
        return not self.broken and self.stream.isatty()

    def _silence(self) -> None:
        self.broken = True
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


def task_label(cfg) -> str:
    """The task of a config (a TrainConfig or its dict) in a few words: ``add mod 113``,
    ``parity 3 of 43 bits``, ``digits``."""
    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    task = get("task")
    if task == "parity":
        return f"parity {get('parity_k')} of {get('parity_bits')} bits"
    if task == "digits":
        return "digits (8x8)"
    return f"{task} mod {get('p')}"


def fmt_step(v) -> str:
    """The step an event happened at, or ``"never"``."""
    return "never" if v is None else str(v)


def _default_text(v) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return str(v)


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` that states each option's default once.

    ``(default: X)`` is appended unless the help already states a default, or X is None or
    False (an unset option, a flag that is off). ``argparse.ArgumentDefaultsHelpFormatter``
    appends it in those cases too ("(default: None)", defaults stated twice). Some Python
    versions' ``BooleanOptionalAction`` appends its own ``(default: %(default)s)``; it is
    dropped when the help already states the default.
    """

    _SUFFIX = " (default: %(default)s)"

    def _get_help_string(self, action):
        text = action.help or ""
        if text.endswith(self._SUFFIX) and "default" in text[: -len(self._SUFFIX)].lower():
            text = text[: -len(self._SUFFIX)]
        d = action.default
        if (
            "default" in text.lower()
            or d is None
            or d is False
            or d is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: {_default_text(d).replace('%', '%%')})"


def given_options(parser: argparse.ArgumentParser, argv, args) -> set[str]:
    """Destinations of the options given explicitly in ``argv`` (``args``: its parse).

    ``argv`` is parsed again into a namespace whose every attribute holds a marker: argparse
    applies a default only to a missing attribute, so an attribute that no longer holds the
    marker was given on the command line (even when given with its default value).
    """
    marker = object()
    ns = argparse.Namespace(**{k: marker for k in vars(args)})
    parser.parse_args(argv, namespace=ns)
    return {k for k, v in vars(ns).items() if v is not marker}


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    for a in parser._actions:  # the parser's own table of options (no public accessor)
        if a.dest == dest and a.option_strings:
            return max(a.option_strings, key=len)
    return "--" + dest.replace("_", "-")


def _json_value(v):
    return json.loads(json.dumps(v, default=json_default))


def adopt_saved_options(
    parser: argparse.ArgumentParser, args, given: set[str], saved: dict, free: dict | None = None
) -> None:
    """Continue a checkpointed run with its own options, in place on ``args``.

    Each option in ``saved`` (destination -> value, as JSON) that was not given on the command
    line takes the saved value; one given explicitly must equal it. ``UsageError`` names every
    given option that differs (nothing is changed then). Options in ``free`` (which do not
    change what is computed, e.g. the checkpoint interval) take the saved value when not given
    and may differ.
    """
    for k, v in (free or {}).items():
        if hasattr(args, k) and k not in given and k not in saved:
            setattr(args, k, v)
    now = {k: _json_value(getattr(args, k)) for k in saved if hasattr(args, k)}
    diff = [
        f"{_flag(parser, k)} {_default_text(now[k])} (checkpoint: {_default_text(saved[k])})"
        for k in sorted(now)
        if k in given and now[k] != saved[k]
    ]
    if diff:
        raise UsageError(
            "cannot resume: options differ from the checkpointed run's: "
            + "; ".join(diff)
            + " (drop them to continue that run as it was)"
        )
    for k in now:
        if k not in given:
            setattr(args, k, saved[k])


def wall_legs(extra: dict) -> list[float]:
    """Wall seconds of the earlier legs of a resumed run (a checkpoint's
    ``extra["wall_seconds_legs"]``; ``UsageError`` if malformed)."""
    legs = extra.get("wall_seconds_legs", [])
    ok = isinstance(legs, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < float("inf")
        for x in legs
    )
    if not ok:
        raise UsageError(
            f"cannot resume: checkpoint extra 'wall_seconds_legs' must be a list of seconds "
            f">= 0, got {legs!r}"
        )
    return [float(x) for x in legs]
