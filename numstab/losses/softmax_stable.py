"""Absorption-free softmax cross-entropy, "what the math says".

The max term is taken out of the sum (SciPy's ``logsumexp`` does the same): with ``k*`` the
argmax, ``m = z_k*``, ``e = RN(exp RN(z - m))`` and ``s = Σ_{k≠k*} e_k`` (ordered)::

    loss = RN(RN(m - z_y) + RN(log1p s))    p_k = RN(e_k / RN(1 + s)),  p_k* = RN(1 / RN(1 + s))

Backward: ``RN(p_k·dl)`` off target; at a target that is the argmax
``RN(RN(-s/(1+s))·dl)`` (two roundings, no cancellation), elsewhere ``RN(dl·(p_y - 1))``.
It never collapses while ``s`` is representable.
"""

from __future__ import annotations

from numstab.backend import put_at, take_at
from numstab.losses import softmax

__all__ = ["backward", "collapse_terms", "forward"]


def forward(z, labels, r, eps):
    """``(loss (N,), s (N,), p (N, C), state (argmax, RN(1 + s)))``; ``eps`` is not used."""
    xp = r.xp
    _, e = softmax.terms(z, r)
    top = xp.argmax(z, axis=-1)
    e = put_at(e, top, 0.0)  # the max term is taken out of the sum exactly
    total = r.sum(e)
    denom = r.add(1.0, total)
    probs = put_at(r.div(e, denom[:, None]), top, r.div(1.0, denom))
    loss = r.add(r.sub(take_at(z, top), take_at(z, labels)), r.log1p(total))
    return loss, total, probs, (top, denom)


def backward(cache, dl, r):
    """Logit gradient ``(N, C)`` from the cache and ``dl`` of shape (N, 1)."""
    top, denom = cache.state
    y = cache.labels
    g = r.mul(cache.probs, dl)
    # Target is the argmax: p_y - 1 = -s / (1 + s), no cancellation.
    at_top = r.mul(r.div(-cache.normaliser, denom), dl[:, 0])
    elsewhere = r.dl_p_minus_one(take_at(cache.probs, y), dl[:, 0])
    return put_at(g, y, r.xp.where(top == y, at_top, elsewhere))


#: The collapse of the absorption-free loss is measured on the ordinary softmax sum.
collapse_terms = softmax.collapse_terms
