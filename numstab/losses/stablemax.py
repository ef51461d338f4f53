"""StableMax cross-entropy: ``s(x) = x + 1`` (x >= 0), ``1 / (1 - x + eps)`` (x < 0).

Forward, every step one rounding ``RN`` to the loss format::

    s = s(z)    S = Σ s (ordered)    p = RN(s / S)    loss = -RN(log p_y)

``eps`` defaults to 0 (the paper's definition); the authors' released code uses ``1e-30``,
which in float32/float64 changes ``1 - x`` only when ``|1 - x| < 2**-p · 1e-30``, i.e. never
for finite logits.

Backward: ``g_k = dl·(p_k - δ_ky)·c_k`` with ``c_k = s'(z_k)/s_k``: ``s_k`` for ``z_k < 0``
(``s' = s**2``) and ``1/s_k`` for ``z_k >= 0``. So ``t_k = RN(dl·p_k)`` (target:
``RN(dl·(p_y - 1))``), then ``RN(t_k·s_k)`` or ``RN(t_k/s_k)``. ``s**2`` is never formed, so
logits down to ``-1/(smallest normal)`` keep their gradient.
"""

from __future__ import annotations

import numpy as np

from numstab.backend import put_at, take_at
from numstab.precision import quantize

__all__ = ["backward", "collapse_terms", "forward", "s"]


def s(x, r, eps: float = 0.0):
    """``s(x)`` rounded per operation, and the rounded denominator ``1 - x + eps``.

    ``s(-inf) = 0``, ``s(+inf) = inf``, NaN gives NaN.

    Returns
    -------
    s : array, shape of ``x``
    d : array, shape of ``x``: ``RN(RN(1 - x) + eps)`` where ``x < 0``, 1 elsewhere
    """
    xp = r.xp
    pos = x >= 0
    d = r.sub(1.0, xp.where(pos, 0.0, x))
    if eps:
        # eps rounded to the format, added as a Python float: exact in the carrier dtype.
        d = r.add(d, float(quantize(np.asarray(eps, dtype=np.float64), r.fmt)))
    return xp.where(pos, r.add(x, 1.0), r.div(1.0, d)), xp.where(pos, 1.0, d)


def forward(z, labels, r, eps):
    """``(loss (N,), S (N,), p (N, C), state (s, z))``."""
    sz, _ = s(z, r, eps)
    total = r.sum(sz)
    probs = r.div(sz, total[:, None])
    loss = -r.log(take_at(probs, labels))
    return loss, total, probs, (sz, z)


def backward(cache, dl, r):
    """Logit gradient ``(N, C)`` from the cache and ``dl`` of shape (N, 1)."""
    sz, z = cache.state
    y = cache.labels
    g = r.mul(cache.probs, dl)
    g = put_at(g, y, r.dl_p_minus_one(take_at(cache.probs, y), dl[:, 0]))
    # s'(x)/s(x) is s(x) for x < 0 (s' = s**2) and 1/s(x) for x >= 0 (s' = 1).
    return r.xp.where(z < 0, r.mul(g, sz), r.div(g, sz))


def collapse_terms(z, r, eps):
    """``RN(s_k / max s)``: their ordered sum is 1 exactly in a collapsed row."""
    sz, _ = s(z, r, eps)
    return r.div(sz, r.xp.max(sz, axis=-1, keepdims=True))
