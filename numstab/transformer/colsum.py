"""Sums over the sample axis in NumPy's pairwise order, without a transposed copy.

The bias and LayerNorm gradients are column sums ``Σ_i g[i, :]`` of a C-contiguous (N, n)
gradient in the compute carrier, in the order ``numpy.sum`` takes along a contiguous axis
(:func:`numstab.functional.linear_backward`'s ``db``): NumPy's pairwise tree over the N
samples, added to the reduction's identity ``+0``. Handing NumPy the transpose costs a
strided copy of the whole gradient (a fifth of a transformer step at the paper's sizes). Here
the same tree runs on whole rows (:func:`numstab.summation.pairwise_rows`). Every addition is
the one NumPy makes, in the same order, so the sums are bit-identical
(``tests/test_transformer_speed.py`` checks this against ``numpy.sum`` of the transpose,
signed zeros, infinities and NaN included).
"""

from __future__ import annotations

from numstab.backend import errstate, namespace, xp_dtype
from numstab.functional import linear_backward as _linear_backward
from numstab.precision import PrecisionPolicy, get_format, quantize
from numstab.summation import pairwise_rows

__all__ = ["column_sum", "linear_backward"]


def column_sum(g, policy: PrecisionPolicy):
    """``Σ_i g[i, :]`` in the compute carrier, NumPy's pairwise order, rounded once to storage.

    Parameters
    ----------
    g : array (N, n), storage or compute carrier dtype
    policy : PrecisionPolicy

    Returns
    -------
    array (n,), storage carrier dtype
        The bits of :func:`numstab.functional.linear_backward`'s bias gradient of ``g``
        (``N = 0``: zeros; an all ``-0.0`` column sums to ``+0.0``, as NumPy's does).
    """
    xp = namespace(g)
    fmt = get_format(policy.compute.carrier)
    with errstate(xp, over="ignore", invalid="ignore"):
        x = xp.astype(g, xp_dtype(xp, fmt.carrier), copy=False)
        return quantize(pairwise_rows(x, fmt) + 0.0, policy.storage)


def linear_backward(dy, cache, policy: PrecisionPolicy):
    """:func:`numstab.functional.linear_backward` with the bias gradient by
    :func:`column_sum`: the same ``(dx, dw, db)``, bit for bit."""
    x, w, has_bias = cache
    dx, dw, _ = _linear_backward(dy, (x, w, False), policy)
    return dx, dw, column_sum(dy, policy) if has_bias else None
