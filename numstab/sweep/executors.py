"""Where runs train: one run in a worker (:func:`execute`), and the two executors.

``local``: worker processes of our own, fresh interpreters that never import the caller's
``__main__``, one run at a time each; a worker that dies fails only its run and is replaced.
``dask``: an existing ``dask.distributed`` cluster, or an in-process ``LocalCluster``. Each
executor yields ``(task, result)`` pairs as runs finish; no file is written here (the client
writes every file, so Dask workers need no shared file system), except the checkpoints of a
sweep with ``checkpoint_every``, which only workers that see the sweep folder are given.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import queue
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

import numstab
from numstab.cli import UsageError, json_default, versions, wall_legs
from numstab.run import MetricLog, NonFiniteError, TrainConfig, summarize, train
from numstab.run.checkpoint import load_checkpoint
from numstab.run.runtime import runtime_info, tune_allocator
from numstab.sweep.folder import has_checkpoint
from numstab.sweep.spec import run_id

#: Test accuracy at which a run counts as grokked (``grok_step`` of its summary).
GROK_THRESHOLD = 0.9
#: Seconds a stopped worker gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 2.0
#: Seconds between checks for a signal while waiting on workers.
POLL_S = 0.2


# --- one run, in a worker --------------------------------------------------------------------


def execute(task: dict) -> dict:
    """Train one run where it is called (a pool process or a Dask worker) and return the result.

    ``task`` holds ``id``, ``config`` (TrainConfig keyword arguments), ``threads`` (BLAS
    threads to pin, or None), ``executor`` (recorded as is) and, optionally,
    ``checkpoint_dir`` and ``checkpoint_every``: the run then writes a checkpoint there every
    ``checkpoint_every`` steps and at the end, and a checkpoint already there is continued
    from, bit for bit (:func:`_resume_point`). Exceptions from training are caught and
    returned as ``status: "failed"`` with their type, message and traceback; the metrics
    logged up to the failure are returned too. No file is written here except checkpoints.
    """
    started = time.time()
    tune_allocator()
    if task.get("threads") is not None:
        # Persistent for this process (not restored): a pool process or Dask worker trains
        # one run at a time with this many BLAS threads.
        threadpool_limits(limits=int(task["threads"]))
    log = MetricLog()
    status, error = "ok", None
    t0 = time.perf_counter()
    leg = _resume_point(None, task)  # until the checkpoint is read: a fresh run
    pinned = None
    ckpt_dir = task.get("checkpoint_dir")
    try:
        config = TrainConfig(**task["config"])
        got = run_id(config)
        if got != task["id"]:
            raise RuntimeError(
                f"this worker resolves the configuration to id {got}, the client to "
                f"{task['id']}: numstab differs between client and worker"
            )
        leg = _resume_point(ckpt_dir, task)
        every = task.get("checkpoint_every") or leg.get("every")

        def extra() -> dict:
            # What the next leg needs: the BLAS threads that keep it bit-identical, the
            # checkpoint interval, and the wall time of every leg so far; and the step this
            # leg started from (its pace, for the dry run's time left).
            return {
                "threads": leg["threads"],
                "checkpoint_every": every,
                "wall_seconds_legs": [*leg["legs"], time.perf_counter() - t0],
                "leg_start_step": leg["step"],
            }

        with (
            contextlib.ExitStack() as stack,
            np.errstate(over="ignore", invalid="ignore", divide="ignore"),
        ):
            if leg["threads"] not in (None, task.get("threads")):
                stack.enter_context(threadpool_limits(limits=int(leg["threads"])))
            pinned = _blas_threads()
            train(
                config,
                name=task["id"],
                log=log,
                checkpoint_dir=ckpt_dir if every or leg["resume"] else None,
                checkpoint_every=every,
                resume=leg["resume"],
                extra=extra,
            )
    except Exception as exc:
        status = "failed"
        error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
        if isinstance(exc, NonFiniteError):
            error["step"] = exc.step
    legs = [*leg["legs"], time.perf_counter() - t0]
    summary = summarize(log, task["id"], grok_threshold=GROK_THRESHOLD)
    resumed = {"resumed_from_step": leg["step"], "wall_seconds_legs": legs} if leg["resume"] else {}
    if leg["resume"]:
        resumed["blas_threads"] = pinned  # in effect while this leg trained
    return {
        "id": task["id"],
        "status": status,
        "error": error,
        **summary,
        "wall_seconds": sum(legs),
        **resumed,
        "started": started,
        "finished": time.time(),
        "host": platform.node(),
        "pid": os.getpid(),
        "executor": task.get("executor"),
        "versions": versions(),
        "runtime": runtime_info(),
        "metrics_csv": log.csv_text(),
    }


def _blas_threads() -> int | None:
    """The BLAS thread count in effect (the least over the loaded BLAS libraries), or None."""
    counts = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    return min(counts) if counts else None


def _resume_point(ckpt_dir, task: dict) -> dict:
    """Where a run's training starts: ``resume`` (a checkpoint is in ``ckpt_dir``), its
    ``step``, the wall seconds of the earlier ``legs``, the BLAS ``threads`` they ran with
    (the resumed leg pins the same count, so that it continues bit for bit) and their
    checkpoint interval ``every``; without a checkpoint, a fresh run. A checkpoint that cannot
    be read raises :class:`~numstab.run.checkpoint.CheckpointError` (the run fails;
    ``--retry-failed`` starts it afresh)."""
    if ckpt_dir is None or not has_checkpoint(ckpt_dir):
        fresh = {"resume": False, "step": 0, "legs": [], "every": None}
        return fresh | {"threads": task.get("threads")}
    ckpt = load_checkpoint(ckpt_dir)
    extra = ckpt.extra if isinstance(ckpt.extra, dict) else {}
    steps = [meta.get("step") for meta in ckpt.manifest["runs"].values()]
    every = extra.get("checkpoint_every")
    threads = extra.get("threads", task.get("threads"))
    return {
        "resume": True,
        "step": min(steps) if steps else 0,
        "legs": wall_legs(extra),  # the train CLI's check of the same field
        "threads": threads if isinstance(threads, int) and threads >= 1 else None,
        "every": every if isinstance(every, int) and every >= 1 else None,
    }


def _crash_result(task: dict, exc: BaseException) -> dict:
    """Result of a task whose worker failed outside training (worker died, result lost)."""
    return _failed_result(
        task,
        {
            "type": type(exc).__name__,
            "message": str(exc) or type(exc).__name__,
            "traceback": "".join(traceback.format_exception(exc)),
        },
    )


def _failed_result(task: dict, error: dict) -> dict:
    return {
        "id": task["id"],
        "status": "failed",
        "error": error,
        "sc_onset_step": None,
        "sc50_step": None,
        "train100_step": None,
        "grok_step": None,
        "final": {},
        "wall_seconds": None,
        "executor": task.get("executor"),
        "metrics_csv": None,
    }


# --- the local executor ----------------------------------------------------------------------


# Worker processes of our own. Each is a fresh interpreter running _worker_main (never the
# caller's __main__, so a script without an `if __name__ == "__main__":` guard works), trains
# one run at a time, and talks JSON lines over its stdin/stdout: {"ready": pid} once, then one
# result per task. The client knows which run each worker holds, so a worker that dies fails
# exactly that run and is replaced.

_WORKER_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from numstab.sweep.executors import _worker_main; _worker_main()"
)


class WorkerStartError(RuntimeError):
    """A local worker process exited before it could take a run (its stderr says why)."""


def _worker_command() -> list[str]:
    """The command of a local worker: this interpreter, importing this very numstab."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(numstab.__file__)))
    return [sys.executable, "-c", _WORKER_CODE, root]


def _worker_main() -> None:
    """Body of a local worker process (see the comment above :data:`_WORKER_CODE`); an
    import error shows before ``"ready"``, as the worker's exit before taking a run."""
    # Stopping is the client's decision (it sends SIGTERM); Ctrl-C at a terminal reaches the
    # client only, since workers run in their own session, but a stray SIGINT must not kill a
    # run either.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything printed while training goes to stderr, not into the channel
    inbox: queue.Queue = queue.Queue()

    def read_tasks():
        for line in sys.stdin:
            inbox.put(line)
        # The client closed the pipe (done, or stopping) or died: leave at once, even in
        # the middle of a run, so that no worker outlives its sweep.
        os._exit(0)

    threading.Thread(target=read_tasks, daemon=True).start()

    def send(obj) -> None:
        channel.write(json.dumps(obj, default=json_default) + "\n")
        channel.flush()

    send({"ready": os.getpid()})
    while True:
        task = json.loads(inbox.get())
        try:
            result = execute(task)
            send(result)
        except Exception as exc:  # the result could not be encoded: still answer
            send(_crash_result(task, exc))


@dataclass
class _Worker:
    proc: subprocess.Popen
    buf: bytearray = field(default_factory=bytearray)
    ready: bool = False
    task: dict | None = None


def _died_result(task: dict, pid: int, returncode: int) -> dict:
    if returncode < 0:
        try:
            how = f"was killed by signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with code {returncode}"
    return _failed_result(
        task,
        {
            "type": "WorkerDied",
            "message": f"the worker process (pid {pid}) training this run {how}",
            "traceback": None,
        },
    )


def _stop_workers(procs: list, grace: float = STOP_GRACE_S) -> None:
    """Close the workers' input (idle ones leave), SIGTERM the rest, SIGKILL after ``grace``."""
    for p in procs:
        with contextlib.suppress(OSError):
            p.stdin.close()
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        with contextlib.suppress(OSError):
            p.stdout.close()


def _iter_local(tasks: list, workers: int, stop=None) -> Iterator[tuple[dict, dict]]:
    """Run ``tasks`` on ``workers`` local worker processes; yield ``(task, result)`` as they
    finish. Returns early, with every worker stopped, once ``stop`` is true (a signal)."""
    pending = deque(tasks)
    sel = selectors.DefaultSelector()
    procs: list[subprocess.Popen] = []

    def start() -> None:
        proc = subprocess.Popen(
            _worker_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        procs.append(proc)
        sel.register(proc.stdout, selectors.EVENT_READ, _Worker(proc))

    def assign(w: _Worker) -> None:
        if not pending:
            with contextlib.suppress(OSError):
                w.proc.stdin.close()  # nothing left: the worker leaves
            return
        w.task = pending.popleft()
        try:
            w.proc.stdin.write((json.dumps(w.task) + "\n").encode())
            w.proc.stdin.flush()
        except OSError:  # it died meanwhile: the run goes back, its death is seen below
            pending.appendleft(w.task)
            w.task = None

    try:
        for _ in range(min(workers, len(pending))):
            start()
        while sel.get_map():
            if stop:
                return
            for key, _ in sel.select(timeout=POLL_S):
                w = key.data
                chunk = os.read(key.fd, 1 << 20)
                if not chunk:  # the worker exited
                    sel.unregister(key.fileobj)
                    code = w.proc.wait()
                    if not w.ready:
                        raise WorkerStartError(
                            f"a local worker process exited with code {code} before taking a "
                            "run; its messages are above"
                        )
                    if w.task is not None:
                        task, w.task = w.task, None
                        yield task, _died_result(task, w.proc.pid, code)
                    if pending and not stop:
                        start()
                    continue
                w.buf += chunk
                while b"\n" in w.buf:
                    line, _, w.buf = w.buf.partition(b"\n")
                    try:
                        msg = json.loads(line)
                    except ValueError as exc:
                        msg = {"unreadable": str(exc)}
                    if not w.ready:
                        w.ready = True
                    elif w.task is not None:
                        task, w.task = w.task, None
                        if "unreadable" in msg:
                            msg = _crash_result(task, ValueError(msg["unreadable"]))
                        yield task, msg
                    assign(w)
    finally:
        sel.close()
        _stop_workers(procs)


# --- the Dask executor -----------------------------------------------------------------------


def _dask_modules():
    """``dask.distributed``, or UsageError saying how to install it."""
    try:
        from dask import distributed
    except ImportError as exc:
        raise UsageError(
            f"--executor dask needs dask.distributed ({exc}); install the sweep extra: "
            "pip install 'numstab[sweep]'"
        ) from None
    return distributed


@contextlib.contextmanager
def _dask_client(scheduler: str, workers: int):
    """A Dask client of the scheduler at ``scheduler``, or of an in-process LocalCluster of
    ``workers`` one-thread workers (``scheduler="local"``); UsageError when unreachable."""
    distributed = _dask_modules()
    cluster = None
    try:
        if scheduler == "local":
            cluster = distributed.LocalCluster(
                processes=False,
                n_workers=workers,
                threads_per_worker=1,
                dashboard_address=None,
            )
            client = distributed.Client(cluster)
        else:
            try:
                client = distributed.Client(scheduler, timeout="10s")
            except (OSError, TimeoutError) as exc:
                raise UsageError(f"cannot reach the Dask scheduler {scheduler!r}: {exc}") from None
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def _iter_dask(tasks: list, client, stop=None) -> Iterator[tuple[dict, dict]]:
    """Submit ``tasks`` to a Dask client; yield ``(task, result)`` as they finish. Returns
    early, with the tasks cancelled, once ``stop`` is true (a signal)."""
    distributed = _dask_modules()
    futures = {}
    for t in tasks:
        fut = client.submit(
            execute, t, pure=False, key=f"numstab-sweep-{t['id']}-{os.getpid()}-{time.time_ns()}"
        )
        futures[fut] = t
    done = distributed.as_completed(list(futures))
    try:
        while not done.is_empty():
            if stop:
                return
            batch = done.next_batch(block=False)
            if not batch:
                time.sleep(POLL_S / 2)
                continue
            for fut in batch:
                task = futures[fut]
                try:
                    result = fut.result()
                except Exception as exc:
                    result = _crash_result(task, exc)
                yield task, result
    finally:
        if not done.is_empty():
            with contextlib.suppress(Exception):
                client.cancel(list(futures))
