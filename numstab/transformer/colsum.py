"""Sums over the sample axis in NumPy's pairwise order, without a transposed copy.

The bias and LayerNorm gradients are column sums ``Σ_i g[i, :]`` of a C-contiguous (N, n)
gradient in the compute carrier, in the order ``numpy.sum`` takes along a contiguous axis
(:func:`numstab.functional.linear_backward`'s ``db``): NumPy's pairwise tree over the N
samples, added to the reduction's identity ``+0``. Handing NumPy the transpose costs a
strided copy of the whole gradient (a fifth of a transformer step at the paper's sizes). Here
the same tree runs on whole rows: the leaves (runs of at most 128 samples) of one length are
gathered together (contiguous row copies), each leaf's eight interleaved partial sums and its
remainder are row operations, and the leaves are joined up the tree as NumPy joins them. Every
addition is the one NumPy makes, in the same order, so the sums are bit-identical
(``tests/test_transformer_speed.py`` checks this against ``numpy.sum`` of the transpose,
signed zeros, infinities and NaN included).
"""

from __future__ import annotations

from numstab.backend import errstate, namespace, xp_dtype
from numstab.functional import linear_backward as _linear_backward
from numstab.precision import PrecisionPolicy, get_format, quantize
from numstab.summation import _join, _leaves, _pairwise_leaf

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
        return quantize(_rows_pairwise(x, fmt, xp) + 0.0, policy.storage)


def linear_backward(dy, cache, policy: PrecisionPolicy):
    """:func:`numstab.functional.linear_backward` with the bias gradient by
    :func:`column_sum`: the same ``(dx, dw, db)``, bit for bit."""
    x, w, has_bias = cache
    dx, dw, _ = _linear_backward(dy, (x, w, False), policy)
    return dx, dw, column_sum(dy, policy) if has_bias else None


def _rows_pairwise(x, fmt, xp):
    """NumPy's pairwise tree over the rows of ``x`` (N, n), every addition in ``fmt``."""
    n = x.shape[0]
    leaves = _leaves(0, n)
    value = {}
    for length in sorted({m for _, m in leaves}):
        starts = [i for i, m in leaves if m == length]
        if len(starts) == 1 and length == n:
            group = x[None]
        else:
            rows = xp.asarray([i + k for i in starts for k in range(length)])
            group = xp.reshape(xp.take(x, rows, axis=0), (len(starts), length, x.shape[1]))
        # the leaf sums over the last axis of a (leaves, n, length) view
        sums = _pairwise_leaf(xp.permute_dims(group, (0, 2, 1)), length, fmt, xp)
        value.update({i: sums[j] for j, i in enumerate(starts)})
    return _join(0, n, value, fmt)
