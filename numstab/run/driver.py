"""Driving training runs in lock-step, with checkpoints, resume and graceful signals.

:func:`drive` advances one or more :class:`~numstab.run.Run` objects together from their
current step to ``steps``. It writes a checkpoint every ``checkpoint_every`` steps and at the
end; SIGINT and SIGTERM are turned into a request to stop at the next step boundary (never in
the middle of an update), where a final checkpoint is written before :class:`Stopped` is
raised (exit codes 130 and 143 by convention). A write that fails (disk full, file too
large) raises :class:`OutputError` (exit code 4); the last checkpoint stays intact.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from numstab.run.checkpoint import (
    CheckpointError,
    checkpoint_rows,
    load_checkpoint,
    restore_run,
    save_checkpoint,
)

__all__ = [
    "OutputError",
    "Resumed",
    "StopFlag",
    "Stopped",
    "drive",
    "graceful_stop",
    "restore_runs",
    "resume_runs",
]


class Stopped(Exception):
    """Training stopped on a signal, after saving what was computed."""

    def __init__(self, signum: int, step: int):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}")
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum


class OutputError(Exception):
    """An output (metrics CSV, checkpoint, summary) could not be written: disk full, file too
    large, I/O error. Every row logged before is in the CSV, and the last checkpoint loads.

    Attributes
    ----------
    step : int or None
        The step the runs had reached.
    path : str or None
        The file that could not be written.
    cause : OSError
    before_training : bool
        The failure came before any step (a resume could not rebuild the CSV): the outputs
        there are still those of the previous command, and a caller should leave them so.
    """

    exit_code = 4

    def __init__(self, cause: OSError, step: int | None, *, before_training: bool = False):
        self.cause, self.step, self.path = cause, step, cause.filename
        self.before_training = before_training  # nothing was computed: write nothing more
        what = f"{cause.filename!r}" if cause.filename else "an output file"
        when = "" if step is None else f" at step {step}"
        super().__init__(f"cannot write {what}{when}: {cause.strerror or cause}")

    def status(self, checkpoint_dir=None) -> dict:
        """The ``status`` of a summary: kind ``output-error``, the step, the file, and the
        step of the checkpoint in ``checkpoint_dir`` if it loads (verified here)."""
        ckpt_step = None
        if checkpoint_dir is not None:
            try:
                runs = load_checkpoint(checkpoint_dir).manifest["runs"]
                ckpt_step = min(meta["step"] for meta in runs.values())
            except CheckpointError:
                pass
        message = str(self)
        if ckpt_step is not None:
            message += (
                f"; the checkpoint of step {ckpt_step} loads: make room, then continue with "
                f"--resume {checkpoint_dir}"
            )
        return {
            "kind": "output-error",
            "step": self.step,
            "path": self.path,
            "checkpoint_step": ckpt_step,
            "message": message,
        }


@dataclass
class StopFlag:
    """Set by the signal handlers; checked by :func:`drive` between steps."""

    signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def graceful_stop(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within the block, SIGINT/SIGTERM set a :class:`StopFlag` instead of interrupting.

    Only the main thread can install handlers; elsewhere the flag simply never fires. A second
    SIGINT while a stop is pending interrupts immediately (KeyboardInterrupt).
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {}

    def handler(signum, frame):
        if flag.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum

    for s in signals:
        previous[s] = signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class DriveResult:
    """What :func:`drive` did."""

    start_step: int
    end_step: int
    checkpoints: list = field(default_factory=list)


@dataclass(frozen=True)
class Resumed:
    """What :func:`restore_runs` read besides the runs: the driver's ``extra`` state and the
    metric rows, for the caller to put into its log once its own checks have passed."""

    extra: dict
    rows: list


def restore_runs(directory, runs: dict, *, allow_more_steps: bool = False) -> Resumed:
    """Validate the checkpoint in ``directory`` and restore ``runs`` from it (in memory only).

    Nothing is written: the caller rebuilds its metrics CSV (``log.reset(resumed.rows)``)
    after every check it makes itself, so a refused resume leaves the directory as it was.
    ``allow_more_steps``: see :func:`numstab.run.checkpoint.restore_run`.

    Raises
    ------
    CheckpointError
        The checkpoint is missing, corrupted, from another version, has other runs, or was
        made with a different configuration.
    """
    ckpt = load_checkpoint(directory)
    if sorted(runs) != sorted(ckpt.runs()):
        raise CheckpointError(f"runs: the checkpoint has {ckpt.runs()}, this needs {list(runs)}")
    for name, run in runs.items():
        restore_run(run, ckpt, name, allow_more_steps=allow_more_steps)
    return Resumed(extra=dict(ckpt.extra), rows=checkpoint_rows(ckpt))


def resume_runs(directory, runs: dict, log=None, *, allow_more_steps: bool = False) -> dict:
    """:func:`restore_runs`, then ``log.reset`` with the checkpoint's rows; return ``extra``.

    Raises :class:`~numstab.run.checkpoint.CheckpointError` (nothing written) or ``OSError`` (the
    CSV could not be rebuilt; the old one is intact).
    """
    resumed = restore_runs(directory, runs, allow_more_steps=allow_more_steps)
    if log is not None:
        log.reset(resumed.rows)
    return resumed.extra


def drive(
    runs: dict,
    log,
    *,
    steps: int,
    checkpoint_dir=None,
    checkpoint_every=None,
    inspect=None,
    log_policy=None,
    progress=None,
    extra=None,
    stop: StopFlag | None = None,
):
    """Advance ``runs`` (name -> Run, all at the same step) to ``steps``.

    Parameters
    ----------
    runs : dict of str -> Run
        Advanced in this order at every step.
    log : MetricLog
        The log all runs write to (saved in checkpoints).
    steps : int
        The final step (the last evaluation happens there, without an update).
    checkpoint_dir, checkpoint_every : optional
        Write a checkpoint every ``checkpoint_every`` steps (if given) and at the end, and on a
        stop request.
    inspect : callable, optional
        ``inspect(name, run, t)`` returning a per-run ``inspect`` callback for
        :meth:`Run.advance` (or None) at step ``t``.
    log_policy : callable, optional
        ``log_policy(t) -> bool | None``: force logging at step ``t`` (None: the run's rule).
    progress : callable, optional
        Called with the new step after each completed step.
    extra : callable, optional
        ``extra() -> dict`` of driver state saved in each checkpoint (``finished`` is added).
    stop : StopFlag, optional
        When set, the loop saves a checkpoint at the next step boundary and raises
        :class:`Stopped`.

    Raises
    ------
    Stopped, NonFiniteError
    OutputError
        Writing the log or a checkpoint failed; the previous checkpoint is intact.
    """
    names = list(runs)
    t0 = runs[names[0]].step
    if any(r.step != t0 for r in runs.values()):
        raise ValueError(f"runs are at different steps: { {n: r.step for n, r in runs.items()} }")
    result = DriveResult(start_step=t0, end_step=t0)

    def save(finished: bool):
        if checkpoint_dir is None:
            return
        state = dict(extra() if extra is not None else {})
        state["finished"] = finished
        result.checkpoints.append(save_checkpoint(checkpoint_dir, runs, log, extra=state))

    try:
        for t in range(t0, steps + 1):
            if stop:  # checked at every step boundary, before any work of step t
                save(finished=False)
                raise Stopped(stop.signum, t)
            final = t == steps
            forced = log_policy(t) if log_policy is not None else None
            for name in names:
                cb = inspect(name, runs[name], t) if inspect is not None else None
                runs[name].advance(final=final, log=forced, inspect=cb)
            result.end_step = t
            if final:
                break
            if progress is not None:
                progress(t + 1)
            if checkpoint_every and (t + 1) % checkpoint_every == 0:
                save(finished=False)
        save(finished=True)
    except OSError as exc:  # the loop's only I/O is the log's CSV and the checkpoints
        raise OutputError(exc, runs[names[0]].step) from exc
    return result
