"""Sums along the last axis in a declared format and order.

Whether a softmax row collapses depends on the order in which ``Σ exp(z - max)`` is added up
(``../docs/formats.md`` has the table), so every reduction that can decide a result takes its
order explicitly:

``pairwise``
    ``numpy.sum``: NumPy's pairwise summation tree (blocks of 8 interleaved partial sums,
    halved recursively above 128 elements) over the whole row, with NumPy's accumulator. For
    float32, float64 and longdouble every addition is rounded to the format, bit-identical to
    ``numpy.sum`` along a contiguous last axis (NumPy 2.4; NumPy 2.2 adds the 8192-term pieces
    of a longer row left to right, and the tree is then evaluated from ``numpy.sum`` of the
    pieces it splits into: :func:`numstab.backend.native_sum`). For float16 NumPy accumulates
    the tree in float32 and rounds once at the end, and so does this order (for float16 it
    therefore equals ``wide``). bfloat16 has no
    pairwise loop in NumPy (ml_dtypes' ``sum`` adds sequentially in bfloat16, so 10 000 ones
    sum to 256); here the tree is evaluated in bfloat16, every addition rounded.
``sequential``
    Left to right, each addition rounded to the format (``((x0 + x1) + x2) + ...``).
``wide``
    NumPy's pairwise tree in the next wider format (float32 for float16/bfloat16, float64 for
    float32, longdouble for float64), rounded once to the format at the end: how GPU kernels
    treat 16-bit formats.
``sorted``
    Sequential after sorting each row by ascending magnitude (the smallest terms first: the
    order that absorbs least).
``torch``
    PyTorch CPU's ``log_softmax`` / ``cross_entropy`` reduction on AVX-512 (measured on
    torch 2.13.0, docs/interop.md): ``L`` interleaved partial sums (term ``k`` into lane
    ``k mod L``, each lane left to right; ``L = 16`` for float32, 8 for float64 and
    longdouble), joined by halving (lane ``i`` plus lane ``i + L/2``, ...) for float32 and left
    to right for float64; rows shorter than ``L`` left to right. float16 and bfloat16 run the
    float32 reduction and round once to the format, as PyTorch does (PyTorch's terms are
    float32, numstab's are rounded to the format first: not always the same bits).

Every order is written with array-API standard functions on the input's namespace, so it
gives the same bits on NumPy, CuPy or any array-API library; NumPy's own loops
(``numpy.sum``, ``numpy.add.accumulate``) are used where they evaluate exactly the declared
order (:func:`numstab.backend.native_sum`).
"""

from __future__ import annotations

import numpy as np

from numstab import workspace
from numstab.backend import errstate, namespace, native_sum, xp_dtype
from numstab.fastround import quantize_into
from numstab.precision import REDUCTION_ORDERS, Format, get_format, quantize

__all__ = ["REDUCTION_ORDERS", "check_order", "ordered_sum", "pairwise_rows", "wide_format"]

_PAIRWISE_BLOCK = 128  # NumPy's PW_BLOCKSIZE
_UNROLL = 8


def check_order(order: str) -> str:
    """Return ``order`` if it is a known reduction order, else raise ``ValueError``."""
    if order not in REDUCTION_ORDERS:
        raise ValueError(
            f"unknown reduction order {order!r}; valid orders: {', '.join(REDUCTION_ORDERS)}"
        )
    return order


def wide_format(fmt) -> Format:
    """The accumulation format of the ``wide`` order for ``fmt``.

    Raises
    ------
    ValueError
        For float64 where no x87 longdouble exists, and for longdouble (nothing is wider).
    """
    fmt = get_format(fmt)
    # formats narrower than float32 are carried in float32, which is their wide format
    wider = (
        "float32"
        if fmt.is_emulated
        else {"float32": "float64", "float64": "longdouble"}.get(fmt.plain.name)
    )
    if wider is None:
        raise ValueError("order 'wide' is undefined for longdouble: no wider format exists")
    try:
        return get_format(wider)
    except ValueError as exc:
        raise ValueError(f"order 'wide' for {fmt.name} needs {wider}: {exc}") from None


def ordered_sum(x, fmt, order: str = "pairwise"):
    """Sum along the last axis in a format, in a declared order.

    Parameters
    ----------
    x : array, shape (..., n)
        Values representable in ``fmt``, in its carrier dtype (see
        :func:`numstab.precision.quantize`); any backend (float32/float64 formats outside
        NumPy and CuPy). Not modified.
    fmt : str or Format
        The format every partial sum is rounded to.
    order : {"pairwise", "sequential", "wide", "sorted", "torch"}

    Returns
    -------
    array of the input's namespace, shape (...)
        The sums, in the carrier dtype of ``fmt``. Signed zeros: an empty last axis sums to
        ``+0.0``; all-``-0.0`` terms sum to ``-0.0`` for ``sequential`` and ``sorted`` (the
        first term starts the sum) and to ``+0.0`` for ``pairwise`` and ``wide`` (NumPy's
        reduction starts from its identity ``+0``), except for bfloat16 ``pairwise``, whose
        explicit tree starts from ``-0.0`` (``-0.0`` in both cases).
        ``inf`` and ``NaN`` propagate as IEEE addition says.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[1.0, 2.0**-24, 2.0**-24]], dtype=np.float32)
    >>> ordered_sum(x, "float32", "sequential")[0] == 1.0   # each tail term absorbed
    np.True_
    >>> ordered_sum(x, "float32", "sorted")[0] > 1.0        # tail added up first
    np.True_
    """
    fmt = get_format(fmt)
    check_order(order)
    xp = namespace(x)
    x = xp.asarray(x)
    with errstate(xp, invalid="ignore", over="ignore"):  # inf and NaN propagate as IEEE says
        return _ordered_sum(x, fmt, order, xp)


def pairwise_rows(x, fmt: Format):
    """``Σ_i x[i, :]``: NumPy's pairwise tree over the rows of a 2-D array, every addition
    rounded to ``fmt``, without a transposed copy.

    The leaves (runs of at most 128 rows) of one length are gathered together (contiguous row
    copies), each leaf's eight interleaved partial sums and its remainder are row operations,
    and the leaves are joined up the tree as NumPy joins them: the additions of ``numpy.sum``
    along a contiguous axis of the transpose, in the same order, without its identity ``+0``
    (the caller adds it where NumPy's reduction would).

    Parameters
    ----------
    x : array (N, n), in the carrier dtype of ``fmt``; not modified (N = 0: all ``-0.0``).
    fmt : Format

    Returns
    -------
    array (n,)
    """
    xp = namespace(x)
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


def _ordered_sum(x, fmt: Format, order: str, xp):
    if order == "wide":
        wide = wide_format(fmt)
        return quantize(_pairwise(xp.astype(x, xp_dtype(xp, wide.carrier)), wide, xp), fmt)
    if order == "pairwise":
        return _pairwise(x, fmt, xp)
    if order == "torch":
        return _lanes(x, fmt, xp)
    if order == "sorted":
        idx = xp.argsort(xp.abs(x), axis=-1, stable=True)
        x = xp.take_along_axis(x, idx, axis=-1)
    return _sequential(x, fmt, xp)


def _lanes(x, fmt: Format, xp):
    """The ``torch`` order: interleaved lanes of a 512-bit vector, then their join."""
    if fmt.is_emulated:
        f32 = get_format("float32")
        return quantize(_lanes(xp.astype(x, xp_dtype(xp, f32.carrier)), f32, xp), fmt)
    lanes = 16 if fmt.precision <= 24 else 8
    n = x.shape[-1]
    if n < lanes:  # below one vector PyTorch adds the terms left to right
        return _sequential(x, fmt, xp)
    acc = x[..., :lanes]
    for k in range(lanes, n, lanes):
        part = x[..., k : min(k + lanes, n)]
        m = part.shape[-1]
        acc = (
            quantize(acc + part, fmt)
            if m == lanes
            else xp.concat([quantize(acc[..., :m] + part, fmt), acc[..., m:]], axis=-1)
        )
    if lanes == 8:
        return _sequential(acc, fmt, xp)
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = quantize(acc[..., :half] + acc[..., half:], fmt)
    return acc[..., 0]


def _sequential(x, fmt: Format, xp):
    n = x.shape[-1]
    if n == 0:
        return xp.zeros(x.shape[:-1], dtype=xp_dtype(xp, fmt.carrier))
    if not fmt.is_emulated:
        # A strict left-to-right loop in the array's own dtype, where the backend has one.
        fast = native_sum(x, "sequential")
        if fast is not None:
            return fast
    acc = xp.asarray(x[..., 0], copy=True)
    for j in range(1, n):
        acc = quantize(acc + x[..., j], fmt)
    return acc


def _pairwise(x, fmt: Format, xp):
    n = x.shape[-1]
    if fmt.plain.name == "float16":
        # NumPy's HALF_pairwise_sum keeps float32 partial sums and rounds once.
        f32 = get_format("float32")
        x32 = xp.astype(x, xp_dtype(xp, f32.carrier), copy=False)  # only read
        return quantize(_pairwise(x32, f32, xp), fmt)
    if not fmt.is_emulated and x.dtype == xp_dtype(xp, fmt.carrier):
        # NumPy's own reduction runs exactly this tree along a contiguous last axis, ...
        fast = native_sum(x, "pairwise")
        if fast is not None:
            return fast
        # ... added to its identity +0 (which turns a -0 sum, and an empty one, into +0).
        return _pairwise_tree(x, n, fmt, xp) + 0.0
    return _pairwise_tree(x, n, fmt, xp)


def _pairwise_tree(x, n: int, fmt: Format, xp):
    """NumPy's ``pairwise_sum`` on ``x[..., :n]`` (``n = x.shape[-1]``), each addition rounded
    to ``fmt``.

    The tree's leaves (runs of at most 128 terms) of one length are evaluated together, one
    array operation per step for all of them, and then joined up the tree: the same additions
    in the same order as leaf by leaf, in far fewer (and larger) array operations.
    """
    if n <= _PAIRWISE_BLOCK:
        return _pairwise_leaf(x, n, fmt, xp)
    leaves = _leaves(0, n)
    value = {}
    for length in sorted({m for _, m in leaves}):
        starts = [i for i, m in leaves if m == length]
        idx = xp.asarray([i + k for i in starts for k in range(length)])
        group = xp.reshape(xp.take(x, idx, axis=x.ndim - 1), (*x.shape[:-1], len(starts), length))
        sums = _pairwise_leaf(group, length, fmt, xp)
        value.update({i: sums[..., j] for j, i in enumerate(starts)})
    return _join(0, n, value, fmt)


def _leaves(start: int, n: int) -> list:
    """``(start, length)`` of the leaves of NumPy's pairwise tree over ``n`` terms."""
    if n <= _PAIRWISE_BLOCK:
        return [(start, n)]
    n2 = n // 2
    n2 -= n2 % _UNROLL
    return _leaves(start, n2) + _leaves(start + n2, n - n2)


def _join(start: int, n: int, value: dict, fmt: Format):
    """The inner nodes of the pairwise tree over the leaf sums ``value[start]``."""
    if n <= _PAIRWISE_BLOCK:
        return value[start]
    n2 = n // 2
    n2 -= n2 % _UNROLL
    return _add(_join(start, n2, value, fmt), _join(start + n2, n - n2, value, fmt), fmt)


def _add(a, b, fmt: Format):
    """``RN(a + b)`` (into reused arrays inside a training step)."""
    return quantize_into(workspace.ufunc(np.add, a, b), fmt)


def _pairwise_leaf(x, n: int, fmt: Format, xp):
    """A leaf of NumPy's pairwise tree (``n <= 128`` terms along the last axis): below 8 terms
    left to right from ``-0.0``, else 8 interleaved partial sums joined as a balanced tree,
    then the remainder left to right."""

    def add(a, b):
        return _add(a, b, fmt)

    if n < _UNROLL:
        res = xp.full(x.shape[:-1], -0.0, dtype=xp_dtype(xp, fmt.carrier))
        for i in range(n):
            res = add(res, x[..., i])
        return res
    r = x[..., :_UNROLL]
    i = _UNROLL
    while i < n - (n % _UNROLL):
        r = add(r, x[..., i : i + _UNROLL])
        i += _UNROLL
    res = add(
        add(add(r[..., 0], r[..., 1]), add(r[..., 2], r[..., 3])),
        add(add(r[..., 4], r[..., 5]), add(r[..., 6], r[..., 7])),
    )
    for j in range(i, n):
        res = add(res, x[..., j])
    return res
