"""Softmax cross-entropy as frameworks compute it (PyTorch's ``log_softmax`` and its backward).

Forward, with ``m = max_k z_k`` and every step one rounding ``RN`` to the loss format::

    d = RN(z - m)       e = RN(exp d)       S = Σ e (ordered)       lse = RN(log S)
    lsm = RN(d - lse)   p = RN(exp lsm)     loss = -lsm_y

Backward (``dl`` the upstream per-sample gradient): ``g_k = RN(p_k·dl)`` off target and
``g_y = RN(dl·(p_y - 1))`` -- one rounding of the exact value, not ``RN(RN(p_y·dl) - dl)``,
which halves the gradient of a row about to collapse.

When the tail of ``S`` is absorbed, ``S == 1`` exactly, the loss is exactly 0 and the target
gradient exactly 0: Softmax Collapse.
"""

from __future__ import annotations

from numstab.backend import put_at, take_at

__all__ = ["backward", "collapse_terms", "forward", "terms"]


def terms(z, r):
    """``d = RN(z - max z)`` and ``e = RN(exp d)``, shape of ``z`` (N, C)."""
    m = r.xp.max(z, axis=-1, keepdims=True)
    d = r.sub(z, m)
    return d, r.exp(d)


def forward(z, labels, r, eps):
    """``(loss (N,), S (N,), p (N, C), state ())``; ``eps`` is not used."""
    d, e = terms(z, r)
    total = r.sum(e)
    lsm = r.sub(d, r.log(total)[:, None])
    probs = r.exp(lsm)
    loss = 0.0 - take_at(lsm, labels)  # exact; 0 - 0 is +0, where -(0) would print -0
    return loss, total, probs, ()


def backward(cache, dl, r):
    """Logit gradient ``(N, C)`` from the cache and ``dl`` of shape (N, 1)."""
    y = cache.labels
    g = r.mul(cache.probs, dl)
    return put_at(g, y, r.dl_p_minus_one(take_at(cache.probs, y), dl[:, 0]))


def collapse_terms(z, r, eps):
    """The terms whose ordered sum is 1 exactly in a collapsed row: ``e``."""
    return terms(z, r)[1]
