"""The training loop: one run of the paper's setup under a precision policy, with metrics.

A :class:`Run` owns the state of one training run (data, parameters, optimizer state, step)
and advances it one step at a time, so that a driver (``numstab compare``) can run two of them
side by side and audit either between steps. :func:`train` runs one to completion.

Step convention: step ``t`` is the state after ``t`` updates. At a logged step the metrics
describe the parameters ``θ_t``, their gradient, and (except at the last step) the update
``θ_t -> θ_{t+1}`` that follows. Steps ``0, log_every, 2·log_every, ...`` and the last step
are logged.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from dataclasses import dataclass, field

import numpy as np

from numstab import metrics as M
from numstab import mlp, parallel, transformer, workspace
from numstab.backend import get_backend, namespace, put_at, take_at, to_numpy
from numstab.data import Dataset, get_dataset
from numstab.functional import GatherPlan
from numstab.losses import collapse_mask, loss_backward, loss_forward
from numstab.mlp import MLPConfig
from numstab.precision import quantize
from numstab.rounding_modes import stochastic_scope
from numstab.run.atomic import atomic_open
from numstab.run.config import TRANSFORMER_FIELDS, TrainConfig
from numstab.run.driver import OutputError, drive, restore_runs

__all__ = [
    "CSV_HEADER",
    "SUMMARY_SERIES",
    "MetricLog",
    "NonFiniteError",
    "Run",
    "make_dataset",
    "summarize",
    "train",
    "zero_sum_part",
]

CSV_HEADER = ("step", "run", "split", "metric", "layer", "value")


class NonFiniteError(FloatingPointError):
    """A loss or parameter became NaN or infinite; carries the run name and the step."""

    def __init__(self, run: str, step: int, what: str):
        super().__init__(f"run {run!r}: {what} is not finite at step {step}")
        self.run, self.step, self.what = run, step, what


class MetricLog:
    """Long-format metric rows ``(step, run, split, metric, layer, value)``.

    Rows are kept in memory (with ``keep``, only those of the metrics it names: a log that grows
    by hundreds of rows a step, as a monitor of a large model's tensors, then stays small;
    :meth:`latest` answers for every metric). With a ``stream`` they are written to it as they
    arrive. With a ``path`` they go to a CSV file, and only whole rows ever do: nothing touches
    the file until the first :meth:`flush` after rows arrived (it then creates it, header first)
    or a :meth:`reset` (which replaces it atomically); each flush appends the rows since the
    last one in one write. If a write fails (disk full, file too large) the file is cut back to
    its last whole row, the ``OSError`` (naming the file) is raised, and the file is not written
    again; the rows it keeps stay in memory. So a log made for a resume that is then refused
    leaves the old CSV as it was, and a crash leaves every row flushed before it."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        stream: io.TextIOBase | None = None,
        keep=None,
    ):
        self.keep = None if keep is None else frozenset(keep)
        self.rows: list[tuple] = []
        self._last: dict[tuple, tuple] = {}  # (run, split, metric, layer) -> (order, value)
        self._order = 0
        self.path = None if path is None else os.fspath(path)
        self._file: io.FileIO | None = None  # the CSV, once created or reset
        self._size = 0  # its length after the last complete write
        self._failed = False
        self._started = False  # the file was created (or reset) by this log
        self._pending = io.StringIO()  # formatted rows not yet in the file
        self._pending_writer = csv.writer(self._pending)
        if stream is not None:
            csv.writer(stream).writerow(CSV_HEADER)
        self._writer = csv.writer(stream) if stream is not None else None
        self._stream = stream

    @staticmethod
    def _csv_text(rows, *, header: bool) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        if header:
            w.writerow(CSV_HEADER)
        for row in rows:
            w.writerow((*row[:5], repr(row[5])))
        return buf.getvalue()

    def reset(self, rows) -> None:
        """Replace the rows (e.g. by a checkpoint's) and the CSV file, atomically.

        The file is left alone when it already holds exactly these rows. Raises ``OSError``
        if it cannot be written; the old file is then intact.
        """
        rows = [tuple(r) for r in rows]
        self.rows, self._last, self._order = [], {}, 0
        for r in rows:
            self._remember(r)
        self._pending = io.StringIO()
        self._pending_writer = csv.writer(self._pending)
        if self.path is None:
            return
        self.close()
        data = self._csv_text(rows, header=True).encode()  # every row, kept or not
        try:
            with open(self.path, "rb") as f:
                same = f.read() == data
        except OSError:
            same = False
        if not same:
            with atomic_open(self.path, "wb") as f:
                f.write(data)
        self._file = io.FileIO(self.path, "a")
        self._size = os.fstat(self._file.fileno()).st_size
        self._failed = False
        self._started = True

    def csv_text(self) -> str:
        """Every row as the text of a ``metrics.csv`` (header first), as :meth:`flush` and a
        ``stream`` write them (a log with ``keep``: ValueError, it does not hold them)."""
        if self.keep is not None:
            raise ValueError("this log keeps only the rows of some metrics (keep=...)")
        return self._csv_text(self.rows, header=True)

    def _remember(self, row: tuple) -> None:
        if self.keep is None or row[3] in self.keep:
            self.rows.append(row)
        self._last[(row[1], row[2], row[3], row[4])] = (self._order, row[5])
        self._order += 1

    def add(self, step: int, run: str, split: str, metric: str, value, layer: str = ""):
        row = (int(step), run, split, metric, layer, float(value))
        self._remember(row)
        line = (*row[:5], repr(row[5]))
        if self._writer is not None:
            self._writer.writerow(line)
        if self.path is not None:
            self._pending_writer.writerow(line)

    def flush(self):
        """Write the rows added since the last flush (and flush the stream)."""
        if self._stream is not None:
            self._stream.flush()
        text = self._pending.getvalue()
        if self.path is None or not text or self._failed:
            return
        if self._file is None and not self._started:
            self._file = io.FileIO(self.path, "w")
            self._size = 0
            text = self._csv_text([], header=True) + text
        elif self._file is None:  # reopened after close()
            self._file = io.FileIO(self.path, "a")
            self._size = os.fstat(self._file.fileno()).st_size
        data = memoryview(text.encode())
        done = 0
        try:
            while done < len(data):
                done += self._file.write(data[done:])
        except OSError as exc:
            self._failed = True
            with contextlib.suppress(OSError):
                os.ftruncate(self._file.fileno(), self._size)
            raise OSError(exc.errno, exc.strerror, self.path) from exc
        self._started = True
        self._size += len(data)
        self._pending = io.StringIO()
        self._pending_writer = csv.writer(self._pending)

    def close(self):
        """Flush, then close the CSV file (``OSError`` as in :meth:`flush`)."""
        try:
            self.flush()
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None

    def series(
        self, metric: str, *, run: str | None = None, split: str | None = None, layer: str = ""
    ):
        """``(steps, values)`` arrays of one metric, in step order (a metric the log keeps:
        ValueError otherwise)."""
        if self.keep is not None and metric not in self.keep:
            raise ValueError(
                f"metric {metric!r} is not kept in memory by this log (keep: {sorted(self.keep)})"
            )
        sel = [
            (r[0], r[5])
            for r in self.rows
            if r[3] == metric
            and r[4] == layer
            and (run is None or r[1] == run)
            and (split is None or r[2] == split)
        ]
        if not sel:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        s, v = zip(*sel, strict=True)
        return np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64)

    def latest(
        self, metric: str, *, run: str | None = None, split: str | None = None, layer: str = ""
    ) -> float:
        """The value of the metric's last row added (NaN if none); any metric, kept or not."""
        hits = [
            v
            for (r, sp, m, lay), v in list(self._last.items())  # a copy: a monitor's thread adds
            if m == metric
            and lay == layer
            and (run is None or r == run)
            and (split is None or sp == split)
        ]
        return float(max(hits)[1]) if hits else float("nan")


@dataclass
class _Eval:
    """Forward/backward results at the current parameters on one split."""

    logits: np.ndarray
    loss: np.ndarray
    dz: np.ndarray
    cache: object
    model_cache: list | dict | None = None
    attention: object = None  # the transformer's AttentionCache


@dataclass
class Run:
    """One training run, advanced step by step.

    Parameters
    ----------
    config : TrainConfig
    name : str
        Run label in the metric rows (e.g. ``"test"``, ``"reference"``).
    log : MetricLog, optional
        Where metrics go (a fresh in-memory log by default).
    data : Dataset, optional
        Reuse an already generated dataset (must match the config).
    elementwise_threads : int, optional
        Threads of the elementwise passes that :mod:`numstab.parallel` splits (None: the
        BLAS thread count in effect at each step). Speed only: the results are the same bits.
    """

    config: TrainConfig
    name: str = "run"
    log: MetricLog = field(default_factory=MetricLog)
    data: Dataset | None = None
    elementwise_threads: int | None = None

    def __post_init__(self):
        c = self.config
        self.policy = c.policy
        if self.data is None:
            self.data = make_dataset(c)
        d = self.data
        self.net = transformer if c.model == "transformer" else mlp
        if c.model == "transformer":
            self.model = transformer.TransformerConfig(
                vocab=d.n_inputs,
                n_classes=d.n_classes,
                **{name: getattr(c, name) for name in TRANSFORMER_FIELDS},
            )
        else:
            self.model = MLPConfig(
                n_inputs=d.n_inputs,
                n_classes=d.n_classes,
                hidden=c.hidden,
                bias=c.bias,
                alpha=c.alpha,
                input_kind="index" if d.encoding == "onehot" else "dense",
            )
        # Arrays live on the backend's device; everything below the loop takes its namespace
        # from them. Host copies of the indices build the gather plan and mini-batches.
        self.xp = get_backend(c.backend)
        self._x_host = {"train": np.asarray(d.x_train), "test": np.asarray(d.x_test)}
        self.x_train, self.y_train = self._inputs(d.x_train), self._device(d.y_train)
        self.x_test, self.y_test = self._inputs(d.x_test), self._device(d.y_test)
        init_kw = {"scale": c.init_scale} if c.model == "mlp" else {}  # the MLP's option
        with stochastic_scope(c.seed, -1, "init"):  # the phases of stochastic rounding's keys
            self.params = self.net.init_params(
                self.model,
                c.seed,
                self.policy.storage,
                xp=None if c.backend == "numpy" else self.xp,
                **init_kw,
            )
        self.plan = self._plan(self._x_host["train"])
        self.optimizer = c.make_optimizer()
        self.opt_state = self.optimizer.init_state(self.params)
        self.batch_rng = np.random.default_rng([c.seed, 1])
        self.step = 0
        # The step's large arrays, reused from step to step (numstab.workspace).
        self.workspace = workspace.Workspace()

    def _device(self, x):
        x = np.asarray(x)
        return x if self.config.backend == "numpy" else self.xp.asarray(x)

    def _inputs(self, x):
        x = self._device(x)
        if self.data.encoding in ("onehot", "tokens"):
            return x
        with stochastic_scope(self.config.seed, -1, "inputs"):
            return quantize(x, self.policy.storage)

    def _plan(self, x_host):
        """The first layer's segment-sum plan for these (host) inputs; None for dense ones."""
        if self.data.encoding == "tokens":
            return transformer.gather_plan(x_host, self.model, like=self.params["embed"])
        if self.data.encoding == "onehot":
            return GatherPlan.build(x_host, self.model.n_inputs, like=self.params["W1"])
        return None

    @property
    def dropout_active(self) -> bool:
        """Whether training forward passes draw dropout masks (the transformer's)."""
        return self.config.model == "transformer" and self.config.dropout > 0

    # --- the computation ---------------------------------------------------------------

    def evaluate(
        self, split: str = "train", *, with_grads: bool = False, rows=None, train: bool = False
    ) -> _Eval:
        """Forward pass, loss and logit gradient at the current parameters.

        ``with_grads`` keeps the model cache for a parameter backward. ``rows`` selects a
        mini-batch of the training split. ``train``: the training pass (the transformer then
        draws its dropout masks for this step, :mod:`numstab.transformer.dropout`).
        """
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        if rows is not None:
            r = self._device(rows)
            x, y = x[r], y[r]
        with stochastic_scope(self.config.seed, self.step, "forward"):
            return self._evaluate(x, y, with_grads, train)

    def _evaluate(self, x, y, with_grads: bool, train: bool) -> _Eval:
        kw = {}
        if train and self.dropout_active:
            kw["dropout"] = transformer.DropoutKey(self.config.seed, self.step)
        z, mcache = self.net.forward(self.params, x, self.model, self.policy, **kw)
        loss, lcache = loss_forward(
            z,
            y,
            kind=self.config.loss,
            fmt=self.policy.loss,
            order=self.policy.order,
            eps=self.config.stablemax_eps,
            elementary=self.policy.elementary,
            temperature=self.config.temperature,
            label_smoothing=self.config.label_smoothing,
        )
        dz = loss_backward(lcache, 1.0 / y.shape[0])
        attention = mcache["attn"] if isinstance(mcache, dict) else None
        return _Eval(z, loss, dz, lcache, mcache if with_grads else None, attention)

    def gradients(self, ev: _Eval, rows=None) -> dict:
        """Parameter gradients from an evaluation (applying the Fig. 8 intervention)."""
        dz = ev.dz
        c = self.config
        if c.zero_target_grad_from is not None and self.step >= c.zero_target_grad_from:
            dz = put_at(dz.copy(), ev.cache.labels, 0.0)
        if c.zero_sum_grad_from is not None and self.step >= c.zero_sum_grad_from:
            dz = zero_sum_part(dz)
        plan = self.plan
        if rows is not None and plan is not None:
            plan = self._plan(self._x_host["train"][rows])
        with stochastic_scope(c.seed, self.step, "backward"):
            return self.net.backward(dz, ev.model_cache, self.model, self.policy, plan)

    def advance(self, *, log: bool | None = None, final: bool = False, inspect=None):
        """Do one step: evaluate at ``θ_t``, log if due, and apply the update (unless final).

        Parameters
        ----------
        log : bool, optional
            Force logging on or off (default: every ``log_every`` steps and the final step).
        final : bool
            Evaluate and log without updating (the end of the run).
        inspect : callable, optional
            ``inspect(run, ev, grads)`` is called after the evaluation at ``θ_t`` and before
            the update, while ``run.params`` still holds ``θ_t`` (``ev`` holds the training
            batch's logits, losses, logit gradient and caches). Drivers audit here.

        Raises
        ------
        NonFiniteError
            When the training loss or a parameter is NaN/inf; the step's metrics are logged
            first, so nothing computed is lost.
        """
        with workspace.using(self.workspace), parallel.using(self.elementwise_threads):
            self._advance(log, final, inspect)

    def _advance(self, log, final, inspect):
        c = self.config
        t = self.step
        if log is None:
            log = t % c.log_every == 0 or final
        rows = None
        if c.batch_size is not None and c.batch_size < self.y_train.shape[0]:
            rows = np.sort(
                self.batch_rng.choice(self.y_train.shape[0], c.batch_size, replace=False)
            )
        ev = self.evaluate("train", with_grads=True, rows=rows, train=True)
        grads = self.gradients(ev, rows)
        if log:
            # Metrics describe θ_t: without dropout (a separate pass when the training pass
            # dropped units) and on the whole training split. These occasional passes (other
            # shapes) allocate as usual, and the kept arrays are let go first, so that a
            # logging step's peak memory is what it was without a workspace.
            self.workspace.clear()
            with workspace.using(None):
                full = ev if rows is None and not self.dropout_active else self.evaluate("train")
                self._log_split("train", full)
                self._log_split("test", self.evaluate("test"))
                self._log_params(grads)
        if inspect is not None:
            inspect(self, ev, grads)
        if not _all_finite(ev.loss):
            self.log.flush()
            raise NonFiniteError(self.name, t, "the training loss")
        if final:
            self.log.flush()
            return
        before = {k: v.copy() for k, v in self.params.items()} if log else None
        with stochastic_scope(c.seed, t, "update"):
            self.optimizer.step(self.params, grads, self.opt_state)
        self.step += 1
        if log:
            self._log_update(before)
        self.log.flush()
        for k, v in self.params.items():
            if not _all_finite(v):
                raise NonFiniteError(self.name, self.step, f"parameter {k}")

    # --- metrics -------------------------------------------------------------------------

    def collapse(self, ev: _Eval) -> np.ndarray:
        """Per-row Softmax Collapse flags of an evaluation, in the loss format and order."""
        if self.config.loss == "softmax":
            return ev.cache.normaliser == 1
        kind = "stablemax" if self.config.loss == "stablemax" else "softmax"
        return collapse_mask(
            ev.logits,
            self.policy.loss,
            kind=kind,
            order=self.policy.order,
            eps=self.config.stablemax_eps,
            elementary=self.policy.elementary,
            temperature=self.config.temperature,
        )

    def _log_split(self, split: str, ev: _Eval) -> None:
        """Metrics of one split, reduced on the device; only scalars cross to the host."""
        t, add = self.step, self.log.add
        xp = namespace(ev.logits)
        y = ev.cache.labels
        n = y.shape[0]
        add(t, self.name, split, "loss", float(xp.mean(xp.astype(ev.loss, xp.float64))))
        add(t, self.name, split, "accuracy", M.accuracy(ev.logits, y))
        add(t, self.name, split, "sc_fraction", _count(self.collapse(ev)) / n)
        add(t, self.name, split, "zero_loss_fraction", _count(ev.loss == 0) / n)
        add(t, self.name, split, "zero_target_grad_fraction", _count(take_at(ev.dz, y) == 0) / n)
        # Σ_k ∂L/∂z_k is 0 exactly for the cross-entropies; once a target gradient is absorbed
        # it is not (the bias "Grokking or Glitching?" blames for the norm growth): the mean
        # |row sum| of the computed logit gradient, summed in float64.
        dz64 = xp.astype(ev.dz, xp.float64)
        row_sums = xp.sum(dz64, axis=1)
        add(t, self.name, split, "zero_sum_violation", float(xp.mean(xp.abs(row_sums))))
        z64 = xp.astype(ev.logits, xp.float64)
        # The gradient's radial part seen from the logits: ⟨Z, ∂L/∂Z⟩, which is ⟨θ, ∇_θ L⟩ / L
        # for a bias-free ReLU MLP of L layers (homogeneous of degree L: Euler's identity), and
        # the violation's share of it: each row's gradient is its zero-sum part plus its mean
        # (s_i / C)·1, whose pairing with z_i is s_i · mean_k z_ik (0 in exact arithmetic).
        add(t, self.name, split, "radial_grad", float(xp.sum(z64 * dz64)))
        violation = xp.sum(xp.mean(z64, axis=1) * row_sums)
        add(t, self.name, split, "radial_grad_violation", float(violation))
        add(t, self.name, split, "logit_norm", float(xp.mean(xp.sqrt(xp.sum(z64 * z64, axis=1)))))
        gaps = to_numpy(M.logit_gaps(ev.logits, y))  # the median is not an array-API function
        add(t, self.name, split, "logit_gap_median", float(np.median(gaps)))
        add(t, self.name, split, "logit_gap_max", float(np.max(gaps)))
        if ev.attention is not None:
            flags = transformer.attention_collapse(ev.attention, self.policy)
            add(t, self.name, split, "attention_sc_fraction", _count(flags) / flags.size)
            for h in range(flags.shape[1]):
                frac = _count(flags[:, h]) / n
                add(t, self.name, split, "attention_sc_fraction", frac, f"head{h}")

    def _log_params(self, grads: dict) -> None:
        t, add = self.step, self.log.add
        wn, gn, cos = M.param_norms_and_cosines(self.params, grads, sign=-1.0)
        for k, v in wn.items():
            add(t, self.name, "train", "weight_norm", v, k)
        for k, v in gn.items():
            add(t, self.name, "train", "grad_norm", v, k)
        for k, v in cos.items():
            add(t, self.name, "train", "nlm_cos_grad", v, k)

    def _log_update(self, before: dict) -> None:
        t, add = self.step - 1, self.log.add
        xp = namespace(*self.params.values())
        delta = {
            k: xp.astype(self.params[k], xp.float64) - xp.astype(before[k], xp.float64)
            for k in before
        }
        _, un, cos = M.param_norms_and_cosines(before, delta)
        for k, v in cos.items():
            add(t, self.name, "train", "nlm_cos_update", v, k)
        for k, v in un.items():
            add(t, self.name, "train", "update_norm", v, k)
        intended = getattr(self.opt_state, "last_update", None)
        if intended:
            total = absorbed = 0
            for k in before:
                want = intended[k] != 0
                lost = want & (self.params[k] == before[k])
                add(
                    t,
                    self.name,
                    "train",
                    "absorbed_update_fraction",
                    _count(lost) / max(_count(want), 1),
                    k,
                )
                total += _count(want)
                absorbed += _count(lost)
            add(
                t,
                self.name,
                "train",
                "absorbed_update_fraction",
                absorbed / max(total, 1),
                "global",
            )


def zero_sum_part(dz):
    """Each row of a logit gradient minus its mean: ``dz_ik − (1/C) Σ_j dz_ij``, (N, C), in
    float64 (longdouble for longdouble input), for the backward pass to round once to the
    gradient format.

    The cross-entropies' exact gradient sums to 0 over the classes; the computed one does not
    once a target gradient is absorbed (``zero_sum_violation``). This is the part that does,
    the nearest such gradient (the orthogonal projection of each row): training on it removes
    the violation and keeps everything else (``zero_sum_grad_from``).
    """
    xp = namespace(dz)
    if not (isinstance(dz.dtype, np.dtype) and dz.dtype == np.longdouble):
        dz = xp.astype(dz, xp.float64)
    return dz - xp.mean(dz, axis=1, keepdims=True)


def _count(mask) -> int:
    """Number of true entries, as a host integer."""
    xp = namespace(mask)
    return int(xp.sum(xp.astype(mask, xp.int64)))


def _all_finite(a) -> bool:
    xp = namespace(a)
    return bool(xp.all(xp.isfinite(a)))


def make_dataset(config: TrainConfig) -> Dataset:
    """The dataset a config names (modular arithmetic, sparse parity or digits)."""
    c = config
    if c.task == "digits":
        return get_dataset("digits", train_fraction=c.train_fraction, seed=c.seed)
    if c.task == "parity":
        return get_dataset(
            "parity",
            n_bits=c.parity_bits,
            k=c.parity_k,
            n_samples=c.parity_samples,
            train_fraction=c.train_fraction,
            seed=c.seed,
        )
    return get_dataset(
        c.task,
        p=c.p,
        train_fraction=c.train_fraction,
        seed=c.seed,
        encoding=c.encoding,
        residue_start=c.residue_start,
    )


#: The metrics whose rows :func:`summarize` reads (a :class:`MetricLog` ``keep`` must hold
#: them); every other metric it takes from :meth:`MetricLog.latest`.
SUMMARY_SERIES = ("accuracy", "sc_fraction")


def summarize(log: MetricLog, run: str, *, grok_threshold: float = 0.9) -> dict:
    """Headline numbers of a run from its metric log (which must keep the rows of
    :data:`SUMMARY_SERIES`).

    Returns
    -------
    dict
        ``sc_onset_step`` (first logged step with training SC fraction > 0), ``sc50_step``
        (first with >= 0.5), ``train100_step`` (first with train accuracy 1), ``grok_step``
        (first with test accuracy >= ``grok_threshold``), each None if never; ``final`` with
        the last logged train/test accuracy, SC and zero-loss fractions and the global NLM
        cosine.
    """

    def first(metric, split, pred, layer=""):
        s, v = log.series(metric, run=run, split=split, layer=layer)
        hit = np.flatnonzero(pred(v))
        return int(s[hit[0]]) if hit.size else None

    final = {
        "step": int(log.series("accuracy", run=run, split="train")[0][-1])
        if log.series("accuracy", run=run, split="train")[0].size
        else None,
        "train_acc": log.latest("accuracy", run=run, split="train"),
        "test_acc": log.latest("accuracy", run=run, split="test"),
        "train_loss": log.latest("loss", run=run, split="train"),
        "sc_fraction": log.latest("sc_fraction", run=run, split="train"),
        "zero_loss_fraction": log.latest("zero_loss_fraction", run=run, split="train"),
        "nlm_cosine": log.latest("nlm_cos_grad", run=run, split="train", layer="global"),
        "weight_norm": log.latest("weight_norm", run=run, split="train", layer="global"),
    }
    return {
        "sc_onset_step": first("sc_fraction", "train", lambda v: v > 0),
        "sc50_step": first("sc_fraction", "train", lambda v: v >= 0.5),
        "train100_step": first("accuracy", "train", lambda v: v >= 1.0),
        "grok_step": first("accuracy", "test", lambda v: v >= grok_threshold),
        "final": {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in final.items()
        },
    }


def train(
    config: TrainConfig,
    *,
    name: str = "run",
    log: MetricLog | None = None,
    progress=None,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    stop=None,
    extra=None,
) -> Run:
    """Run ``config`` to completion and return the finished :class:`Run`.

    Parameters
    ----------
    config : TrainConfig
    name : str
        The run's label in the metric rows.
    log : MetricLog, optional
    progress : callable, optional
        Receives the step number after each step.
    checkpoint_dir : path, optional
        Where checkpoints go (every ``checkpoint_every`` steps, and at the end).
    resume : bool
        Continue from the checkpoint in ``checkpoint_dir`` (its configuration must equal
        ``config``, except that ``config.steps`` may be larger: a finished run is then
        continued to the new length); the result is bit-identical to an uninterrupted run of
        ``config``.
    stop : numstab.run.driver.StopFlag, optional
        Checked between steps; when set, a checkpoint is written and
        :class:`numstab.run.driver.Stopped` raised.
    extra : callable, optional
        ``extra() -> dict`` of caller state saved in each checkpoint (see
        :func:`numstab.run.driver.drive`).

    Raises
    ------
    NonFiniteError
        After logging, if the run diverges.
    numstab.run.checkpoint.CheckpointError
        ``resume`` with a missing, corrupted or mismatched checkpoint (nothing written).
    numstab.run.driver.OutputError
        The metrics CSV or a checkpoint could not be written (disk full); the last
        checkpoint and every row logged before are intact.
    """
    run = Run(config, name=name, log=log or MetricLog())
    if resume:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir")
        resumed = restore_runs(checkpoint_dir, {name: run}, allow_more_steps=True)
        rows = resumed.rows
        finished = resumed.extra.get("finished")
        if finished and run.step < config.steps:
            # Continuing a finished run: its last rows are the final evaluation at run.step,
            # which an uninterrupted longer run logs as an ordinary step (with the update's
            # metrics): drop them and let the step run again.
            rows = [r for r in rows if r[0] < run.step]
        try:  # the CSV is rebuilt only now, once every check has passed
            run.log.reset(rows)
        except OSError as exc:
            raise OutputError(exc, run.step, before_training=True) from exc
        if finished and run.step >= config.steps:
            return run
    drive(
        {name: run},
        run.log,
        steps=config.steps,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        progress=progress,
        extra=extra,
        stop=stop,
    )
    return run
