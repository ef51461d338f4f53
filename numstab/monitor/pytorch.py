"""``Monitor``: the paper's diagnostics inside an ordinary PyTorch training loop.

::

    mon = Monitor(model, optimizer, out="runs/x", every=1, audit_every=100)
    for step in range(steps):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        with mon.observe(step, logits, y, loss=loss):
            optimizer.step()
    mon.close()

Entering ``observe`` (after ``backward``, before the update) measures ``θ_t`` and ``∇L``
(``weight_norm``, ``grad_norm``, ``nlm_cos_grad``) and takes the batch; leaving it measures
the batch (:func:`~numstab.monitor.core.batch_metrics`) and the update
(``absorbed_update_fraction``); every ``audit_every`` steps the batch's logits are audited
exactly (:func:`numstab.audit.audit_cross_entropy`, metrics ``audit_*``). Rows go to
``metrics.csv`` through numstab's :class:`~numstab.run.MetricLog` (flushed every observed
step: a crash keeps every row recorded); ``summary.json`` is written at the start (status
``"running"``) and by :meth:`Monitor.close`. With ``background=True`` the measuring runs on
the monitor's own thread, on copies taken inside ``observe``. torch is never imported by this
module: it reads the tensors it is given.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from numstab import kernels, ompteam, parallel, workspace
from numstab.audit import audit_cross_entropy
from numstab.backend import to_numpy
from numstab.checks import check_choice, check_eps
from numstab.cli import dump_json, versions
from numstab.interop import format_arg
from numstab.metrics import DOT_ORDERS
from numstab.monitor.core import (
    WINDOW,
    TopEntries,
    batch_metrics,
    metric_rows,
    param_metrics,
    update_metrics,
)
from numstab.precision import REDUCTION_ORDERS
from numstab.run.atomic import write_text
from numstab.run.loop import SUMMARY_SERIES, MetricLog, summarize
from numstab.run.outdir import claim

__all__ = ["AUDIT_KEYS", "HOST_BLAS_THREADS", "MAX_PENDING", "MONITOR_KINDS", "Monitor"]

#: BLAS threads of the monitor's host reductions that use BLAS (the norms and cosines with
#: ``norm_order="blas"``, the exact audit): one, whatever the loop uses, so that the values do
#: not depend on the loop's thread settings (a threaded dot product sums in another order) and
#: the monitor's small products never wait on the framework's own pool.
HOST_BLAS_THREADS = 1
#: The collapse window screens a batch (``batch_metrics(screen=True)``) unless a screen found
#: at least SCREEN_BELOW of the rows in it within the last RESCREEN_EVERY observed steps; then
#: every row is evaluated directly (same metrics; ``sc_window_fraction`` is 1).
SCREEN_BELOW = 0.5
RESCREEN_EVERY = 10
#: With ``background=True``, the loop waits once this many observed steps are unrecorded.
MAX_PENDING = 2
#: Losses the monitor measures (numstab's loss modules).
MONITOR_KINDS = ("softmax", "stablemax")
#: :meth:`~numstab.audit.CrossEntropyAudit.summary` keys logged as ``audit_<key>``.
AUDIT_KEYS = (
    "sc_fraction_exact",
    "agreement",
    "target_grad_100pct_wrong_fraction",
    "loss_max_ulp_error",
    "mpmath_rows",
    "seconds",
)


def _torch_threads() -> int:
    """torch's intra-op thread count now."""
    import torch  # optional dependency: the monitor observes torch tensors

    return torch.get_num_threads()


def _warn_if_cores_are_taken() -> None:
    """RuntimeWarning when torch's threads already fill every core: a thread of the monitor's
    own then competes with them, and a thread pool waits for its slowest thread (measured on
    2 cores with 2 torch threads, late in training: the step 10-14 % slower, against 6-10 %
    inline; with ``norm_order="blas"`` 2.1 to 2.3 times slower; docs/monitor.md)."""
    n, cores = _torch_threads(), os.cpu_count() or 1
    if n >= cores:
        warnings.warn(
            f"Monitor(background=True) with torch using {n} threads on {cores} cores: the "
            "monitor's thread competes with them and slows the step down; give torch fewer "
            "threads (torch.set_num_threads) or measure inline (docs/monitor.md)",
            RuntimeWarning,
            stacklevel=3,
        )


def _positive(name, v, *, optional=False):
    if optional and v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


class Monitor:
    """Observe a PyTorch model's training: per-step collapse, NLM and absorption metrics.

    Parameters
    ----------
    model : torch.nn.Module or dict of name -> tensor
        Its parameters that require grad are observed (names from ``named_parameters``).
    optimizer : torch.optim.Optimizer, optional
        Tells which updates were due (non-zero): entries whose first-moment state
        (``exp_avg``, ``momentum_buffer``) is non-zero after the step, or whose gradient is
        non-zero without one, or any non-zero weight under weight decay. Without it: the
        gradient's non-zero entries.
    out : path, optional
        Output folder (claimed: one writer at a time): ``metrics.csv``, ``summary.json``.
        With it, every row goes to ``metrics.csv`` and only those ``summary.json`` reads stay
        in memory (the accuracy and SC fraction, two a step); without it every row stays in
        ``log.rows`` (11 + 4 per parameter tensor a step).
    loss : {"softmax", "stablemax"}
        The loss the loop trains with (numstab's twin is measured).
    loss_format : str, NumPy or torch dtype, optional
        Format of the loss computation; default: the logits' own dtype (under autocast,
        ``float32`` when the framework upcasts the loss).
    order : {"pairwise", "sequential", "wide", "sorted"}
        Summation order of the normaliser (numstab's; PyTorch's own is measured elsewhere).
    eps : float
        StableMax's denominator epsilon.
    norm_order : {"lanes8", "blas"}
        Summation order of the norms' and cosines' dot products
        (:data:`numstab.metrics.DOT_ORDERS`): ``"lanes8"`` (default) the same bits on every
        machine and thread count, in one pass over each tensor without BLAS; ``"blas"`` the
        bits of ``numstab.train``'s norms (NumPy's BLAS on ``HOST_BLAS_THREADS`` threads).
    every, audit_every : int
        Observe steps divisible by ``every``; of those, audit exactly the ones divisible by
        ``audit_every`` (None: never).
    name : str
        The ``run`` column of the rows.
    config : dict, optional
        Extra fields recorded in ``summary.json``'s ``config`` (they label plots).
    threads : int, optional
        Threads for the monitor's elementwise passes (the fused softmax kernel's row blocks,
        the correctly rounded ``exp`` and ``log`` of the collapse metrics); the values are the
        same at every count. Measuring inline where torch runs on an OpenMP team
        (:func:`numstab.ompteam.of_torch`, torch's CPU wheels) and the fused kernels run, the
        kernel's blocks go to that team: torch's worker threads, which spin on their cores
        between torch's parallel regions. Elsewhere they go to numstab's own threads, which
        pay only where cores are idle (on 2 cores with torch on both, 2 measured slower than 1
        inside the loop, docs/monitor.md). None (default): torch's thread count
        (``torch.get_num_threads()`` now) where the team is used, else 1. With the team, the
        batch metrics are timed on it and on the calling thread alone on a few observed steps
        of every thousand (:class:`numstab.ompteam.Trial`) and the faster way is kept: waking
        torch's workers once they sleep costs more than they save.
    background : bool
        Measure on a thread of the monitor's own: ``observe`` only copies the step's host
        arrays (logits, θ, ∇L, θ after the step) and the loop goes on while the previous step
        is measured, at most ``MAX_PENDING`` steps behind (it then waits). The same rows as
        without it; a crash loses the steps not yet recorded. With ``norm_order="blas"`` and
        for the exact audit, the thread's BLAS limit (``HOST_BLAS_THREADS``) is process-wide
        while it measures.
    """

    def __init__(
        self,
        model,
        optimizer=None,
        *,
        out=None,
        loss="softmax",
        loss_format=None,
        order="pairwise",
        eps=0.0,
        norm_order="lanes8",
        every=1,
        audit_every=None,
        name="run",
        config=None,
        threads=None,
        background=False,
    ):
        check_choice(loss, MONITOR_KINDS, "loss")
        check_choice(order, REDUCTION_ORDERS, "order")
        check_eps(eps)
        check_choice(norm_order, DOT_ORDERS, "norm_order")
        self.norm_order = norm_order
        self.every = _positive("every", every)
        threads = _positive("threads", threads, optional=True)
        if not isinstance(background, (bool, np.bool_)):
            raise TypeError(f"background must be a bool, got {background!r}")
        self.audit_every = _positive("audit_every", audit_every, optional=True)
        self.fmt = None if loss_format is None else format_arg(loss_format, "loss_format")
        named = model.items() if isinstance(model, dict) else model.named_parameters()
        self.params = {k: p for k, p in named if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no parameters that require grad")
        # inline only: the team that spins is the one of the thread torch's regions start from,
        # and with the model on the host only: a GPU loop leaves torch's CPU workers asleep,
        # and waking them costs more than they save (ompteam.Trial)
        on_host = all(p.device.type == "cpu" for p in self.params.values())
        use_team = on_host and not background and kernels.backend() == "numba"
        team = ompteam.of_torch() if use_team else None
        if threads is None:
            threads = _torch_threads() if team is not None else 1
        self.threads = threads
        self._team = team if threads > 1 else None  # one thread: the caller's own
        self._trial = None if self._team is None else ompteam.Trial()
        self.optimizer, self.kind, self.order = optimizer, loss, order
        self.eps, self.name = float(eps), name
        self.extra = dict(config or {})
        self.out = None if out is None else os.fspath(out)
        self._claim = claim(self.out, holder="numstab monitor") if self.out else None
        path = None if self.out is None else os.path.join(self.out, "metrics.csv")
        # with a file, in memory only the rows summary.json reads (the log stays small)
        self.log = MetricLog(path, keep=SUMMARY_SERIES if path else None)
        self._ws = workspace.Workspace()  # the batch's temporaries, reused step after step
        self._unscreened = RESCREEN_EVERY  # observed steps since a screen found it unneeded
        self._top = TopEntries(RESCREEN_EVERY)
        if background:
            _warn_if_cores_are_taken()
        self._pool = ThreadPoolExecutor(1, "numstab-monitor") if background else None
        self._pending: collections.deque = collections.deque()
        self.steps_observed, self.seconds, self.record_seconds = 0, 0.0, 0.0
        self._t0 = time.perf_counter()
        self._write_summary("running")

    # --- the loop's hook -------------------------------------------------------------

    @contextlib.contextmanager
    def observe(self, step, logits, labels, *, loss=None):
        """Wrap ``optimizer.step()``: measure before (batch, θ, ∇L) and after (Δθ).

        ``logits`` (N, C) or (..., C) and ``labels`` (N,) or (...) are the batch the gradient
        came from (every label a class index: drop padded positions first); ``loss``
        (a scalar tensor or float, optional) is logged as ``loss``. Steps not divisible by
        ``every`` pass through untouched. With ``background=True`` the step's host arrays are
        copied here and measured on the monitor's thread; an error there is raised by the
        next ``observe``, :meth:`drain` or :meth:`close`.
        """
        step = int(step)
        if step % self.every:
            yield
            return
        t0 = time.perf_counter()
        with workspace.using(self._ws):  # the copies' arrays (not across the yield)
            batch = self._snapshot(logits, labels, loss)
            grads = {k: p.grad for k, p in self.params.items() if p.grad is not None}
            theta = {k: self._copy(self.params[k]) for k in grads}  # θ_t
            params = None
            if self._pool is None:  # θ_t and ∇L measured now, ∇L read in place (not copied)
                params = self._params(theta, {k: to_numpy(g) for k, g in grads.items()})
                grads = None
            else:  # copies, measured on the monitor's thread (the loop may zero ∇L meanwhile)
                grads = {k: self._copy(g) for k, g in grads.items()}
        self.seconds += time.perf_counter() - t0
        yield
        t0 = time.perf_counter()
        with workspace.using(self._ws):
            after = {k: self._host(self.params[k]) for k in theta}
        job = (step, batch, theta, grads, after, self._due(theta), params)
        if self._pool is None:
            self._record(*job)
        else:
            self._submit(job)
        self.seconds += time.perf_counter() - t0

    def _host(self, t) -> np.ndarray:
        """A host array of ``t``: a view where the record is made at once, else a copy (the
        loop may change the tensor before the monitor's thread reads it)."""
        return self._copy(t) if self._pool is not None else to_numpy(t)

    @staticmethod
    def _copy(t) -> np.ndarray:
        """A copy of ``t``'s values on the host, in an array of the active workspace (the
        monitor's, reused once no record holds it: a fresh one each step page-faults its
        memory in)."""
        a = to_numpy(t)
        out = workspace.empty(a.shape, a.dtype)
        np.copyto(out, a)
        return out

    def _snapshot(self, logits, labels, loss):
        z, y = self._host(logits), np.asarray(to_numpy(labels), dtype=np.int64)
        if z.ndim != 2 and z.ndim >= 1 and y.shape == z.shape[:-1]:  # (..., C): one row each
            z, y = z.reshape(-1, z.shape[-1]), y.reshape(-1)
        value = None
        if loss is not None:
            value = float(to_numpy(loss) if hasattr(loss, "detach") else loss)
        return z, y, value

    def _record(self, step, batch, theta, grads, after, due, params=None) -> None:
        """Compute one observed step's metrics and write its rows (on the monitor's thread
        with ``background=True``). ``params``: :func:`~numstab.monitor.core.param_metrics`
        if already measured (inline), else measured here from ``theta`` and ``grads``."""
        t0 = time.perf_counter()
        z, y, loss = batch
        # on torch's team, or where the trial found it slower on this thread alone
        on_team = self._trial is not None and self._trial.choose()
        threads = self.threads if on_team or self._team is None else 1
        with (
            parallel.using(threads, team=self._team if on_team else None),
            workspace.using(self._ws),
        ):
            if loss is not None:
                self.log.add(step, self.name, "train", "loss", loss)
            t1 = time.perf_counter()
            fmt = self._batch(step, z, y)
            if self._trial is not None:
                self._trial.record(on_team, time.perf_counter() - t1)
            self._add(step, self._params(theta, grads) if params is None else params)
            if self.audit_every and step % self.audit_every == 0:
                with parallel.blas_limit(HOST_BLAS_THREADS):
                    self._audit(step, z, y, fmt)
            self._add(step, update_metrics(theta, after, due))
        self.log.flush()
        self.steps_observed += 1
        self.record_seconds += time.perf_counter() - t0

    def _params(self, theta, grads) -> dict:
        """:func:`~numstab.monitor.core.param_metrics` in the monitor's ``norm_order`` (with
        ``"blas"`` on ``HOST_BLAS_THREADS`` BLAS threads; ``"lanes8"`` calls no BLAS)."""
        if self.norm_order != "blas":
            return param_metrics(theta, grads, order=self.norm_order)
        with parallel.blas_limit(HOST_BLAS_THREADS):
            return param_metrics(theta, grads, order="blas")

    def _submit(self, job) -> None:
        """Queue a record on the monitor's thread; wait for the oldest when MAX_PENDING are
        queued (the loop never runs more than that ahead), and raise a failed one's error."""
        while self._pending and (self._pending[0].done() or len(self._pending) >= MAX_PENDING):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._record, *job))

    def drain(self) -> None:
        """Wait until every observed step is recorded (no-op without ``background``)."""
        while self._pending:
            self._pending.popleft().result()

    def _batch(self, step, z, y):
        fmt = self.fmt or format_arg(z.dtype)
        # Late in training nearly every row is in the window: the screen's pass is then
        # skipped (same metrics), and repeated every RESCREEN_EVERY observed steps.
        screen = self._unscreened >= RESCREEN_EVERY
        batch = batch_metrics(
            z, y, fmt, kind=self.kind, order=self.order, eps=self.eps, screen=screen, top=self._top
        )
        if screen and batch["sc_window_fraction"] >= SCREEN_BELOW:
            self._unscreened = 0
        self._unscreened += 1
        self._add(step, batch)
        return fmt

    def _audit(self, step, z, y, fmt) -> None:
        a = audit_cross_entropy(
            z, y, dtype=fmt, kind=self.kind, order=self.order, eps=self.eps
        ).summary()
        for key in AUDIT_KEYS:
            if a[key] is not None:
                self.log.add(step, self.name, "train", f"audit_{key}", a[key])

    def _due(self, before: dict) -> dict:
        """The entries whose update was due (see the class docstring), as host arrays whose
        non-zero entries mark them: inline, the optimizer's state read in place; bools on
        the monitor's thread (a copy: the loop goes on) or under weight decay (θ's non-zero
        entries added)."""
        opt = self.optimizer
        groups = {} if opt is None else {id(p): g for g in opt.param_groups for p in g["params"]}
        due = {}
        for k, theta in before.items():
            p = self.params[k]
            state = {} if opt is None else opt.state.get(p, {})
            moment = state.get("exp_avg", state.get("momentum_buffer"))
            due[k] = to_numpy(moment if moment is not None else p.grad)
            decay = groups.get(id(p), {}).get("weight_decay", 0)
            if self._pool is not None or decay:  # a copy (the loop goes on) or θ's too
                due[k] = due[k] != 0
            if decay:
                due[k] |= theta != 0
        return due

    def _add(self, step, metrics: dict) -> None:
        for metric, layer, value in metric_rows(metrics):
            self.log.add(step, self.name, "train", metric, value, layer)

    # --- files -------------------------------------------------------------------------

    def settings(self) -> dict:
        """The monitor's parameters, as recorded in ``summary.json``."""
        import torch  # optional dependency: recorded when present

        return {
            "loss": self.kind,
            "loss_format": None if self.fmt is None else self.fmt.name,
            "order": self.order,
            "eps": self.eps,
            "norm_order": self.norm_order,
            "every": self.every,
            "audit_every": self.audit_every,
            "collapse_window": f"t2 <= {WINDOW:g} * 2**-p",
            "host_blas_threads": HOST_BLAS_THREADS,
            "threads": self.threads,
            "openmp_team": None if self._team is None else self._team.path,
            "background": self._pool is not None,
            "params": list(self.params),
            "optimizer": None if self.optimizer is None else type(self.optimizer).__name__,
            "torch": torch.__version__,
        }

    def _write_summary(self, status) -> dict:
        summary = {
            "config": {**self.settings(), **self.extra},
            "versions": versions(),
            "run": summarize(self.log, self.name),
            "steps_observed": self.steps_observed,
            "openmp_team_steps": 0 if self._trial is None else self._trial.team_calls,
            "monitor_seconds": self.seconds,
            "record_seconds": self.record_seconds,
            "wall_seconds": time.perf_counter() - self._t0,
            "status": status,
        }
        if self.out is not None:
            write_text(os.path.join(self.out, "summary.json"), dump_json(summary))
        return summary

    def close(self, status="ok") -> dict:
        """Record the pending steps, flush the rows, write ``summary.json`` with ``status``
        (a failed record's error instead, then raised), release the folder."""
        error = None
        try:
            self.drain()
        except Exception as e:  # a record failed on the monitor's thread
            error = e
            status = {"kind": type(e).__name__, "message": str(e)}
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pending.clear()
        try:
            self.log.close()
            summary = self._write_summary(status)
        finally:
            if self._claim is not None:
                self._claim.release()
        if error is not None:
            raise error
        return summary

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("ok" if exc_type is None else {"kind": exc_type.__name__, "message": str(exc)})
