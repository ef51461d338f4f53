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

from numstab.backend import put_at, take_at

__all__ = [
    "backward",
    "backward_smoothed",
    "collapse_terms",
    "forward",
    "smoothed",
    "terms",
    "verdicts",
]


def terms(z, r):
    """``d = RN(z - max z)`` and ``e = RN(exp d)``, shape of ``z`` (N, C)."""
    m = r.xp.max(z, axis=-1, keepdims=True)
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


def verdicts(z, labels, r):
    """Per row, the collapse verdicts of :func:`forward` and :func:`backward` (``dl = 1``)
    without the second ``(N, C)`` exponential and the backward.

    The target column is computed as the loss computes it (``lsm_y = RN(d_y - RN(log S))``,
    ``p_y = RN(exp lsm_y)``, ``g_y = RN(p_y - 1)``), so ``zero_loss`` and ``zero_target_grad``
    are exact in every row. The gradient's row sum is formed only where ``S == 1``: there
    ``RN(log 1) = 0``, hence ``lsm = d`` and ``p = e`` term by term, and the gradient is ``e``
    with ``g_y`` at the target (summed in float64); NaN elsewhere.

    Returns
    -------
    collapsed, zero_loss, zero_target_grad : bool arrays (N,)
    row_sum : float64 array (N,)
    """
    xp = r.xp
    d, e = terms(z, r)
    total = r.sum(e)
    collapsed = total == 1
    lsm_y = r.sub(take_at(d, labels), r.log(total))
    g_y = r.dl_p_minus_one(r.exp(lsm_y), xp.ones_like(lsm_y))
    f64 = xp.float64
    row_sum = xp.full(collapsed.shape, xp.nan, dtype=f64)
    c = collapsed
    g = put_at(xp.astype(e[c], f64), labels[c], xp.astype(g_y[c], f64))  # gradient where S == 1
    row_sum[c] = xp.sum(g, axis=1)
    return collapsed, lsm_y == 0, g_y == 0, row_sum
