"""Softmax cross-entropy as frameworks compute it (PyTorch's ``log_softmax`` and its backward).

Forward, with ``m = max_k z_k`` and every step one rounding ``RN`` to the loss format::

    d = RN(z - m)       e = RN(exp d)       S = Σ e (ordered)       lse = RN(log S)
    lsm = RN(d - lse)   p = RN(exp lsm)     loss = -lsm_y

Backward (``dl`` the upstream per-sample gradient): ``g_k = RN(p_k·dl)`` off target and
``g_y = RN(dl·(p_y - 1))`` -- one rounding of the exact value, not ``RN(RN(p_y·dl) - dl)``,
which halves the gradient of a row about to collapse.

When the tail of ``S`` is absorbed, ``S == 1`` exactly, the loss is exactly 0 and the target
gradient exactly 0: Softmax Collapse.

Label smoothing ``ε`` (PyTorch's ``label_smoothing``: target ``q_k = ε/C + (1 - ε)·δ_ky``),
with ``a = RN(ε/C)``, ``b = RN(RN(1 - ε) + a)`` (the target's weight)::

    loss = RN(RN(RN(1 - ε)·(-lsm_y)) + RN(a·Σ_k(-lsm_k)))       (Σ ordered)
    g_k = RN(p_k·dl - RN(a·dl)),   g_y = RN(p_y·dl - RN(b·dl))   (one rounding each)

so a collapsed row (``p = onehot(y)``) keeps the gradient ``-(ε/C)·dl`` off target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from numstab import kernels, parallel, workspace
from numstab.backend import native_sum, put_at, take_at
from numstab.elementary import softmax32_consts
from numstab.losses.rounding import Rounding, is_recording

__all__ = [
    "ScreenedRows",
    "backward",
    "backward_smoothed",
    "collapse_terms",
    "forward",
    "fuses",
    "open_rows",
    "screened_verdicts",
    "smoothed",
    "terms",
    "top_entries",
    "verdicts",
]


def terms(z, r, m=None):
    """``d = RN(z - max z)`` and ``e = RN(exp d)``, shape of ``z`` (N, C); ``m``: the row
    maxima (N, 1), if known."""
    m = r.xp.max(z, axis=-1, keepdims=True) if m is None else m
    d = r.sub(z, m)
    return d, r.exp(d)


def forward(z, labels, r, eps):
    """``(loss (N,), S (N,), p (N, C), state (lsm,))``; ``eps`` is not used."""
    d, e = terms(z, r)
    total = r.sum(e)
    lsm = r.sub(d, r.log(total)[:, None])
    probs = r.exp(lsm)
    loss = 0.0 - take_at(lsm, labels)  # exact; 0 - 0 is +0, where -(0) would print -0
    return loss, total, probs, (lsm,)


def _weights(ls: float, like, r):
    """``(RN(1 - ε), a, b)`` of label smoothing ``ε`` (a value of the format) as 0-d arrays
    of ``like``'s dtype, for ``like`` of shape (N, C)."""
    xp = r.xp
    one, eps = (xp.asarray(v, dtype=like.dtype) for v in (1.0, ls))
    keep = r.sub(one, eps)
    a = r.div(eps, xp.asarray(float(like.shape[1]), dtype=like.dtype))
    return keep, a, r.add(keep, a)


def smoothed(loss, state, r, ls: float):
    """The label-smoothed loss (N,) from :func:`forward`'s loss and state, ``ε = ls``."""
    (lsm,) = state
    keep, a, _ = _weights(ls, lsm, r)
    return r.add(r.mul(loss, keep), r.mul(r.sum(0.0 - lsm), a))


def backward_smoothed(cache, dl, r):
    """Logit gradient ``(N, C)`` of :func:`smoothed` (``ε = cache.label_smoothing``)."""
    _, a, b = _weights(cache.label_smoothing, cache.probs, r)
    xp = r.xp
    c = xp.asarray(xp.broadcast_to(r.mul(dl, a), cache.probs.shape), copy=True)
    c = put_at(c, cache.labels, r.mul(dl, b)[:, 0])
    return r.mul_sub(cache.probs, dl, c)


def backward(cache, dl, r):
    """Logit gradient ``(N, C)`` from the cache and ``dl`` of shape (N, 1)."""
    y = cache.labels
    g = r.mul(cache.probs, dl)
    return put_at(g, y, r.dl_p_minus_one(take_at(cache.probs, y), dl[:, 0]))


def collapse_terms(z, r, eps):
    """The terms whose ordered sum is 1 exactly in a collapsed row: ``e``."""
    return terms(z, r)[1]


def verdicts(z, labels, r, row_max=None, keep=None):
    """Per row, the collapse verdicts of :func:`forward` and :func:`backward` (``dl = 1``)
    without the second ``(N, C)`` exponential and the backward.

    The target column is computed as the loss computes it (``lsm_y = RN(d_y - RN(log S))``,
    ``p_y = RN(exp lsm_y)``, ``g_y = RN(p_y - 1)``), so ``zero_loss`` and ``zero_target_grad``
    are exact in every row. The gradient's row sum is formed only where ``S == 1``: there
    ``RN(log 1) = 0``, hence ``lsm = d`` and ``p = e`` term by term, and the gradient is ``e``
    with ``g_y`` at the target (summed in float64); NaN elsewhere.

    ``row_max``: ``max z`` per row (N,), if known. ``keep``: flat indices of entries of ``z``
    (e.g. :func:`top_entries` of an earlier batch); the rows that :func:`open_rows` proves not
    collapsed from those entries' terms stop there (where :func:`screens` holds).

    Returns
    -------
    collapsed, zero_loss, zero_target_grad : bool arrays (N,)
    row_sum : float64 array (N,)
    """
    if fuses(z, r.fmt, r.order, r.elementary):
        return _verdicts_fused(z, labels, r)
    m = None if row_max is None else row_max[:, None]
    if keep is None or not screens(z, r):
        return _verdicts(z, labels, r, m)
    m = r.xp.max(z, axis=-1, keepdims=True) if m is None else m
    rows = np.flatnonzero(~open_rows(z, m[:, 0], r, keep))
    if rows.size == z.shape[0]:
        return _verdicts(z, labels, r, m)
    n = z.shape[0]
    out = (np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), np.full(n, np.nan))
    for full, part in zip(out, _verdicts(z[rows], labels[rows], r, m[rows]), strict=True):
        full[rows] = part
    return out


def _verdicts(z, labels, r, m):
    """:func:`verdicts` of every row (``m``: the row maxima (N, 1) or None)."""
    xp = r.xp
    d, e = terms(z, r, m)
    total = r.sum(e)
    collapsed = total == 1
    lsm_y = r.sub(take_at(d, labels), r.log(total))
    p_y = r.exp(lsm_y)
    # g_y = RN(p_y - 1) is 0 exactly where p_y == 1 (elsewhere |p_y - 1| >= 2**-p): formed
    # only where the row sum needs it, in collapsed rows with p_y < 1; it replaces e_y in e
    # (this function's own array), whose rows are then summed in float64
    g_y = xp.zeros(p_y.shape, dtype=p_y.dtype)
    due = collapsed & (p_y != 1)
    if xp.any(due):
        g_y[due] = r.dl_p_minus_one(p_y[due], xp.ones_like(p_y[due]))
    e64 = xp.astype(put_at(e, labels, g_y), xp.float64)
    sums = native_sum(e64, "pairwise")  # NumPy's tree over the whole row, on every release
    if sums is None:  # other backends: their own reduction
        sums = xp.sum(e64, axis=1)
    row_sum = xp.full(collapsed.shape, xp.nan, dtype=xp.float64)
    row_sum[collapsed] = sums[collapsed]
    return collapsed, lsm_y == 0, p_y == 1, row_sum


def fuses(z, fmt, order: str, elementary: str = "correct") -> bool:
    """Whether :func:`verdicts` takes the fused float32 kernel
    (:func:`numstab.kernels.softmax_rows32`, every row in one pass; ``keep`` is then not
    used): float32 logits (NumPy, 2-D) in the float32 format (nearest, gradual underflow),
    ``pairwise`` order, correctly rounded ``exp``, the kernels' numba path, no
    :func:`~numstab.losses.rounding.recording` block."""
    return (
        isinstance(z, np.ndarray)
        and z.dtype == np.float32
        and z.ndim == 2
        and z.shape[1] > 0
        and fmt.name == "float32"
        and fmt.rounding == "nearest"
        and fmt.subnormals == "gradual"
        and order == "pairwise"
        and elementary == "correct"
        and kernels.backend() == "numba"
        and not is_recording()
    )


#: Rows of the fused kernel per block of :func:`numstab.parallel.map_blocks` (at least two
#: blocks per thread before a batch is split: 2 threads from 1 024 rows).
_ROWS_PER_BLOCK = 256


def _verdicts_fused(z, labels, r):
    """:func:`_verdicts` with the row pass in one kernel (:func:`_fused`, every row)."""
    s = _fused(z, labels, r, math.inf)
    return s.collapsed, s.zero_loss, s.zero_target_grad, s.row_sum


@dataclass(frozen=True)
class ScreenedRows:
    """:func:`screened_verdicts`' per-row results, each of shape (N,).

    ``collapsed``, ``zero_loss``, ``zero_target_grad`` (bool) and ``row_sum`` (float64) as
    :func:`verdicts`, for the rows ``evaluated`` (bool); a row not evaluated gets False,
    False, False and NaN. ``hit`` (bool): the row's first maximum is at its label and the
    row has no NaN (``numpy.argmax(z, axis=1) == labels``: the accuracy's hits).
    """

    collapsed: np.ndarray
    zero_loss: np.ndarray
    zero_target_grad: np.ndarray
    row_sum: np.ndarray
    evaluated: np.ndarray
    hit: np.ndarray


def screened_verdicts(z, labels, fmt, below=math.inf) -> ScreenedRows:
    """:func:`verdicts` of the rows of ``z`` that have at most one entry above
    ``max z + below``, and the accuracy's hits, by the fused kernel in one pass over the
    logits (no other pass, no copy of the rows).

    For a caller that knows a bound: e.g. :func:`numstab.monitor.core.window_below`, above
    which a row that can collapse has only its maximum. Requires :func:`fuses` of ``z``,
    ``fmt`` and ``pairwise`` order, and labels in ``[-C, C)``.

    Parameters
    ----------
    z : float32 ndarray, shape (N, C)
    labels : int ndarray, shape (N,)
    fmt : Format
        float32 (as :func:`fuses`).
    below : float
        Each row's cut is its maximum plus ``below``, computed in float64 and rounded up to
        float32 (NaN in a row with NaN, which is then evaluated); ``+inf`` (default): every
        row is evaluated.

    Returns
    -------
    ScreenedRows
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # as row_verdicts
        return _fused(z, labels, Rounding(fmt, "pairwise", "correct", np), below)


def _fused(z, labels, r, below) -> ScreenedRows:
    """The fused kernel's verdicts of the rows with at most one entry above ``max + below``
    (``+inf``: every row); the rows it leaves (a term its rounding tests did not decide, NaN)
    go through :func:`_verdicts`. Same results as :func:`_verdicts`."""
    n, c = z.shape
    y = np.asarray(labels, dtype=np.int64)
    low = int(y.min()) if n else 0
    if n and (int(y.max()) >= c or low < -c):  # the kernel does not check bounds
        raise IndexError("label out of range")
    if low < 0:
        y = np.where(y < 0, y + c, y)  # a negative label counts from the end, as take_at
    z = np.ascontiguousarray(z)
    hit, total, d_y, sums, left, evaluated = _fused_rows(z, y, float(below))
    collapsed = evaluated & (total == 1)  # the others' outputs were not written
    # lsm_y = RN(d_y - RN(log total)) and p_y = RN(exp lsm_y) (correctly rounded) are decided
    # without log and exp in a row the kernel kept (finite, d <= 0, so total >= 1): where
    # total > 1, RN(log total) >= RN(log(1 + 2**-23)) > 2**-24, so lsm_y < -2**-24 and
    # p_y < 1; where total == 1, lsm_y = d_y, and RN(exp d_y) == 1 exactly for
    # d_y >= -2**-25 (exp(-2**-25) lies above the midpoint 1 - 2**-25, exp of the next float32
    # below it under). Then p_y = e_y: the kernel's g_y is the row's.
    row_sum = np.where(collapsed, sums, np.nan)
    out = (collapsed, collapsed & (d_y == 0), collapsed & (d_y >= -(2.0**-25)), row_sum)
    if left.any():
        rows = np.flatnonzero(left)
        for full, part in zip(out, _verdicts(z[rows], y[rows], r, None), strict=True):
            full[rows] = part
    return ScreenedRows(*out, evaluated, hit)


def _fused_rows(z, y, below):
    """:func:`numstab.kernels.softmax_rows32` over ``z`` (N, C) float32, C-contiguous, in row
    blocks on the :mod:`numstab.parallel` threads in effect, or on its OpenMP team if one is
    set (each row's results depend on that row alone): ``(hits, total, d_y, row sums, rows
    left, rows evaluated)``."""
    n = z.shape[0]
    outs = (np.empty(n, bool), np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n),
            np.empty(n, bool), np.empty(n, bool))  # fmt: skip
    consts = softmax32_consts()

    def block(a, b):
        return kernels.softmax_rows32(z[a:b], y[a:b], below, *(o[a:b] for o in outs), consts)

    k, team = parallel.threads(), parallel.team()
    if team is not None and k > 1 and n >= 2 * _ROWS_PER_BLOCK:
        kernels.softmax_rows32_on(team, k, _ROWS_PER_BLOCK, z, y, below, outs, consts)
    else:
        parallel.map_blocks(block, n, _ROWS_PER_BLOCK)
    return outs


#: :func:`top_entries` keeps the entries whose term exceeds about ``2**-(p + TOP_BITS)``
#: (``p`` the format's precision): late in the paper's float32 training 8 % of the logits,
#: and their terms prove 99.5 % of the rows that do not collapse (docs/monitor.md).
TOP_BITS = 8


def screens(z, r) -> bool:
    """Whether :func:`open_rows` applies: NumPy arrays, correctly rounded ``exp`` and a format
    rounding to nearest with gradual underflow (its terms are then functions of their
    argument alone, the same in whatever array they are evaluated)."""
    f = r.fmt
    return (
        isinstance(z, np.ndarray)
        and r.elementary == "correct"
        and f.rounding == "nearest"
        and f.subnormals == "gradual"
    )


def top_entries(z, m, fmt):
    """Flat indices of the entries of ``z`` (N, C) above ``m - (p + TOP_BITS) log 2``
    (``m`` (N, 1) the row maxima): the terms :func:`open_rows` needs to prove most rows
    that do not collapse. Rows with NaN or infinite maxima give none."""
    with np.errstate(invalid="ignore", over="ignore"):
        cut = (m.astype(np.float64) - (fmt.precision + TOP_BITS) * math.log(2)).astype(z.dtype)
        return np.flatnonzero(z > cut)


def open_rows(z, m, r, keep):
    """Rows proved not collapsed (``S > 1``) from the terms of a few entries, shape (N,).

    ``z`` (N, C) logits in the format, ``m`` (N,) their row maxima, ``keep`` flat indices
    of entries (any subset: it only decides how many rows are proved). The kept entries'
    terms are evaluated as :func:`terms` does (``e = RN(exp RN(z - m))``), the others
    replaced by 0, and summed in the declared order: ``S_lo``. Every term is ``>= 0`` and
    every ordered sum is a fixed tree of roundings ``RN(a + b)``, each non-decreasing in ``a``
    and ``b`` (``sorted`` sorts first, and each order statistic is non-decreasing in every
    entry), so ``S_lo <= S``: a row with ``S_lo > 1`` has ``S > 1``. Such a row is not
    collapsed, and neither its loss nor its target gradient is 0: ``S >= 1 + 2**(1-p)``, so
    ``RN(log S) >= 2**(1-p) (1 - 2**-p)``, ``lsm_y <= -RN(log S)`` (``d_y <= 0``) and
    ``exp(lsm_y) < 1 - 2**(1-p) (1 - 2**-p) + 2**(1-2p)``, below ``1 - 2**(-p-1)``, the
    midpoint under 1: ``p_y < 1``, ``g_y = RN(p_y - 1) != 0``, ``lsm_y != 0``. A NaN term
    (NaN or infinite logits) makes ``S_lo`` NaN: not proved.
    """
    c = z.shape[1]
    lo = workspace.empty(z.shape, z.dtype)
    lo.fill(0)
    with np.errstate(invalid="ignore", over="ignore"):
        lo.reshape(-1)[keep] = r.exp(r.sub(z.reshape(-1)[keep], m[keep // c]))
        return r.sum(lo) > 1
