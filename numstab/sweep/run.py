"""Run a sweep: plan what is left to do, execute it, record every run, collect the tables.

A run whose ``summary.json`` says ``ok`` is skipped when the sweep is invoked again, so an
interrupted sweep resumes and loses only unfinished runs; a failed run is rerun only with
``retry_failed`` (a deterministic failure would just fail again), every run with ``force``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from threadpoolctl import threadpool_limits
from tqdm import tqdm

from numstab.cli import UsageError, check_backend, check_out_dir, fmt_value
from numstab.run.driver import graceful_stop
from numstab.sweep.cells import _error_text, _jsonable
from numstab.sweep.executors import (
    WorkerStartError,
    _dask_client,
    _dask_modules,
    _iter_dask,
    _iter_local,
)
from numstab.sweep.folder import (
    _prepare_run_dir,
    _state,
    _write_json,
    _write_run_result,
    has_checkpoint,
)
from numstab.sweep.spec import MAX_RUNS, PlannedRun, Sweep, load_spec, parse_spec
from numstab.sweep.tables import collect

#: The command's name in the lines it prints.
PROG = "python -m numstab.sweep"


@dataclass
class SweepReport:
    """What :func:`run_sweep` did.

    ``executed``: ids trained in this invocation (in completion order); ``skipped``: ids left
    alone (already ok, or failed before and not retried); ``failed``: one dict per run of the
    SPEC whose status is failed after this invocation (``id``, ``label``, ``error``,
    ``previous``: True if it failed in an earlier invocation and was not rerun);
    ``collected``: what :func:`collect` returned; ``interrupted``: stopped by ``signal``
    (SIGINT or SIGTERM); ``error``: why the sweep stopped early otherwise (a local worker
    could not start); ``exit_code``: 0, 1, 130 (SIGINT) or 143 (SIGTERM).
    """

    planned: list
    executed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    wall_seconds: float = 0.0
    collected: dict | None = None
    interrupted: bool = False
    signal: int | None = None
    error: str | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + (self.signal or signal.SIGINT)
        return 1 if self.failed or self.error else 0


def run_sweep(
    spec,
    out,
    *,
    executor: str = "local",
    workers: int = 1,
    threads: int | None = 1,
    scheduler: str | None = None,
    force: bool = False,
    retry_failed: bool = False,
    checkpoint_every: int | None = None,
    quiet: bool = False,
    max_runs: int | None = MAX_RUNS,
    max_run_bytes: int | str | None = "default",
    on_start=None,
    stdout=None,
    stderr=None,
) -> SweepReport:
    """Run every run of a SPEC that is not done yet, write its folder, then :func:`collect`.

    Parameters
    ----------
    spec : path, dict or Sweep
        The SPEC (a TOML file path, the parsed dict, or :func:`load_spec`'s result).
    out : path
        The sweep folder ``DIR``.
    executor : {"local", "dask"}
    workers : int
        Local worker processes, or LocalCluster workers (``scheduler="local"``).
    threads : int or None
        BLAS threads pinned in each worker (None: leave the library's setting).
    scheduler : str
        Dask scheduler address (``tcp://host:8786``) or ``"local"``; dask executor only.
    force, retry_failed : bool
        Rerun every run / the failed runs too, from step 0 (``force`` removes every
        checkpoint, ``retry_failed`` those of the failed runs).
    checkpoint_every : int, optional
        Each run writes a checkpoint into its folder every this many steps and at the end
        (local executor and ``scheduler="local"``: the workers write into ``out``). An
        incomplete run whose folder holds a checkpoint continues from it, bit for bit, with
        the BLAS thread count it was started with, whether or not this is given.
    quiet : bool
        No progress bar (it is also off when stderr is not a terminal).
    max_runs, max_run_bytes
        Limits of :func:`parse_spec` for a SPEC given as a path or dict.
    on_start : callable, optional
        Called with no argument once the folder is claimed and the plan made, before any run
        starts: a caller's own record goes beside the runs only where the sweep is not refused
        (a refused sweep writes nothing, not even into a folder another sweep is writing).

    SIGINT and SIGTERM (in the main thread) stop the sweep: the workers are stopped (runs in
    flight stay incomplete, with their last checkpoint if they write any), finished runs are
    kept and collected, and the report's ``exit_code`` is 130 or 143.

    Raises
    ------
    SpecError, UsageError
        Before anything is written.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    sweep = _as_sweep(spec, max_runs=max_runs, max_run_bytes=max_run_bytes)
    _check_options(executor, workers, threads, scheduler, checkpoint_every)
    if executor == "dask":
        _dask_modules()
    _check_backends(sweep, executor, scheduler)
    out = os.fspath(out)
    claim = check_out_dir(out)  # one writer per folder: a second sweep is refused (exit 2)
    report = SweepReport(planned=[r.id for r in sweep.runs])
    t0 = time.perf_counter()
    with claim, graceful_stop() as stop:
        todo, skip = _plan(sweep, out, force, retry_failed)
        report.skipped = [r.id for r, _s, _x in skip]
        resumable = sum(_continues(out, r.id, st, executor, scheduler, force) for r, st in todo)
        _print_plan(sweep, todo, skip, out, stdout, resumable)
        if on_start is not None:
            on_start()
        exec_info = {
            "kind": executor,
            "workers": workers,
            "threads": threads,
            "scheduler": scheduler,
            "checkpoint_every": checkpoint_every,
        }
        _execute_all(
            sweep,
            todo,
            out,
            report,
            stop,
            exec_info=exec_info,
            rerun={"force": force, "retry_failed": retry_failed},
            quiet=quiet,
            stdout=stdout,
            stderr=stderr,
        )
        if stop and not report.interrupted:
            report.interrupted, report.signal = True, stop.signum
        report.wall_seconds = time.perf_counter() - t0
        report.failed = _failed_runs(sweep, out, report.executed)
        report.collected = collect(out)
    _print_outcome(report, len(todo), exec_info, out, stdout, stderr)
    return report


def _as_sweep(spec, **limits) -> Sweep:
    """A SPEC given as a path, a parsed dict or a Sweep, as a Sweep."""
    if isinstance(spec, Sweep):
        return spec
    return parse_spec(spec, **limits) if isinstance(spec, dict) else load_spec(spec, **limits)


def _check_options(executor, workers, threads, scheduler, checkpoint_every=None) -> None:
    """UsageError unless the executor options fit together."""
    if executor not in ("local", "dask"):
        raise UsageError(f"--executor must be local or dask, got {executor!r}")
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if executor == "dask" and not scheduler:
        raise UsageError(
            "--executor dask needs --scheduler ADDRESS (tcp://host:8786) or --scheduler local"
        )
    if executor == "local" and scheduler:
        raise UsageError("--scheduler is for --executor dask")
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int):
            raise UsageError(f"--checkpoint-every must be an integer, got {checkpoint_every!r}")
        if checkpoint_every < 1:
            raise UsageError(f"--checkpoint-every must be >= 1, got {checkpoint_every}")
        if not _shares_out(executor, scheduler):
            raise UsageError(
                "--checkpoint-every needs workers that write into the sweep folder: "
                "--executor local or --scheduler local (a remote cluster's workers may not "
                "see it)"
            )


def _shares_out(executor, scheduler) -> bool:
    """Whether the workers see the sweep folder (they can write and read checkpoints)."""
    return executor == "local" or scheduler == "local"


def _continues(out, run_id: str, state: str, executor, scheduler, force: bool) -> bool:
    """Whether a run to execute continues from the checkpoint in its folder (an incomplete
    run, not forced, on workers that see the folder) rather than starting at step 0."""
    return (
        state == "incomplete"
        and not force
        and _shares_out(executor, scheduler)
        and bool(out)
        and has_checkpoint(os.path.join(out, run_id))
    )


def _check_backends(sweep: Sweep, executor: str, scheduler: str | None) -> None:
    """UsageError when a run asks for a backend this machine cannot run (CuPy without CuPy or
    a GPU). Runs on a remote Dask cluster are not checked here: its workers may have GPUs."""
    if executor == "dask" and scheduler != "local":
        return
    for name in sorted({r.config.backend for r in sweep.runs} - {"numpy"}):
        try:
            check_backend(name)
        except UsageError as exc:
            raise UsageError(f'the SPEC asks for backend = "{name}": {exc}') from None


def _plan(sweep: Sweep, out: str | None, force: bool, retry_failed: bool):
    """``(todo, skip)``: ``(run, state)`` of the runs to execute, ``(run, state, summary)`` of
    the runs left alone (their state in ``out``: ok, or failed and not retried)."""
    todo, skip = [], []
    for r in sweep.runs:
        state, s = _state(os.path.join(out, r.id)) if out else ("new", None)
        if force or state in ("new", "incomplete") or (state == "failed" and retry_failed):
            todo.append((r, state))
        else:
            skip.append((r, state, s))
    return todo, skip


def _config_kwargs(config) -> dict:
    """The TrainConfig keyword arguments of ``config``, as JSON holds them (for a task)."""
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _execute_all(
    sweep: Sweep,
    todo: list,
    out: str,
    report: SweepReport,
    stop,
    *,
    exec_info: dict,
    rerun: dict,
    quiet: bool,
    stdout,
    stderr,
) -> None:
    """Write ``sweep.json`` (its options: ``exec_info`` and ``rerun``) and the folders of the
    runs ``todo``, execute them, and record each result as it arrives (``report.executed``).
    A signal or a local worker that cannot start ends it early (``report.interrupted`` /
    ``report.error``)."""
    planned_by_id = {r.id: r for r, _ in todo}
    # Every task holds exec_info itself: the number of workers a remote cluster reports on
    # connecting is what each run's summary records.
    shares = _shares_out(exec_info["kind"], exec_info["scheduler"])
    tasks = [
        {
            "id": r.id,
            "config": _config_kwargs(r.config),
            "threads": exec_info["threads"],
            "executor": exec_info,
            # the workers' view of the run folder: checkpoints go there and resume from there
            **(
                {
                    "checkpoint_dir": os.path.abspath(os.path.join(out, r.id)),
                    "checkpoint_every": exec_info["checkpoint_every"],
                }
                if shares
                else {}
            ),
        }
        for r, _ in todo
    ]
    bar = None
    try:
        with contextlib.ExitStack() as stack:
            client = _connect(stack, tasks, exec_info)
            _write_json(
                os.path.join(out, "sweep.json"),
                {
                    "spec": sweep.to_dict(),
                    "options": exec_info | rerun,  # after connecting: the cluster's workers
                    "started": time.time(),
                },
            )
            for r, state in todo:  # a rerun starts afresh; an incomplete run keeps its checkpoint
                fresh = rerun["force"] or state in ("ok", "failed")
                _prepare_run_dir(os.path.join(out, r.id), r, sweep.columns, fresh=fresh)
            bar = _progress_bar(len(tasks), quiet, stderr)
            results = _results(tasks, client, exec_info["workers"], stop)
            if tasks:  # on an interrupt, stop the executor before the client goes away
                stack.callback(results.close)
            for k, (task, result) in enumerate(results, 1):
                r = planned_by_id[task["id"]]
                s = _write_run_result(os.path.join(out, r.id), result, r)
                report.executed.append(r.id)
                _print_progress(_progress_line(k, len(tasks), r, s), bar, stdout)
    except KeyboardInterrupt:
        report.interrupted, report.signal = True, signal.SIGINT
    except WorkerStartError as exc:
        report.error = str(exc)
    finally:
        if bar is not None:
            bar.close()


def _connect(stack: contextlib.ExitStack, tasks: list, exec_info: dict):
    """The Dask client when there are tasks for the dask executor (None otherwise), entered
    on ``stack``; connecting comes before anything is written (unreachable: exit 2)."""
    if not tasks or exec_info["kind"] != "dask":
        return None
    scheduler, threads = exec_info["scheduler"], exec_info["threads"]
    if scheduler == "local" and threads is not None:
        # In-process workers pin this process's BLAS; restore it afterwards.
        stack.enter_context(threadpool_limits(limits=threads))
    client = stack.enter_context(_dask_client(scheduler, exec_info["workers"]))
    if scheduler != "local":
        exec_info["workers"] = len(client.scheduler_info()["workers"])
    return client


def _results(tasks: list, client, workers: int, stop):
    """``(task, result)`` pairs as the runs finish: on Dask when ``client`` is given, else on
    ``workers`` local worker processes (a generator, unless there are no tasks; close it to
    stop the executor)."""
    if not tasks:
        return iter(())
    if client is None:
        return _iter_local(tasks, workers, stop)
    return _iter_dask(tasks, client, stop)


def _progress_bar(n_tasks: int, quiet: bool, stderr):
    """A tqdm bar over the runs on a terminal's stderr, else None."""
    if not n_tasks or quiet or not stderr.isatty():
        return None
    return tqdm(total=n_tasks, file=stderr, unit="run", desc="sweep")


def _failed_runs(sweep: Sweep, out: str, executed: list) -> list:
    """One dict per run of the SPEC whose folder says failed (see :class:`SweepReport`)."""
    failed = []
    for r in sweep.runs:
        state, s = _state(os.path.join(out, r.id))
        if state == "failed":
            failed.append(
                {
                    "id": r.id,
                    "label": r.label(),
                    "error": s.get("error"),
                    "previous": r.id not in executed,
                }
            )
    return failed


# --- what the sweep prints -------------------------------------------------------------------


def _print_plan(sweep: Sweep, todo: list, skip: list, out: str, stdout, resumable: int = 0) -> None:
    n_ok = sum(1 for _r, st, _x in skip if st == "ok")
    n_failed = len(skip) - n_ok
    print(
        f"{len(sweep.runs)} runs in {sweep.source}: {len(todo)} to run"
        + (f" ({resumable} from their checkpoints)" if resumable else "")
        + f", {n_ok} already done"
        + (
            f", {n_failed} failed before (not rerun; --retry-failed reruns them)"
            if n_failed
            else ""
        )
        + f"; output {out}",
        file=stdout,
        flush=True,
    )
    for note in sweep.notes:
        print(f"note: {note}", file=stdout, flush=True)


def _progress_line(k: int, n: int, r: PlannedRun, s: dict) -> str:
    wall = s.get("wall_seconds")
    status = "ok" if s["status"] == "ok" else "FAILED"
    head = f"[{k:>{len(str(n))}}/{n}] {status:6s} {r.id}  {r.label()}  {fmt_value(wall, '.1f')} s"
    if s["status"] != "ok":
        return f"{head}  {_error_text(s.get('error'))}"
    fin = s.get("final") or {}
    return (
        f"{head}  test acc {fmt_value(fin.get('test_acc'), '.3f')}  "
        f"SC-50 step {fmt_value(s.get('sc50_step'), 'd')}"
    )


def _print_progress(line: str, bar, stdout) -> None:
    if bar is not None:
        bar.write(line, file=stdout)
        bar.update(1)
    else:
        print(line, file=stdout, flush=True)


def _print_outcome(
    report: SweepReport, n_tasks: int, exec_info: dict, out: str, stdout, stderr
) -> None:
    done = len(report.executed)
    nw = exec_info["workers"]
    threads = exec_info["threads"]
    print(
        f"{done} run{'s' if done != 1 else ''} executed in {report.wall_seconds:.1f} s "
        f"({exec_info['kind']}, {nw} worker{'s' if nw != 1 else ''}, "
        f"{threads if threads is not None else 'default'} BLAS thread(s) each); "
        f"collected tables in {out}",
        file=stdout,
        flush=True,
    )
    _print_skipped(report.collected, stderr)
    if report.interrupted:
        name = signal.Signals(report.signal).name
        print(
            f"{PROG}: interrupted ({name}) after {done} of {n_tasks} runs; the runs in "
            "flight were stopped; invoke the same command again to resume (a run with a "
            "checkpoint continues from it)",
            file=stderr,
        )
    if report.error:
        print(f"{PROG}: error: {report.error}", file=stderr)
    if report.failed:
        print(f"{PROG}: {len(report.failed)} run(s) failed:", file=stderr)
        for f in report.failed:
            when = " (earlier invocation; --retry-failed reruns it)" if f["previous"] else ""
            print(f"  {f['id']}  {f['label']}  {_error_text(f['error'])}{when}", file=stderr)


def _print_skipped(res: dict | None, stderr) -> None:
    """One warning line per file :func:`collect` skipped as malformed."""
    for sk in (res or {}).get("skipped", []):
        print(f"{PROG}: warning: skipped {sk['path']}: {sk['reason']}", file=stderr)
