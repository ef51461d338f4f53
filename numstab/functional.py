"""Forward/backward pairs in a declared format: linear, ReLU, gather (and the losses).

Every function takes its format (or a :class:`~numstab.precision.PrecisionPolicy`) and returns
arrays in that format's carrier dtype (float32 for float16/bfloat16, whose every operation is
followed by one rounding). Forward functions return ``(out, cache)``; the matching backward
takes the upstream gradient and the cache.

The losses live in :mod:`numstab.losses` (one module each); their entries are re-exported
here: :func:`loss_forward`, :func:`loss_backward`, :func:`collapse_mask`,
:func:`stablemax_s`, :func:`reduce_loss`.

Backends
--------
Every function takes its array namespace from its inputs (:func:`numstab.backend.namespace`)
and uses array-API standard functions, plus the named hooks of :mod:`numstab.backend` for what
the standard lacks (``take_at``/``put_at`` for ``a[i, y_i]``, ``errstate``, the gather plan's
segment-sum matrix). The same code runs on NumPy, on CuPy and on any array-API library such as
``array_api_strict`` (float32/float64 formats there: float16/bfloat16 emulation needs bit
views), and gives NumPy's bits wherever the backend's elementary operations do.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

from numstab import workspace
from numstab.backend import (
    errstate,
    namespace,
    sparse_rows_matrix,
    to_numpy,
    xp_dtype,
)
from numstab.checks import check_bias as _check_bias
from numstab.checks import check_cache as _check_cache
from numstab.checks import check_eps as _check_eps  # noqa: F401  (numstab.audit uses it)
from numstab.checks import check_float_array as _check_float_array
from numstab.checks import check_policy as _check_policy
from numstab.checks import is_int as _is_int
from numstab.fastround import quantize_into
from numstab.losses import (
    LOSS_KINDS,
    REDUCTIONS,
    LossCache,
    collapse_mask,
    loss_backward,
    loss_forward,
    reduce_loss,
    stablemax_s,
)
from numstab.losses.rounding import Rounding
from numstab.precision import PrecisionPolicy, get_format, quantize
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
    "reduce_loss",
    "relu_backward",
    "relu_forward",
    "stablemax_s",
]


# --- matrix products ----------------------------------------------------------------------


def gemm(a, b, policy: PrecisionPolicy):
    """``a @ b`` accumulated in ``policy.compute`` and rounded once to ``policy.storage``.

    This is the tensor-core model of a low-precision GEMM. It never calls NumPy's float16
    matmul (which has no BLAS path): 16-bit formats are carried in float32, multiplied by
    float32 BLAS, and rounded once.

    Parameters
    ----------
    a : array, shape (m, k); b : array, shape (k, n)
        Storage-format values in the storage carrier dtype (one backend for both).

    Returns
    -------
    array, shape (m, n), storage carrier dtype
        IEEE results for non-finite operands (``inf · 0`` gives NaN; no warning). Views are
        handed to BLAS as they are, and BLAS may pick another kernel for them (a transposed
        operand goes to the transposed gemm, a strided single row to gemv with its stride):
        the result can then differ from a C-contiguous copy's in the last bits, within the
        same error bound.

    Raises
    ------
    TypeError
        ``a`` or ``b`` not a floating array, ``policy`` not a :class:`PrecisionPolicy`.
    ValueError
        ``a`` or ``b`` not 2-D, or inner dimensions that differ.
    """
    _check_policy(policy)
    _check_float_array(a, "a", 2)
    _check_float_array(b, "b", 2)
    _check_inner(a, b)
    return _gemm(a, b, policy)


def _check_inner(a, b) -> None:
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"gemm needs a (m, k) and b (k, n) with the same k, got shapes {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )


def _gemm(a, b, policy: PrecisionPolicy):
    """:func:`gemm` on checked arguments."""
    xp = namespace(a, b)
    c = xp_dtype(xp, policy.compute.carrier)
    with errstate(xp, over="ignore", invalid="ignore"):
        a, b = xp.astype(a, c, copy=False), xp.astype(b, c, copy=False)
        if xp is np:  # the same BLAS call, written into a reused array
            out = np.matmul(a, b, out=workspace.empty((a.shape[0], b.shape[1]), c))
        else:
            out = a @ b
        return quantize_into(out, policy.storage)


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
    _check_policy(policy)
    _check_float_array(x, "x", 2)
    _check_float_array(w, "w", 2)
    _check_inner(x, w)
    _check_bias(b, w.shape[1])
    y = _gemm(x, w, policy)
    if b is not None:
        xp = namespace(y)
        with errstate(xp, over="ignore", invalid="ignore"):
            y = Rounding(policy.storage, xp=xp).add(y, b)  # one rounding, recorded
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
    _check_policy(policy)
    x, w, has_bias = _check_cache(cache, "linear_forward")
    _check_float_array(dy, "dy", 2)
    if tuple(dy.shape) != (x.shape[0], w.shape[1]):
        raise ValueError(
            f"dy must have shape {(x.shape[0], w.shape[1])} (samples, n_out) to match the "
            f"forward pass, got {tuple(dy.shape)}"
        )
    dw = _gemm(x.T, dy, policy)
    dx = _gemm(dy, w.T, policy) if need_dx else None
    db = _bias_grad(dy, policy) if has_bias else None
    return dx, dw, db


def _bias_grad(dy, policy: PrecisionPolicy):
    """``Σ_i dy_i``: NumPy's pairwise tree over the sample axis in the compute carrier (the
    carrier's own additions, as ``numpy.sum`` does), rounded once to storage."""
    xp = namespace(dy)
    c = policy.compute.carrier
    with errstate(xp, over="ignore", invalid="ignore"):
        total = ordered_sum(xp.astype(dy, xp_dtype(xp, c), copy=False).T, get_format(c))
        return quantize(total, policy.storage)


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

    The matrix comes from :func:`numstab.backend.sparse_rows_matrix` for the backend of the
    arrays the plan will multiply (``like``): SciPy CSR for NumPy, ``cupyx`` CSR for CuPy,
    and for other array-API libraries a :class:`~numstab.backend.SegmentRows`, which adds in
    the CSR kernel's order with standard functions (the same bits as NumPy's plan).
    """

    n_rows: int
    n_samples: int
    matrix: object = field(repr=False)  # (n_rows, n_samples): SciPy CSR on NumPy

    @classmethod
    def build(cls, idx, n_rows: int, *, like=None) -> GatherPlan:
        """Plan for index array ``idx`` of shape (N, k) into a weight with ``n_rows`` rows.

        ``like``: an array of the backend the plan is for (default: the backend of ``idx``).
        The indices are validated on the host.
        """
        if like is None and hasattr(idx, "dtype") and not isinstance(idx, np.ndarray):
            like = idx
        idx = to_numpy(idx) if hasattr(idx, "dtype") else np.asarray(idx)
        if idx.ndim != 2 or idx.dtype.kind not in "iu" or idx.shape[1] < 1:
            raise ValueError(
                f"gather indices must be a 2-D integer array with at least one column, got "
                f"{idx.dtype} with shape {idx.shape}"
            )
        if isinstance(n_rows, (bool, np.bool_)) or not isinstance(n_rows, numbers.Integral):
            raise TypeError(f"n_rows must be an integer, got n_rows={n_rows!r}")
        if not 1 <= n_rows <= np.iinfo(np.int64).max:
            raise ValueError(f"n_rows must lie in [1, 2**63), got n_rows={n_rows}")
        n_rows = int(n_rows)
        if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
            raise ValueError(
                f"gather indices must lie in [0, {n_rows}), got range [{idx.min()}, {idx.max()}]"
            )
        n = idx.shape[0]
        flat = idx.reshape(-1)  # sample-major: (i0, slot0), (i0, slot1), (i1, slot0), ...
        samples = np.repeat(np.arange(n), idx.shape[1])
        # Duplicates are summed (a sample indexing one row twice contributes twice) and the
        # column indices sorted: each segment is added in sample order.
        mat = sparse_rows_matrix(flat, samples, (n_rows, n), like)
        return cls(n_rows=n_rows, n_samples=n, matrix=mat)

    def segment_sum(self, rows):
        """``onehot.T @ rows`` for ``rows`` of shape (N, n), accumulated in ``rows.dtype``."""
        mat = self.matrix
        if mat.dtype != rows.dtype:
            mat = mat.astype(rows.dtype)  # small integer counts: exact in any float format
        return mat @ rows


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

    Raises
    ------
    ValueError, TypeError
        Indices not a 2-D integer array with a column, an index ``>= n_rows``; ``w`` or ``b``
        not floating arrays of matching shapes; ``policy`` not a PrecisionPolicy. Indices are
        not scanned on this hot path: a negative index counts from the end, as in NumPy
        (:meth:`GatherPlan.build` and the Dataset validate indices once).
    """
    _check_policy(policy)
    if not hasattr(idx, "dtype"):
        idx = np.asarray(idx)
    if not _is_int(idx.dtype, idx) or idx.ndim != 2 or idx.shape[1] < 1:
        raise ValueError(
            f"gather indices must be a 2-D integer array with at least one column, got "
            f"{idx.dtype} with shape {tuple(idx.shape)}"
        )
    _check_float_array(w, "w", 2)
    _check_bias(b, w.shape[1])
    xp = namespace(w)
    idx = xp.asarray(idx)  # no copy when it already lives there
    c = xp_dtype(xp, policy.compute.carrier)
    with errstate(xp, over="ignore", invalid="ignore"):
        try:
            if xp is np and w.dtype == c:  # the rows gathered into reused arrays
                h = _take_rows(w, idx, c)
            else:
                # ``take`` returns a new array: ``astype(copy=False)`` may keep it as the sum.
                h = xp.astype(xp.take(w, idx[:, 0], axis=0), c, copy=False)
                for j in range(1, idx.shape[1]):
                    h += xp.take(w, idx[:, j], axis=0)
        except IndexError:
            raise ValueError(
                f"gather indices must lie in [0, {w.shape[0]}) (the rows of w), got range "
                f"[{int(xp.min(idx))}, {int(xp.max(idx))}]"
            ) from None
        h += 0.0  # -0 + +0 = +0, as in a product with a one-hot row
        h = quantize_into(h, policy.storage)
        if b is not None:
            h = quantize(h + b, policy.storage)
    return h, (idx, w.shape[0], b is not None)


def _take_rows(w, idx, c):
    """``w[idx[:, 0]] + w[idx[:, 1]] + ...`` (left to right) in arrays of the workspace.

    ``take(mode="raise")`` would copy through a temporary buffer: ``mode="wrap"`` writes
    straight into ``out`` and, after the range check here, indexes as ``"raise"`` does
    (negative indices from the end)."""
    n = w.shape[0]
    if idx.size and (idx.max() >= n or idx.min() < -n):
        raise IndexError("gather index out of range")
    shape = (idx.shape[0], w.shape[1])
    h = np.take(w, idx[:, 0], axis=0, out=workspace.empty(shape, c), mode="wrap")
    if idx.shape[1] > 1:
        rows = workspace.empty(shape, c)
        for j in range(1, idx.shape[1]):
            h += np.take(w, idx[:, j], axis=0, out=rows, mode="wrap")
    return h


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
    _, n_rows, has_bias = _check_cache(cache, "gather_forward")
    if not isinstance(plan, GatherPlan):
        raise TypeError(f"plan must be a GatherPlan (GatherPlan.build), got {type(plan).__name__}")
    _check_policy(policy)
    _check_float_array(dh, "dh", 2)
    if plan.n_rows != n_rows or plan.n_samples != dh.shape[0]:
        raise ValueError(
            f"GatherPlan is for {plan.n_samples} samples into {plan.n_rows} rows, but the "
            f"gradient has {dh.shape[0]} samples and the weight {n_rows} rows"
        )
    xp = namespace(dh)
    c = xp_dtype(xp, policy.compute.carrier)
    with errstate(xp, over="ignore", invalid="ignore"):
        dw = plan.segment_sum(xp.astype(dh, c, copy=False))
        db = _bias_grad(dh, policy) if has_bias else None
        return quantize_into(dw, policy.storage), db


# --- ReLU ---------------------------------------------------------------------------------


def relu_forward(x):
    """``max(x, 0)`` (exact in every format; NaN stays NaN). Returns ``(y, y)``.

    ``x`` must be a floating array (TypeError otherwise)."""
    _check_float_array(x, "x")
    xp = namespace(x)
    y = workspace.ufunc(np.maximum, x, 0) if xp is np else xp.maximum(x, 0)
    return y, y


def relu_backward(dy, y):
    """``dy · [y > 0]`` (the subgradient 0 is used at 0).

    A multiplication by the 0/1 mask (cast to ``dy``'s dtype: the standard does not multiply
    floats by booleans, and NumPy is faster with the explicit cast): exact, and 6x faster than
    ``np.where`` on the dense, unpredictable masks of a hidden layer. (``inf · 0`` would give
    NaN where ``np.where`` gives 0; an infinite gradient has already stopped the run before
    this matters.)
    ``dy`` and ``y`` must be floating arrays of one shape (TypeError / ValueError otherwise).
    """
    _check_float_array(dy, "dy")
    _check_float_array(y, "y")
    if dy.shape != y.shape:
        raise ValueError(
            f"dy and y must have the same shape, got {tuple(dy.shape)} and {tuple(y.shape)}"
        )
    xp = namespace(dy, y)
    with errstate(xp, invalid="ignore"):
        if xp is np:  # the 0/1 mask written as dy's dtype, then multiplied in place
            g = np.greater(y, 0, out=workspace.empty(dy.shape, dy.dtype))
            return np.multiply(dy, g, out=g)
        return dy * xp.astype(y > 0, dy.dtype)


