"""Per-step training metrics: pure functions over logits, labels and parameter dicts.

Everything here is a measurement, computed in float64 from the run's own arrays (which are
exact in float64 for every format but longdouble, whose norms are taken in longdouble), so the
metrics themselves add no rounding that could be mistaken for the phenomenon.

The functions take their array namespace from their inputs (NumPy, CuPy or an array-API
library) and use standard functions only; scalar results are Python floats (a CuPy input
costs one device-to-host transfer of each scalar).
"""

from __future__ import annotations

import math

import numpy as np

from numstab import kernels, workspace
from numstab.backend import errstate, namespace, put_at, take_at, xp_dtype
from numstab.checks import check_choice

__all__ = [
    "DOT_ORDERS",
    "accuracy",
    "cosine",
    "logit_gaps",
    "param_cosines",
    "param_norms",
    "param_norms_and_cosines",
]


def accuracy(logits, labels) -> float:
    """Fraction of rows whose argmax is the label: an integer count divided once.

    Ties count as wrong unless the label is the first maximum (NumPy's ``argmax``).
    A row with NaN logits counts as wrong.

    Parameters
    ----------
    logits : ndarray, shape (N, C); labels : int ndarray, shape (N,)
    """
    n = labels.shape[0]
    if n == 0:
        return float("nan")
    xp = namespace(logits)
    ok = xp.argmax(logits, axis=-1) == xp.asarray(labels)
    ok &= ~xp.any(xp.isnan(logits), axis=-1)
    return int(xp.count_nonzero(ok)) / n


def logit_gaps(logits, labels):
    """Margin of the correct logit over the best other one, per row (float64).

    ``gap_i = z_{i,y} - max_{k≠y} z_{i,k}``; positive when the row is classified correctly.
    One class gives ``+inf``.
    """
    xp = namespace(logits)
    z = xp.astype(logits, xp_dtype(xp, np.float64))  # a copy: written below
    labels = xp.asarray(labels)
    correct = take_at(z, labels)
    z = put_at(z, labels, -math.inf)
    with errstate(xp, invalid="ignore"):
        return correct - xp.max(z, axis=-1)


#: Summation orders of the dot products behind the norms and cosines. ``"blas"``: NumPy's
#: float64 ``@`` (the BLAS library's ``ddot``, whose order depends on the library, its CPU
#: kernel and its thread count). ``"lanes8"``: the float64 product of entry ``i`` added to
#: lane ``i mod 8`` in order of ``i`` (each lane starting at +0), the lanes then summed as
#: ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``: the same bits on every machine and
#: thread count, from host arrays, in one compiled pass over float32 or float64 tensors
#: without a float64 copy where numba is installed (:func:`numstab.kernels.dot_lanes8`;
#: the NumPy path gives the same bits).
DOT_ORDERS = ("blas", "lanes8")


def _tree8(lanes):
    """``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`` of eight lanes, in their dtype."""
    l0, l1, l2, l3, l4, l5, l6, l7 = lanes
    return ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))


def _dots_lanes8(a, b) -> tuple:
    """``(⟨a, a⟩, ⟨b, b⟩, ⟨a, b⟩)`` of two host arrays of one shape in the order ``"lanes8"``
    (:data:`DOT_ORDERS`), float64 (longdouble for longdouble input)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    if kernels.applies(a, b):
        lanes = np.zeros((3, 8))
        kernels.dot_lanes8(a.reshape(-1), b.reshape(-1), lanes)
        return tuple(_tree8(row) for row in lanes)
    a, b = _flat64(a), _flat64(b)
    n = a.size
    m = n - n % 8
    out = []
    for p in (a * a, b * b, a * b):
        # a reduction along the first axis adds the rows in order, lane by lane: each lane
        # sequential, as the compiled pass (tests/test_kernels.py checks both against a loop)
        lanes = np.add.reduce(p[:m].reshape(-1, 8), axis=0, initial=0.0)
        lanes[: n - m] += p[m:]
        out.append(_tree8(lanes))
    return tuple(out)


def _flat64(a):
    """``a`` flattened in float64 (longdouble for longdouble input), in its own namespace; a
    NumPy copy in an array of the active :mod:`numstab.workspace` (an allocation of that size
    page-faults its memory in again every step: 0.18 ms for 45 000 float64, the copy 0.01)."""
    if type(a) is np.ndarray:  # the common case, without the namespace lookups: same values
        out = workspace.empty(a.shape, np.longdouble if a.dtype == np.longdouble else np.float64)
        np.copyto(out, a, casting="unsafe")  # astype's conversion
        return out.reshape(-1)
    xp = namespace(a)
    a = xp.asarray(a)
    wide = np.longdouble if isinstance(a.dtype, np.dtype) and a.dtype == np.longdouble else None
    return xp.reshape(xp.astype(a, xp_dtype(xp, wide or np.float64)), (-1,))


def cosine(a, b) -> float:
    """``⟨a, b⟩ / (‖a‖ ‖b‖)`` in float64 (longdouble for longdouble input); NaN if either is 0."""
    a, b = _flat64(a), _flat64(b)
    xp = namespace(a, b)
    na, nb = xp.sqrt(a @ a), xp.sqrt(b @ b)
    if na == 0 or nb == 0 or not xp.isfinite(na * nb):
        return float("nan")
    return float((a @ b) / (na * nb))


def param_norms(params: dict) -> dict:
    """L2 norm of each tensor and of their concatenation (key ``"global"``)."""
    out = {}
    for k, v in params.items():
        f = _flat64(v)
        out[k] = float(namespace(f).sqrt(f @ f))
    out["global"] = math.sqrt(sum(v * v for v in out.values()))
    return out


def param_cosines(params: dict, other: dict, *, sign: float = 1.0) -> dict:
    """Cosine between ``params`` and ``sign · other``, per tensor and globally.

    With ``other`` the gradient and ``sign = -1`` this is the NLM alignment ``cos(θ, -∇L)``;
    with ``other`` the applied update ``Δθ`` it is ``cos(θ, Δθ)``.
    """
    out = {}
    dot_total = nt = no = 0.0
    for k, v in params.items():
        a, b = _flat64(v), sign * _flat64(other[k])
        d, na2, nb2 = float(a @ b), float(a @ a), float(b @ b)
        # Host scalars from here on (np.sqrt of a Python float: the np.float64 results of
        # before).
        out[k] = d / np.sqrt(na2 * nb2) if na2 > 0 and nb2 > 0 else float("nan")
        dot_total += d
        nt += na2
        no += nb2
    out["global"] = dot_total / np.sqrt(nt * no) if nt > 0 and no > 0 else float("nan")
    return out


def param_norms_and_cosines(
    params: dict, other: dict, *, sign: float = 1.0, order: str = "blas"
) -> tuple:
    """``param_norms(params)``, ``param_norms(other)`` and ``param_cosines(params, other,
    sign=sign)`` bit for bit, from one float64 copy of each tensor and three dot products
    instead of four copies and five products.

    Exact because ``sign`` is ±1: round to nearest is symmetric under negation and the products
    are summed in the same order, so ``⟨a, −b⟩ = −⟨a, b⟩`` and ``⟨−b, −b⟩ = ⟨b, b⟩`` (``0 − x``
    gives the ``+0`` that ``⟨a, −b⟩`` gives when every product is zero).

    Parameters
    ----------
    params, other : dict of name -> array, the same keys and shapes
    sign : {1.0, -1.0}
    order : {"blas", "lanes8"}
        The dot products' summation order (:data:`DOT_ORDERS`); ``"blas"`` (default) gives
        the bits of ``param_norms`` and ``param_cosines``, ``"lanes8"`` (host arrays) the
        same bits on every machine and BLAS thread count, without a float64 copy.

    Returns
    -------
    (norms of params, norms of other, cosines): dicts keyed by name and ``"global"``.
    """
    if sign not in (1.0, -1.0):
        raise ValueError(f"sign must be 1 or -1, got {sign!r}")
    check_choice(order, DOT_ORDERS, "order")
    na, nb, cos = {}, {}, {}
    dot_total = nt = no = 0.0
    for k, v in params.items():
        if order == "lanes8":
            aa, bb, ab = _dots_lanes8(v, other[k])
            sqrt = np.sqrt
        else:
            a, b = _flat64(v), _flat64(other[k])
            sqrt = namespace(a).sqrt
            aa, bb, ab = a @ a, b @ b, a @ b
        na[k], nb[k] = float(sqrt(aa)), float(sqrt(bb))
        ab = float(ab)
        d, na2, nb2 = (ab if sign > 0 else 0.0 - ab), float(aa), float(bb)
        cos[k] = d / np.sqrt(na2 * nb2) if na2 > 0 and nb2 > 0 else float("nan")
        dot_total += d
        nt += na2
        no += nb2
    cos["global"] = dot_total / np.sqrt(nt * no) if nt > 0 and no > 0 else float("nan")
    for norms in (na, nb):
        norms["global"] = math.sqrt(sum(x * x for x in norms.values()))
    return na, nb, cos
