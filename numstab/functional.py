"""Forward/backward pairs in a declared format: linear, ReLU, gather, and the three losses.

Every function takes its format (or a :class:`~numstab.precision.PrecisionPolicy`) and returns
arrays in that format's carrier dtype (float32 for float16/bfloat16, whose every operation is
followed by one rounding). Forward functions return ``(out, cache)``; the matching backward
takes the upstream gradient and the cache.

Losses
------
``softmax``
    Cross-entropy as frameworks compute it: ``lsm = (z - m) - log Σ exp(z - m)`` with
    ``m = max z``, loss ``-lsm_y``, logit gradient ``(exp(lsm) - onehot) · dl`` (PyTorch's
    ``log_softmax`` backward). When the tail of ``Σ exp(z - m)`` is absorbed the sum is exactly
    1, the loss exactly 0 and the target gradient exactly 0: Softmax Collapse.
``stablemax``
    StableMax cross-entropy, ``s(x) = x + 1`` (x ≥ 0), ``1 / (1 - x + eps)`` (x < 0),
    loss ``-log(s_y / S)``, ``S = Σ s(z)``. ``eps`` defaults to 0 (the paper's definition);
    the authors' released code uses ``eps = 1e-30``, which in float32/float64 changes
    ``1 - x`` only when ``|1 - x| < 2**-p · 1e-30``, i.e. never for finite logits.
``softmax_stable``
    Absorption-free softmax cross-entropy, "what the math says": the max term is taken out of
    the sum, ``loss = (m - z_y) + log1p(s)`` with ``s = Σ_{k≠k*} exp(z_k - m)``, target
    gradient ``-s / (1 + s)`` when the target is the argmax (SciPy's ``logsumexp`` does the
    same). It never collapses while ``s`` is representable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from numstab.backend import array_module
from numstab.precision import Format, PrecisionPolicy, get_format, quantize
from numstab.summation import ordered_sum

__all__ = [
    "LOSS_KINDS",
    "REDUCTIONS",
    "GatherPlan",
    "LossCache",
    "collapse_mask",
    "gather_backward",
    "gather_forward",
    "gemm",
    "linear_backward",
    "linear_forward",
    "loss_backward",
    "loss_forward",
    "relu_backward",
    "relu_forward",
    "stablemax_s",
]

#: Loss kinds understood by :func:`loss_forward`.
LOSS_KINDS = ("softmax", "stablemax", "softmax_stable")
#: Reductions understood by :func:`loss_forward`.
REDUCTIONS = ("mean", "none")


def _check_choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(allowed)}")
    return value


# --- matrix products ----------------------------------------------------------------------


def gemm(a, b, policy: PrecisionPolicy):
    """``a @ b`` accumulated in ``policy.compute`` and rounded once to ``policy.storage``.

    This is the tensor-core model of a low-precision GEMM. It never calls NumPy's float16
    matmul (which has no BLAS path): 16-bit formats are carried in float32, multiplied by
    float32 BLAS, and rounded once.

    Parameters
    ----------
    a : ndarray, shape (m, k); b : ndarray, shape (k, n)
        Storage-format values in the storage carrier dtype.

    Returns
    -------
    ndarray, shape (m, n), storage carrier dtype
    """
    c = policy.compute.carrier
    out = a.astype(c, copy=False) @ b.astype(c, copy=False)
    return quantize(out, policy.storage)


def linear_forward(x, w, b, policy: PrecisionPolicy):
    """Affine layer ``y = x @ w (+ b)``.

    Parameters
    ----------
    x : ndarray, shape (N, n_in); w : ndarray, shape (n_in, n_out); b : ndarray (n_out,) or None

    Returns
    -------
    y : ndarray, shape (N, n_out), storage carrier dtype
        The product is rounded once to storage, then the bias is added (one more rounding).
    cache : tuple
    """
    y = gemm(x, w, policy)
    if b is not None:
        y = quantize(y + b, policy.storage)
    return y, (x, w, b is not None)


def linear_backward(dy, cache, policy: PrecisionPolicy, *, need_dx: bool = True):
    """Gradients of :func:`linear_forward`.

    Returns
    -------
    dx : ndarray (N, n_in) or None
        ``dy @ w.T`` (compute format, rounded once); None when ``need_dx`` is False.
    dw : ndarray (n_in, n_out)
        ``x.T @ dy`` (compute format, rounded once).
    db : ndarray (n_out,) or None
        ``Σ_i dy_i`` accumulated in the compute format (NumPy pairwise over a contiguous
        axis), rounded once.
    """
    x, w, has_bias = cache
    dw = gemm(x.T, dy, policy)
    dx = gemm(dy, w.T, policy) if need_dx else None
    db = None
    if has_bias:
        c = policy.compute.carrier
        db = quantize(np.ascontiguousarray(dy.astype(c, copy=False).T).sum(axis=-1), policy.storage)
    return dx, dw, db


# --- gather (first layer on index inputs) -------------------------------------------------


@dataclass(frozen=True)
class GatherPlan:
    """The segment-sum matrix of the gather layer's backward, built once per input set.

    ``onehot(x) @ W`` for index inputs is the gather ``W[x[:, 0]] + W[x[:, 1]]`` (bit for
    bit, because adding exact zeros changes nothing). Its weight gradient ``onehot.T @ dh`` is
    a segment sum: every row ``dh_i`` is added to ``dW[x[i, j]]``. The plan holds
    ``onehot.T`` as a CSR matrix with sorted column indices, so the product sums each
    segment sequentially in sample order, in the dtype of ``dh`` (SciPy's CSR kernel
    accumulates in its output dtype). For the paper's shapes that is 10x faster than
    ``np.add.reduceat`` on the gathered rows and 9x faster than the dense BLAS product.
    """

    n_rows: int
    n_samples: int
    matrix: object = field(repr=False)  # scipy.sparse.csr_matrix (n_rows, n_samples)

    @classmethod
    def build(cls, idx, n_rows: int) -> GatherPlan:
        """Plan for index array ``idx`` of shape (N, k) into a weight with ``n_rows`` rows."""
        import scipy.sparse as sparse

        idx = np.asarray(idx)
        if idx.ndim != 2 or idx.dtype.kind not in "iu":
            raise ValueError(
                f"gather indices must be a 2-D integer array, got {idx.dtype} with shape "
                f"{idx.shape}"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
            raise ValueError(
                f"gather indices must lie in [0, {n_rows}), got range [{idx.min()}, {idx.max()}]"
            )
        n = idx.shape[0]
        flat = idx.reshape(-1)  # sample-major: (i0, slot0), (i0, slot1), (i1, slot0), ...
        samples = np.repeat(np.arange(n), idx.shape[1])
        ones = np.ones(flat.size, dtype=np.float64)
        mat = sparse.csr_matrix((ones, (flat, samples)), shape=(n_rows, n))
        mat.sum_duplicates()  # a sample indexing one row twice contributes twice
        mat.sort_indices()
        return cls(n_rows=n_rows, n_samples=n, matrix=mat)

    def segment_sum(self, rows):
        """``onehot.T @ rows`` for ``rows`` of shape (N, n), accumulated in ``rows.dtype``."""
        mat = self.matrix
        if mat.dtype != rows.dtype:
            mat = mat.astype(rows.dtype)  # small integer counts: exact in any float format
        return np.asarray(mat @ rows)


def gather_forward(idx, w, b, policy: PrecisionPolicy):
    """First layer on index inputs: ``h = Σ_j W[idx[:, j]] (+ b)``.

    Parameters
    ----------
    idx : int ndarray, shape (N, k)
        Row indices (for modular arithmetic: ``(a, p + b)``, k = 2).
    w : ndarray, shape (n_rows, n_out); b : ndarray (n_out,) or None

    Returns
    -------
    h : ndarray, shape (N, n_out), storage carrier dtype
        The k-term sum evaluated in the compute format left to right (slot order), plus
        ``+0.0`` (so that ``-0 + -0`` reads ``+0`` as in a product with a one-hot row), rounded
        once. For k <= 2 (modular arithmetic) this equals ``gemm(onehot(idx), w)`` bit for
        bit, since the non-zero part of the product is a single addition; for k >= 3 the
        order of the additions is the slot order, which a BLAS product need not follow.
    cache : tuple
    """
    c = policy.compute.carrier
    h = w[idx[:, 0]].astype(c, copy=True)
    for j in range(1, idx.shape[1]):
        h += w[idx[:, j]]
    h += c.type(0.0)
    h = quantize(h, policy.storage)
    if b is not None:
        h = quantize(h + b, policy.storage)
    return h, (idx, w.shape[0], b is not None)


def gather_backward(dh, cache, plan: GatherPlan, policy: PrecisionPolicy):
    """Weight (and bias) gradient of :func:`gather_forward`: a segment sum.

    ``dW[r] = Σ_{(i, j): idx[i, j] = r} dh[i]``, accumulated in the compute format in the
    plan's order (sample order within each segment) and rounded once. Rows that no sample
    touches get exact zeros. This differs from ``onehot.T @ dh`` through BLAS in the last bits
    (another summation order); it is the one order used for every policy.

    Returns
    -------
    dw : ndarray, shape (n_rows, n_out); db : ndarray (n_out,) or None
    """
    _, n_rows, has_bias = cache
    if plan.n_rows != n_rows or plan.n_samples != dh.shape[0]:
        raise ValueError(
            f"GatherPlan is for {plan.n_samples} samples into {plan.n_rows} rows, but the "
            f"gradient has {dh.shape[0]} samples and the weight {n_rows} rows"
        )
    c = policy.compute.carrier
    dw = plan.segment_sum(np.ascontiguousarray(dh.astype(c, copy=False)))
    db = None
    if has_bias:
        db = quantize(np.ascontiguousarray(dh.astype(c, copy=False).T).sum(axis=-1), policy.storage)
    return quantize(dw, policy.storage), db


# --- ReLU ---------------------------------------------------------------------------------


def relu_forward(x):
    """``max(x, 0)`` (exact in every format; NaN stays NaN). Returns ``(y, y)``."""
    y = np.maximum(x, 0)
    return y, y


def relu_backward(dy, y):
    """``dy · [y > 0]`` (the subgradient 0 is used at 0).

    A multiplication by the 0/1 mask: exact, and 6x faster than ``np.where`` on the dense,
    unpredictable masks of a hidden layer. (``inf · 0`` would give NaN where ``np.where``
    gives 0; an infinite gradient has already stopped the run before this matters.)
    """
    return dy * (y > 0)


# --- losses -------------------------------------------------------------------------------


def stablemax_s(x, fmt, *, eps: float = 0.0):
    """StableMax's ``s(x)`` in a format: ``x + 1`` for ``x >= 0``, ``1 / (1 - x + eps)`` else.

    Each operation is rounded to ``fmt``. ``s`` maps ``-inf`` to 0 and ``+inf`` to ``inf``;
    NaN gives NaN.

    Returns
    -------
    s : ndarray, shape of ``x``
    d : ndarray
        The rounded denominator ``1 - x + eps`` (1 where ``x >= 0``), reused by the backward.
    """
    fmt = get_format(fmt)
    x = quantize(x, fmt)
    one = x.dtype.type(1)
    pos = x >= 0
    d = quantize(one - np.where(pos, 0, x), fmt)
    if eps:
        d = quantize(d + quantize(np.asarray(eps, dtype=np.float64), fmt), fmt)
    with np.errstate(divide="ignore"):
        s = np.where(pos, quantize(x + one, fmt), quantize(one / d, fmt))
    return s, np.where(pos, one, d)


def collapse_mask(z, fmt, *, kind: str = "softmax", order: str = "pairwise", eps: float = 0.0):
    """Rows whose max-shifted normaliser is exactly 1 in ``fmt`` (Softmax Collapse).

    Softmax: ``Σ_k exp(z_k - max z) == 1``; StableMax: ``Σ_k s(z_k) / s(max z) == 1``; every
    term and partial sum rounded to ``fmt``, summed in ``order``. A row with a NaN logit is
    not collapsed (its sum is NaN); a row of one class always is.

    Parameters
    ----------
    z : ndarray, shape (N, C)
    fmt : str or Format
    kind : {"softmax", "stablemax"} ("softmax_stable" measures the softmax sum)

    Returns
    -------
    ndarray of bool, shape (N,)
    """
    fmt = get_format(fmt)
    _check_choice(kind, LOSS_KINDS, "loss kind")
    z = quantize(z, fmt)
    if kind == "stablemax":
        s, _ = stablemax_s(z, fmt, eps=eps)
        smax = s.max(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = quantize(s / smax, fmt)
    else:
        terms = _softmax_terms(z, fmt)[1]
    return ordered_sum(terms, fmt, order) == 1


def _softmax_terms(z, fmt: Format):
    """``d = fl(z - max z)`` and ``e = fl(exp(d))`` in ``fmt``."""
    with np.errstate(invalid="ignore", over="ignore"):
        m = z.max(axis=-1, keepdims=True)
        d = quantize(z - m, fmt)
        e = quantize(np.exp(d), fmt)
    return d, e


@dataclass(frozen=True)
class LossCache:
    """What a loss forward keeps for its backward and for the collapse metrics.

    Attributes
    ----------
    kind, fmt, order : the loss, its format and reduction order
    labels : int ndarray (N,)
    normaliser : ndarray (N,)
        The computed sum: ``Σ exp(z - m)`` (softmax), ``Σ s(z)`` (StableMax) or the tail
        ``s`` (absorption-free softmax), in ``fmt``.
    probs : ndarray (N, C)
        The probabilities the backward uses (``exp(lsm)``, ``s / S`` or ``e / (1 + s)``).
    extra : tuple
        Kind-specific arrays.
    """

    kind: str
    fmt: Format
    order: str
    labels: np.ndarray
    normaliser: np.ndarray
    probs: np.ndarray
    extra: tuple


def loss_forward(
    z, labels, *, kind: str = "softmax", fmt="float32", order: str = "pairwise", eps: float = 0.0
):
    """Per-sample cross-entropy loss in a format.

    Parameters
    ----------
    z : ndarray, shape (N, C)
        Logits (any float dtype; rounded to ``fmt`` first, exactly widened if narrower).
    labels : int ndarray, shape (N,)
    kind : {"softmax", "stablemax", "softmax_stable"}
        See the module docstring for the formulas.
    fmt : str or Format
        Loss format (the paper's ``softmax_precision``).
    order : {"pairwise", "sequential", "wide", "sorted"}
        Summation order of the normaliser.
    eps : float
        StableMax denominator epsilon (``softmax`` kinds ignore it).

    Returns
    -------
    loss : ndarray, shape (N,), carrier dtype of ``fmt``
        ``-log p_y``; exactly 0 for collapsed softmax rows. ``inf``/NaN logits give NaN or inf
        losses as IEEE arithmetic says (the training loop stops on them).
    cache : LossCache
    """
    fmt = get_format(fmt)
    _check_choice(kind, LOSS_KINDS, "loss kind")
    z = quantize(z, fmt)
    labels = np.asarray(labels)
    rows = np.arange(z.shape[0])
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if kind == "softmax":
            d, e = _softmax_terms(z, fmt)
            total = ordered_sum(e, fmt, order)
            lse = quantize(np.log(total), fmt)
            lsm = quantize(d - lse[:, None], fmt)
            probs = quantize(np.exp(lsm), fmt)
            loss = 0 - lsm[rows, labels]  # 0 - 0 is +0, where -(0) would print -0
            extra = ()
        elif kind == "stablemax":
            s, _ = stablemax_s(z, fmt, eps=eps)
            total = ordered_sum(s, fmt, order)
            probs = quantize(s / total[:, None], fmt)
            loss = -quantize(np.log(probs[rows, labels]), fmt)
            extra = (s, z)
        else:
            _, e = _softmax_terms(z, fmt)
            top = np.argmax(z, axis=-1)
            e[rows, top] = 0  # the max term is taken out of the sum exactly
            total = ordered_sum(e, fmt, order)
            denom = quantize(1 + total, fmt)
            probs = quantize(e / denom[:, None], fmt)
            probs[rows, top] = quantize(1 / denom, fmt)
            m = z[rows, top]
            loss = quantize(
                quantize(m - z[rows, labels], fmt) + quantize(np.log1p(total), fmt), fmt
            )
            extra = (top, denom)
    cache = LossCache(
        kind=kind, fmt=fmt, order=order, labels=labels, normaliser=total, probs=probs, extra=extra
    )
    return loss, cache


def loss_backward(cache: LossCache, dloss):
    """Logit gradient of :func:`loss_forward`, scaled by the upstream per-sample gradient.

    Parameters
    ----------
    cache : LossCache
    dloss : float or ndarray (N,)
        ``∂(total)/∂loss_i``: ``1/N`` for a mean (rounded to the loss format), 1 for a sum.

    Returns
    -------
    ndarray, shape (N, C), loss carrier dtype
        softmax: ``fl(exp(lsm_k)·dl) - δ_ky·dl`` (as PyTorch's ``log_softmax`` backward);
        stablemax: ``s'(z_k)·dl·(1/S - δ_ky/s_y)``; softmax_stable: ``p_k·dl`` off target and
        ``-(s/(1+s))·dl`` for a target that is the argmax.
    """
    fmt = cache.fmt
    n = cache.probs.shape[0]
    rows = np.arange(n)
    y = cache.labels
    dl = quantize(np.broadcast_to(np.asarray(dloss, dtype=np.float64), (n,)), fmt)[:, None]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if cache.kind == "softmax":
            g = quantize(cache.probs * dl, fmt)
            g[rows, y] = quantize(g[rows, y] - dl[:, 0], fmt)
            return g
        if cache.kind == "stablemax":
            s, z = cache.extra
            inv_total = quantize(1 / cache.normaliser, fmt)[:, None]
            inv_sy = quantize(1 / s[rows, y], fmt)
            coef = np.broadcast_to(inv_total, s.shape).copy()
            coef[rows, y] = quantize(coef[rows, y] - inv_sy, fmt)
            # s'(x) = 1 for x >= 0 and 1/(1-x)**2 = s(x)**2 for x < 0.
            deriv = np.where(z >= 0, s.dtype.type(1), quantize(s * s, fmt))
            return quantize(quantize(deriv * dl, fmt) * coef, fmt)
        top, denom = cache.extra
        g = quantize(cache.probs * dl, fmt)
        at_top = top == y
        # Target is the argmax: p_y - 1 = -s / (1 + s), no cancellation.
        tgt = quantize(-cache.normaliser / denom, fmt)
        other = quantize(cache.probs[rows, y] - 1, fmt)
        g[rows, y] = quantize(np.where(at_top, tgt, other) * dl[:, 0], fmt)
        return g


def reduce_loss(loss, reduction: str = "mean"):
    """Reduce per-sample losses: ``mean`` (accumulated in float64, as a report; training uses
    ``dloss = fl(1/N)``) or ``none``."""
    _check_choice(reduction, REDUCTIONS, "reduction")
    if reduction == "none":
        return loss
    xp = array_module(loss)
    return xp.mean(loss.astype(np.float64))
