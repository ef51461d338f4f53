"""The monitor's measurements: pure functions over host arrays, shared by PyTorch and JAX.

A *metrics dict* maps a metric name to a float (a batch quantity) or to a dict of
``{tensor name: float, ..., "global": float}`` (a per-tensor quantity); :func:`metric_rows`
flattens it to the ``(metric, layer, value)`` triples of ``metrics.csv``. The names are those
of :mod:`numstab.run` (``sc_fraction``, ``nlm_cos_grad``, ...), so a monitored run plots like a
numstab run.

The loss metrics are the verdicts of numstab's own loss (:func:`numstab.losses.row_verdicts`:
those of ``loss_forward`` and its backward, bit for bit) in the declared format and order,
evaluated only on the rows that can collapse: a row is in the *collapse window* when its
second-largest term ``t2`` (``exp(z2 - z1)``, or StableMax's ``s(z2)/s(z1)``) is at most
``4 · 2**-p`` (the threshold on ``z2`` is computed from the row maximum in float64 and rounded
up to the logits' dtype, which can only add rows). Outside it the row is exactly not
collapsed: every partial sum of positive terms is at least each term, rounding is monotone,
and ``RN(1 + t) > 1`` once ``t > 2**-p``, so a normaliser of exactly 1 needs every computed
term ``<= 2**-p``. The window works on the logits rounded to the format (as the loss does);
the factor 4 covers the rounding of ``z - max z`` and of the terms (under 4 % in bfloat16).
Such a row also has a non-zero loss and target gradient. Late in training, when every row is
in the window, most rows that do not collapse are proved so from a few of their terms, carried
from step to step (:class:`TopEntries`, :func:`numstab.losses.softmax.open_rows`), and skip
the exact evaluation.
"""

from __future__ import annotations

import math

import numpy as np

from numstab import kernels
from numstab.backend import take_at
from numstab.losses import row_verdicts, softmax, stablemax_s
from numstab.metrics import param_norms_and_cosines
from numstab.precision import Format, format_of, quantize

__all__ = [
    "TopEntries",
    "batch_metrics",
    "metric_rows",
    "param_metrics",
    "update_metrics",
    "window_below",
    "window_cut",
]

#: A row with ``t2 > WINDOW · 2**-p`` cannot collapse (module docstring).
WINDOW = 4.0


def _in_format(z: np.ndarray, fmt: Format) -> np.ndarray:
    """The logits rounded to ``fmt`` (as the loss rounds them first), in a carrier NumPy
    computes fast: bfloat16/float16 widened exactly to float32."""
    own = format_of(z.dtype)  # numstab's, not np.finfo: ml_dtypes < 0.5.1 has no finfo there
    if z.dtype == np.longdouble or own is None or own.precision > fmt.precision:
        with np.errstate(over="ignore"):
            z = quantize(z, fmt)
    return z if z.dtype in (np.float32, np.float64, np.longdouble) else z.astype(np.float32)


def window_below(fmt: Format) -> float:
    """The softmax's collapse window relative to the row maximum: ``log τ``, ``τ = WINDOW ·
    2**-p`` (``exp(z2 - z1) <= τ`` where ``z2 <= z1 + log τ``; float32: -15.249)."""
    return math.log(WINDOW * fmt.unit_roundoff)


def window_cut(z1, fmt: Format, kind: str, eps: float, dtype) -> np.ndarray:
    """The collapse window's bound per row (shape (N,), ``dtype``): the largest ``z2`` whose
    term is ``<= WINDOW · 2**-p`` for the row maximum ``z1`` (N,) (``z1 +``
    :func:`window_below`, or StableMax's ``s⁻¹(τ · s(z1))``), computed in float64 and rounded
    up to ``dtype``. A row with no entry above it other than its maximum is in the window;
    NaN where ``z1`` is."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if kind == "stablemax":
            tau = WINDOW * fmt.unit_roundoff
            v = tau * stablemax_s(z1.astype(np.float64), "float64", eps=eps)[0]
            # s⁻¹(v): v - 1 where v >= 1, else 1 + eps - 1/v (the largest x < 0 with s(x) <= v)
            limit = np.where(v >= 1, v - 1.0, 1.0 + eps - 1.0 / v)
        else:
            limit = z1.astype(np.float64) + window_below(fmt)
        cut = limit.astype(dtype)
        return np.where(cut < limit, np.nextafter(cut, dtype.type(np.inf)), cut)  # round up


def collapse_window(z: np.ndarray, fmt: Format, kind: str, eps: float, z1=None) -> np.ndarray:
    """Rows whose second-largest term is ``<= WINDOW · 2**-p`` (bool, shape (N,)).

    ``z``: (N, C) logits in a NumPy float carrier. Computed without sorting: the row is in
    the window when no entry other than its maximum exceeds :func:`window_cut`; a tie at the
    maximum (term 1) keeps a row out. Rows with NaN logits are included (numstab's loss then
    decides them). ``z1``: the row maxima, if already known.
    """
    z1 = z.max(axis=1) if z1 is None else z1
    cut = window_cut(z1, fmt, kind, eps, z.dtype)
    with np.errstate(invalid="ignore"):
        above = z > cut[:, None]
    return above.view(np.uint8).sum(axis=1, dtype=np.int32) <= 1  # faster than count_nonzero


class TopEntries:
    """The logits whose terms :func:`batch_metrics` evaluates first, carried across steps.

    In full-batch training the same rows come back every step and their largest logits move
    slowly: the entries :func:`numstab.losses.softmax.top_entries` finds in one step prove
    nearly every row that does not collapse in the next ones
    (:func:`numstab.losses.softmax.open_rows`; any entries give the same metrics). They are
    found again every ``every`` calls, and forgotten when the labels or the logits' shape
    differ from the previous call's (another batch: then nothing is carried).
    """

    def __init__(self, every: int = 10):
        self.every = every
        self.keep = self.labels = self.shape = None
        self.age = 0

    def __call__(self, z, m, labels, fmt: Format):
        """Flat indices into ``z`` (N, C) (row maxima ``m`` (N,)), or None for a new batch."""
        same = self.shape == z.shape and np.array_equal(self.labels, labels)
        self.labels, self.shape = np.array(labels, copy=True), z.shape
        if not same:
            self.keep = None
        elif self.keep is None or self.age >= self.every:
            self.keep, self.age = softmax.top_entries(z, m[:, None], fmt), 0
        self.age += 1
        return self.keep


def batch_metrics(
    z, labels, fmt: Format, *, kind="softmax", order="pairwise", eps=0.0, screen=True, top=None
) -> dict:
    """Collapse metrics of one batch of logits, in the loss format ``fmt`` and ``order``.

    Parameters
    ----------
    z : ndarray, shape (N, C)
        Logits (any NumPy float carrier, ml_dtypes bfloat16 included).
    labels : int ndarray, shape (N,)
    fmt : Format
        The format the loss is computed in.
    kind : {"softmax", "stablemax"}
    screen : bool
        Evaluate only the rows in the collapse window (True) or every row (False: saves the
        window's pass when nearly every row is in it, late in training). The metrics are the
        same either way, except ``sc_window_fraction``.
    top : TopEntries, optional
        Softmax, every row evaluated: the entries whose terms are evaluated first (the same
        metrics with or without).

    Returns
    -------
    dict
        ``accuracy``; ``sc_fraction`` (normaliser exactly 1); ``zero_loss_fraction``;
        ``zero_target_grad_fraction`` (``∂ℓ_i/∂z_iy == 0`` exactly); softmax only,
        ``off_target_mass``: the batch mean of ``Σ_k ∂ℓ_i/∂z_ik`` over the collapsed rows
        (per-sample gradient, summed in float64), 0 in exact arithmetic and about
        ``Σ_{k≠y} p_k`` in a collapsed row; every other row counts 0 (its sum is rounding
        residual, at most ``4u`` in magnitude: C entries totalling at most 2 in magnitude,
        each rounded once); StableMax's gradient does not sum to 0, so it has no such metric;
        ``sc_window_fraction``: rows evaluated in the format. Fractions of an empty batch
        are NaN.

    Raises
    ------
    ValueError
        Logits not 2-D with at least one class, labels not of shape (N,) or out of range.
    """
    z = np.asarray(z)
    y = np.asarray(labels)
    if z.ndim != 2 or z.shape[1] == 0 or y.shape != (z.shape[0],):
        raise ValueError(
            f"logits must be (N, C) with C >= 1 and labels (N,), got shapes {z.shape} and {y.shape}"
        )
    n = y.shape[0]
    if n and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got [{y.min()}, {y.max()}]")
    z = _in_format(z, fmt)  # the window must see the values the loss computes with
    if kind == "softmax" and softmax.fuses(z, fmt, order):
        # the fused kernel finds the row maxima, the accuracy's hits and the window's rows
        # itself: one pass over the logits in all, no copy of rows
        rows = softmax.screened_verdicts(z, y, fmt, window_below(fmt) if screen else math.inf)
        hits, cand = int(np.count_nonzero(rows.hit)), rows.evaluated
        verdicts = (rows.collapsed, rows.zero_loss, rows.zero_target_grad, rows.row_sum)
        k = int(np.count_nonzero(cand))
    else:
        first = z.argmax(axis=1)  # the first maximum; the first NaN in a row with NaN
        z1 = take_at(z, first)
        # numstab.metrics.accuracy from this argmax (one pass over the logits, not two)
        hits = int(np.count_nonzero((first == y) & ~np.isnan(z1)))
        cand = collapse_window(z, fmt, kind, eps, z1) if screen else None
        k = int(np.count_nonzero(cand)) if screen else n
        verdicts = None
        if k:
            zc, yc, mc = (z, y, z1) if k == n else (z[cand], y[cand], z1[cand])  # late: all
            # the carried entries spare the exact pass most open rows
            use_top = top is not None and k == n and kind == "softmax"
            verdicts = row_verdicts(
                zc, yc, fmt, kind=kind, order=order, eps=eps, row_max=mc,
                keep=top(z, z1, y, fmt) if use_top else None,
            )  # fmt: skip
    out = {"accuracy": hits / n if n else math.nan}
    sc = zero_loss = zero_grad = 0
    mass = 0.0
    if verdicts is not None:
        collapsed, zl, zg, row_sum = verdicts
        sc, zero_loss, zero_grad = (int(np.count_nonzero(v)) for v in (collapsed, zl, zg))
        mass = float(np.sum(row_sum[collapsed]))  # rows that did not collapse: residual only
    frac = (lambda m: m / n) if n else (lambda m: math.nan)
    out.update(
        sc_fraction=frac(sc),
        zero_loss_fraction=frac(zero_loss),
        zero_target_grad_fraction=frac(zero_grad),
        sc_window_fraction=frac(k),
    )
    if kind == "softmax":
        out["off_target_mass"] = frac(mass)
    return out


def param_metrics(params: dict, grads: dict, *, order: str = "lanes8") -> dict:
    """``weight_norm``, ``grad_norm`` and ``nlm_cos_grad = cos(θ, −∇L)``, per tensor and
    ``global`` (:func:`numstab.metrics.param_norms_and_cosines`: three dot products per
    tensor, summed in ``order``, :data:`numstab.metrics.DOT_ORDERS`). ``params``, ``grads``:
    name -> host array, same keys."""
    wn, gn, cos = param_norms_and_cosines(params, grads, sign=-1.0, order=order)
    return {"weight_norm": wn, "grad_norm": gn, "nlm_cos_grad": cos}


def update_metrics(before: dict, after: dict, nonzero: dict) -> dict:
    """``absorbed_update_fraction``, per tensor and ``global``: among the entries whose update
    was due (the non-zero entries of ``nonzero``: bools, or e.g. the optimizer's first
    moment), the fraction left unchanged (``θ + Δθ == θ``); 0 when no update was due."""
    absorbed, due = {}, {}
    for k in before:
        want, b, a = np.asarray(nonzero[k]), np.asarray(before[k]), after[k]
        compiled = want.dtype in (np.bool_, b.dtype) and want.flags.c_contiguous
        if compiled and kernels.applies(b, a):  # one pass, no temporaries
            due[k], absorbed[k] = kernels.absorbed_count(want.reshape(-1), b.reshape(-1),
                                                         a.reshape(-1))  # fmt: skip
        else:
            want = want != 0
            due[k] = int(np.count_nonzero(want))
            absorbed[k] = int(np.count_nonzero(want & (a == b)))
    frac = {k: absorbed[k] / max(due[k], 1) for k in before}
    frac["global"] = sum(absorbed.values()) / max(sum(due.values()), 1)
    return {"absorbed_update_fraction": frac}


def metric_rows(metrics: dict):
    """``(metric, layer, value)`` triples of a metrics dict (layer ``""`` for batch values)."""
    for name, v in metrics.items():
        if isinstance(v, dict):
            for layer, x in v.items():
                yield name, layer, float(x)
        else:
            yield name, "", float(v)
