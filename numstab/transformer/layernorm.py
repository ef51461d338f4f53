"""LayerNorm over the last axis, forward and backward, in the compute format.

Forward (``n`` features, every operation one rounding ``RN`` to the compute format ``c``,
sums NumPy's pairwise tree in ``c``; statistics in ``c`` as PyTorch accumulates them in its
accumulation type)::

    μ = RN(Σ x / n)          x̄ = RN(x - μ)          σ² = RN(Σ RN(x̄²) / n)
    ρ = RN(1 / RN(√RN(σ² + eps)))       x̂ = RN(x̄ · ρ)       y = RN_s(RN(x̂ · w) + b)

with the last rounding to the storage format ``s`` (a second one where ``s`` is narrower than
``c``). Backward, with ``ĝ = RN(dy · w)``::

    dx = RN_s(RN(RN(RN(ĝ - mean ĝ) - RN(x̂ · mean(ĝ x̂))) · ρ))
    dw = Σ_rows RN(dy · x̂)      db = Σ_rows dy         (column sums as the linear bias's)

``eps`` is rounded to ``c`` (PyTorch's default 1e-5). A row of equal values gives ``x̂ = 0``
and ``y = b``.
"""

from __future__ import annotations

import numpy as np

from numstab.backend import errstate, namespace, xp_dtype
from numstab.losses.rounding import Rounding
from numstab.precision import PrecisionPolicy, quantize
from numstab.transformer.colsum import column_sum

__all__ = ["layernorm_backward", "layernorm_forward"]


def _compute(policy: PrecisionPolicy, xp) -> Rounding:
    return Rounding(policy.compute, "pairwise", policy.elementary, xp)


def layernorm_forward(x, w, b, eps: float, policy: PrecisionPolicy):
    """``y = (x - μ) / √(σ² + eps) · w + b`` over the last axis of ``x`` (M, n).

    Returns
    -------
    y : array (M, n), storage carrier dtype
    cache : tuple ``(x̂, ρ, w)`` for :func:`layernorm_backward`
    """
    xp = namespace(x)
    rc = _compute(policy, xp)
    n = float(x.shape[-1])
    c = xp_dtype(xp, policy.compute.carrier)
    e = float(quantize(np.asarray(eps, dtype=np.float64), policy.compute))
    with errstate(xp, over="ignore", invalid="ignore", divide="ignore"):
        xc = xp.astype(x, c, copy=False)
        xm = rc.sub(xc, rc.div(rc.sum(xc), n)[:, None])
        var = rc.div(rc.sum(rc.mul(xm, xm)), n)
        rho = rc.div(1.0, quantize(xp.sqrt(rc.add(var, e)), policy.compute))[:, None]
        xhat = rc.mul(xm, rho)
        y = quantize(rc.add(rc.mul(xhat, w), b), policy.storage)
    return y, (xhat, rho, w)


def layernorm_backward(dy, cache, policy: PrecisionPolicy):
    """Gradients of :func:`layernorm_forward`: ``(dx (M, n), dw (n,), db (n,))``, storage
    carrier dtype."""
    xhat, rho, w = cache
    xp = namespace(dy)
    rc = _compute(policy, xp)
    n = float(dy.shape[-1])
    c = xp_dtype(xp, policy.compute.carrier)
    with errstate(xp, over="ignore", invalid="ignore"):
        dyc = xp.astype(dy, c, copy=False)
        dw = column_sum(rc.mul(dyc, xhat), policy)
        db = column_sum(dyc, policy)
        g = rc.mul(dyc, w)
        mg = rc.div(rc.sum(g), n)[:, None]
        mgx = rc.div(rc.sum(rc.mul(g, xhat)), n)[:, None]
        dx = rc.mul(rc.sub(rc.sub(g, mg), rc.mul(xhat, mgx)), rho)
        return quantize(dx, policy.storage), dw, db
