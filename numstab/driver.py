"""Driving training runs in lock-step, with checkpoints, resume and graceful signals.

:func:`drive` advances one or more :class:`~numstab.train.Run` objects together from their
current step to ``steps``. It writes a checkpoint every ``checkpoint_every`` steps and at the
end; SIGINT and SIGTERM are turned into a request to stop at the next step boundary (never in
the middle of an update), where a final checkpoint is written before :class:`Stopped` is
raised (exit codes 130 and 143 by convention).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from numstab.checkpoint import load_checkpoint, restore_log, restore_run, save_checkpoint

__all__ = ["StopFlag", "Stopped", "drive", "graceful_stop", "resume_runs"]


class Stopped(Exception):
    """Training stopped on a signal, after saving what was computed."""

    def __init__(self, signum: int, step: int):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}")
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum


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


def resume_runs(directory, runs: dict, log, *, allow_more_steps: bool = False) -> dict:
    """Restore ``runs`` and ``log`` from the checkpoint in ``directory``; return its ``extra``.

    ``allow_more_steps``: see :func:`numstab.checkpoint.restore_run`.

    Raises :class:`~numstab.checkpoint.CheckpointError` if the checkpoint is missing, corrupted,
    from another version, or was made with a different configuration.
    """
    ckpt = load_checkpoint(directory)
    missing = set(runs) - set(ckpt.runs())
    if missing:
        from numstab.checkpoint import CheckpointError

        raise CheckpointError(f"checkpoint has runs {ckpt.runs()}, not {sorted(missing)}")
    for name, run in runs.items():
        restore_run(run, ckpt, name, allow_more_steps=allow_more_steps)
    restore_log(log, ckpt)
    return dict(ckpt.extra)


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
    return result
