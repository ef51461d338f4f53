"""Forward/backward pairs in a declared format: linear, ReLU, gather, and the three losses.

Every function takes its format (or a :class:`~numstab.precision.PrecisionPolicy`) and returns
arrays in that format's carrier dtype (float32 for float16/bfloat16, whose every operation is
followed by one rounding). Forward functions return ``(out, cache)``; the matching backward
takes the upstream gradient and the cache.

Losses
------
``softmax``
    Cross-entropy as frameworks compute it: ``lsm = (z - m) - log Σ exp(z - m)`` with
    ``m = max z``, loss ``-lsm_y``, logit gradient ``(exp(lsm) - onehot) · dl`` (PyTorch's
    ``log_softmax`` backward). When the tail of ``Σ exp(z - m)`` is absorbed the sum is exactly
    1, the loss exactly 0 and the target gradient exactly 0: Softmax Collapse.
``stablemax``
    StableMax cross-entropy, ``s(x) = x + 1`` (x ≥ 0), ``1 / (1 - x + eps)`` (x < 0),
    loss ``-log(s_y / S)``, ``S = Σ s(z)``. ``eps`` defaults to 0 (the paper's definition);
    the authors' released code uses ``eps = 1e-30``, which in float32/float64 changes
    ``1 - x`` only when ``|1 - x| < 2**-p · 1e-30``, i.e. never for finite logits.
``softmax_stable``
    Absorption-free softmax cross-entropy, "what the math says": the max term is taken out of
    the sum, ``loss = (m - z_y) + log1p(s)`` with ``s = Σ_{k≠k*} exp(z_k - m)``, target
    gradient ``-s / (1 + s)`` when the target is the argmax (SciPy's ``logsumexp`` does the
    same). It never collapses while ``s`` is representable.

Elementary functions
--------------------
``exp``, ``log`` and ``log1p`` go through :mod:`numstab.elementary` in the mode the caller
declares (``elementary=``, a :class:`~numstab.precision.PrecisionPolicy`'s ``elementary``):
``"correct"`` (default) rounds each once, correctly, to the loss format; ``"libm"`` calls the
array library's function in the carrier dtype and rounds its result (older runs' bits). The
two backward fixes below (one rounding of the target entry, no ``s**2`` in StableMax's
backward) apply in both modes.

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

import math
import numbers
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from numstab.backend import (
    errstate,
    namespace,
    put_at,
    sparse_rows_matrix,
    take_at,
    to_numpy,
    xp_dtype,
)
from numstab.elementary import apply as _elementary
from numstab.elementary import check_mode
from numstab.precision import Format, PrecisionPolicy, available_formats, get_format, quantize
from numstab.summation import check_order, ordered_sum

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
    "relu_backward",
    "relu_forward",
    "stablemax_s",
]

#: Loss kinds understood by :func:`loss_forward`.
LOSS_KINDS = ("softmax", "stablemax", "softmax_stable")
#: Reductions understood by :func:`loss_forward`.
REDUCTIONS = ("mean", "none")


def _check_choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(allowed)}")
    return value


# --- input checks -------------------------------------------------------------------------
# Cheap on purpose (type, dtype, ndim, shape; never a scan of the data): they run on the
# training step's hot path. Index ranges are checked once where they are built
# (GatherPlan.build, the Dataset); here an index >= the axis length raises ValueError
# (NumPy's IndexError, translated) and a negative one counts from the end, as in NumPy.

_BF16 = np.dtype(ml_dtypes.bfloat16)
_FLOAT_NAMES = "float16, bfloat16, float32, float64 or longdouble"


def _is_float(dt, x=None) -> bool:
    if isinstance(dt, np.dtype):  # NumPy and CuPy
        return dt.kind == "f" or dt == _BF16
    return namespace(x).isdtype(dt, "real floating")


def _is_int(dt, x=None) -> bool:
    if isinstance(dt, np.dtype):
        return dt.kind in "iu"
    return namespace(x).isdtype(dt, "integral")


def _check_float_array(x, name: str, ndim: int | None = None):
    """``x`` must be an array (NumPy, CuPy or array-API) of a floating format (of ``ndim``
    dimensions)."""
    dt = getattr(x, "dtype", None)
    if dt is None or not hasattr(x, "ndim"):
        raise TypeError(
            f"{name} must be a NumPy or CuPy array (or an array-API array) of {_FLOAT_NAMES}, "
            f"got {type(x).__name__}"
        )
    if not _is_float(dt, x):
        raise TypeError(f"{name} must be a floating array ({_FLOAT_NAMES}), got dtype {dt}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def _check_policy(policy) -> PrecisionPolicy:
    if not isinstance(policy, PrecisionPolicy):
        raise TypeError(
            "policy must be a PrecisionPolicy (e.g. PrecisionPolicy.uniform('float32')), "
            f"got {type(policy).__name__}"
        )
    return policy


def _check_bias(b, n_out: int):
    if b is not None:
        _check_float_array(b, "b", 1)
        if b.shape[0] != n_out:
            raise ValueError(f"bias b must have shape ({n_out},) (n_out), got {tuple(b.shape)}")
    return b


def _check_cache(cache, what: str) -> tuple:
    if not (isinstance(cache, tuple) and len(cache) == 3):
        raise TypeError(f"cache must be the tuple returned by {what}, got {type(cache).__name__}")
    return cache


def _format(fmt) -> Format:
    if fmt is None:  # np.dtype(None) is float64: never guess a format
        raise ValueError(f"unknown format None; valid formats: {', '.join(available_formats())}")
    return get_format(fmt)


def _check_eps(eps):
    """StableMax's epsilon: a finite real number ``>= 0`` (as :mod:`numstab.exact` requires)."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(
            f"eps must be a real number >= 0, got eps={eps!r} of type {type(eps).__name__}"
        )
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got eps={eps!r}")
    return eps


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
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"gemm needs a (m, k) and b (k, n) with the same k, got shapes {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
    xp = namespace(a, b)
    c = xp_dtype(xp, policy.compute.carrier)
    with errstate(xp, over="ignore", invalid="ignore"):
        out = xp.astype(a, c, copy=False) @ xp.astype(b, c, copy=False)
        return quantize(out, policy.storage)


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
    y = gemm(x, w, policy)
    if b is not None:
        _check_bias(b, w.shape[1])
        with errstate(namespace(y), over="ignore", invalid="ignore"):
            y = quantize(y + b, policy.storage)
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
    x, w, has_bias = _check_cache(cache, "linear_forward")
    _check_float_array(dy, "dy", 2)
    if tuple(dy.shape) != (x.shape[0], w.shape[1]):
        raise ValueError(
            f"dy must have shape {(x.shape[0], w.shape[1])} (samples, n_out) to match the "
            f"forward pass, got {tuple(dy.shape)}"
        )
    dw = gemm(x.T, dy, policy)
    dx = gemm(dy, w.T, policy) if need_dx else None
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
        h = quantize(h, policy.storage)
        if b is not None:
            h = quantize(h + b, policy.storage)
    return h, (idx, w.shape[0], b is not None)


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
        return quantize(dw, policy.storage), db


# --- ReLU ---------------------------------------------------------------------------------


def relu_forward(x):
    """``max(x, 0)`` (exact in every format; NaN stays NaN). Returns ``(y, y)``.

    ``x`` must be a floating array (TypeError otherwise)."""
    _check_float_array(x, "x")
    y = namespace(x).maximum(x, 0)
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
        return dy * xp.astype(y > 0, dy.dtype)


# --- losses -------------------------------------------------------------------------------


def stablemax_s(x, fmt, *, eps: float = 0.0):
    """StableMax's ``s(x)`` in a format: ``x + 1`` for ``x >= 0``, ``1 / (1 - x + eps)`` else.

    Each operation is rounded to ``fmt``. ``s`` maps ``-inf`` to 0 and ``+inf`` to ``inf``;
    NaN gives NaN. ``eps`` must be finite and ``>= 0`` (ValueError / TypeError otherwise).

    Returns
    -------
    s : ndarray, shape of ``x``
    d : ndarray
        The rounded denominator ``1 - x + eps`` (1 where ``x >= 0``), reused by the backward.
    """
    fmt = _format(fmt)
    _check_eps(eps)
    xp = namespace(x)
    with errstate(xp, over="ignore", invalid="ignore", divide="ignore"):
        x = quantize(x, fmt)
        pos = x >= 0
        d = quantize(1.0 - xp.where(pos, 0.0, x), fmt)
        if eps:
            # eps rounded to fmt, added as a Python float: exact in the carrier dtype.
            d = quantize(d + float(quantize(np.asarray(eps, dtype=np.float64), fmt)), fmt)
        s = xp.where(pos, quantize(x + 1.0, fmt), quantize(1.0 / d, fmt))
    return s, xp.where(pos, 1.0, d)


def collapse_mask(
    z,
    fmt,
    *,
    kind: str = "softmax",
    order: str = "pairwise",
    eps: float = 0.0,
    elementary: str = "correct",
):
    """Rows whose max-shifted normaliser is exactly 1 in ``fmt`` (Softmax Collapse).

    Softmax: ``Σ_k exp(z_k - max z) == 1``; StableMax: ``Σ_k s(z_k) / s(max z) == 1``; every
    term and partial sum rounded to ``fmt``, summed in ``order``. A row with a NaN or ``+inf``
    logit, or with every logit ``-inf``, is not collapsed (its sum is NaN); other ``-inf``
    logits contribute 0; a row of one finite class always is collapsed.

    Parameters
    ----------
    z : ndarray, shape (N, C)
    fmt : str or Format
    kind : {"softmax", "stablemax"} ("softmax_stable" measures the softmax sum)
    elementary : {"correct", "libm"}
        How ``exp`` is evaluated (:mod:`numstab.elementary`).

    Returns
    -------
    ndarray of bool, shape (N,)
    """
    fmt = _format(fmt)
    _check_choice(kind, LOSS_KINDS, "loss kind")
    check_order(order)
    check_mode(elementary)
    xp = namespace(z)
    with errstate(xp, over="ignore", invalid="ignore", divide="ignore"):
        z = quantize(z, fmt)
        _check_logits_shape(z)
        if kind == "stablemax":
            s, _ = stablemax_s(z, fmt, eps=eps)
            smax = xp.max(s, axis=-1, keepdims=True)
            terms = quantize(s / smax, fmt)
        else:
            terms = _softmax_terms(z, fmt, elementary)[1]
    return ordered_sum(terms, fmt, order) == 1


def _check_logits_shape(z):
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(
            f"logits must be 2-D (samples, classes) with at least one class, got shape "
            f"{tuple(z.shape)}"
        )


def _softmax_terms(z, fmt: Format, elementary: str):
    """``d = fl(z - max z)`` and ``e = RN(exp(d))`` in ``fmt`` (``libm``: ``fl(exp_libm(d))``)."""
    xp = namespace(z)
    with errstate(xp, invalid="ignore", over="ignore"):
        m = xp.max(z, axis=-1, keepdims=True)
        d = quantize(z - m, fmt)
        e = _elementary("exp", d, fmt, elementary, xp)
    return d, e


@dataclass(frozen=True)
class LossCache:
    """What a loss forward keeps for its backward and for the collapse metrics.

    Attributes
    ----------
    kind, fmt, order : the loss, its format and reduction order
    elementary : how exp / log / log1p were evaluated ("correct" or "libm")
    labels : int ndarray (N,)
    normaliser : ndarray (N,)
        The computed sum: ``Σ exp(z - m)`` (softmax), ``Σ s(z)`` (StableMax) or the tail
        ``s`` (absorption-free softmax), in ``fmt``.
    probs : ndarray (N, C)
        The probabilities the backward uses (``exp(lsm)``, ``s / S`` or ``e / (1 + s)``).
    extra : tuple
        Kind-specific arrays.
    """

    kind: str
    fmt: Format
    order: str
    labels: np.ndarray
    normaliser: np.ndarray
    probs: np.ndarray
    extra: tuple
    elementary: str = "correct"


def loss_forward(
    z,
    labels,
    *,
    kind: str = "softmax",
    fmt="float32",
    order: str = "pairwise",
    eps: float = 0.0,
    elementary: str = "correct",
):
    """Per-sample cross-entropy loss in a format.

    Parameters
    ----------
    z : ndarray, shape (N, C)
        Logits (any float dtype; rounded to ``fmt`` first, exactly widened if narrower).
    labels : int ndarray, shape (N,)
    kind : {"softmax", "stablemax", "softmax_stable"}
        See the module docstring for the formulas.
    fmt : str or Format
        Loss format (the paper's ``softmax_precision``).
    order : {"pairwise", "sequential", "wide", "sorted"}
        Summation order of the normaliser.
    eps : float
        StableMax denominator epsilon (``softmax`` kinds ignore it).
    elementary : {"correct", "libm"}
        How ``exp``/``log``/``log1p`` are evaluated (:mod:`numstab.elementary`): correctly
        rounded to ``fmt``, or the array library's functions (older runs' bits).

    Returns
    -------
    loss : ndarray, shape (N,), carrier dtype of ``fmt``
        ``-log p_y``; exactly 0 for collapsed softmax rows. Rounding, per op (``RN``: one
        correct rounding to ``fmt``): softmax ``d = RN(z - m)``, ``e = RN(exp d)``, ``S`` the
        ordered sum, ``lse = RN(log S)``, ``lsm = RN(d - lse)``, ``p = RN(exp lsm)``, loss
        ``-lsm_y``; StableMax ``p = RN(s / S)``, loss ``-RN(log p_y)``; softmax_stable
        ``loss = RN(RN(m - z_y) + RN(log1p s))``, ``p = RN(e / RN(1 + s))``. ``inf``/NaN
        logits give NaN or inf losses as IEEE arithmetic says (the training loop stops on
        them; no warning).
    cache : LossCache

    Raises
    ------
    TypeError
        Logits of a non-floating dtype, labels not integers, ``eps`` not a real number.
    ValueError
        Logits not 2-D or without classes, labels not of shape (N,), a label ``>= C``, an
        unknown kind / format / order, ``eps`` negative or not finite. Labels are not scanned
        for negative values on this hot path: a negative label counts from the end, as NumPy
        indexing does (the Dataset and :mod:`numstab.audit` validate labels).
    """
    fmt = _format(fmt)
    _check_choice(kind, LOSS_KINDS, "loss kind")
    check_order(order)
    check_mode(elementary)
    xp = namespace(z)
    with errstate(xp, invalid="ignore", over="ignore", divide="ignore"):
        z = quantize(z, fmt)
    _check_logits_shape(z)
    labels = xp.asarray(labels)  # no copy when it already lives there
    if not _is_int(labels.dtype, labels):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    if tuple(labels.shape) != (z.shape[0],):
        raise ValueError(
            f"labels must have shape ({z.shape[0]},) to match the logits {tuple(z.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    try:
        loss, total, probs, extra = _loss_forward(z, labels, kind, fmt, order, eps, elementary, xp)
    except IndexError:
        raise ValueError(
            f"labels must lie in [0, {z.shape[1]}) (the number of classes), got range "
            f"[{int(xp.min(labels))}, {int(xp.max(labels))}]"
        ) from None
    cache = LossCache(
        kind=kind,
        fmt=fmt,
        order=order,
        labels=labels,
        normaliser=total,
        probs=probs,
        extra=extra,
        elementary=elementary,
    )
    return loss, cache


def _loss_forward(z, labels, kind, fmt, order, eps, elementary, xp):
    def elem(name, x):
        return _elementary(name, x, fmt, elementary, xp)

    with errstate(xp, invalid="ignore", over="ignore", divide="ignore"):
        if kind == "softmax":
            d, e = _softmax_terms(z, fmt, elementary)
            total = ordered_sum(e, fmt, order)
            lse = elem("log", total)
            lsm = quantize(d - lse[:, None], fmt)
            probs = elem("exp", lsm)
            loss = 0.0 - take_at(lsm, labels)  # 0 - 0 is +0, where -(0) would print -0
            extra = ()
        elif kind == "stablemax":
            s, _ = stablemax_s(z, fmt, eps=eps)
            total = ordered_sum(s, fmt, order)
            probs = quantize(s / total[:, None], fmt)
            loss = -elem("log", take_at(probs, labels))
            extra = (s, z)
        else:
            _, e = _softmax_terms(z, fmt, elementary)
            top = xp.argmax(z, axis=-1)
            e = put_at(e, top, 0.0)  # the max term is taken out of the sum exactly
            total = ordered_sum(e, fmt, order)
            denom = quantize(1.0 + total, fmt)
            probs = quantize(e / denom[:, None], fmt)
            probs = put_at(probs, top, quantize(1.0 / denom, fmt))
            m = take_at(z, top)
            loss = quantize(quantize(m - take_at(z, labels), fmt) + elem("log1p", total), fmt)
            extra = (top, denom)
    return loss, total, probs, extra


def loss_backward(cache: LossCache, dloss):
    """Logit gradient of :func:`loss_forward`, scaled by the upstream per-sample gradient.

    Parameters
    ----------
    cache : LossCache
    dloss : float or ndarray (N,)
        ``∂(total)/∂loss_i``: ``1/N`` for a mean (rounded to the loss format), 1 for a sum.

    Returns
    -------
    ndarray, shape (N, C), loss carrier dtype
        With ``dl = RN(dloss)`` and ``p`` the forward's rounded probabilities, each entry is
        one correct rounding ``RN`` to the loss format unless stated:

        * softmax (PyTorch's ``log_softmax`` backward): ``RN(p_k·dl)`` off target and
          ``RN(dl·(p_y - 1))`` at the target -- one rounding of the exact value, not
          ``RN(RN(p_y·dl) - dl)`` (which halves the gradient of a row about to collapse);
        * stablemax: ``g_k = dl·(p_k - δ_ky)·c_k`` with ``c_k = s'(z_k)/s_k``, i.e. ``s_k`` for
          ``z_k < 0`` (``s' = s**2``) and ``1/s_k`` for ``z_k >= 0``: ``t_k = RN(dl·p_k)``
          (target: ``RN(dl·(p_y - 1))``), then ``RN(t_k·s_k)`` or ``RN(t_k/s_k)``. ``s**2``
          is never formed, so logits down to ``-1/(smallest normal)`` keep their gradient;
        * softmax_stable: ``RN(p_k·dl)`` off target; at a target that is the argmax
          ``RN(RN(-s/(1+s))·dl)`` (two roundings, no cancellation), elsewhere
          ``RN(dl·(p_y - 1))``.

        These two fixes hold in both elementary modes (no exp/log is evaluated here).
        Non-finite ``dloss`` gives NaN where the exact product is not defined.
    """
    if not isinstance(cache, LossCache):
        raise TypeError(
            f"cache must be the LossCache returned by loss_forward, got {type(cache).__name__}"
        )
    fmt = cache.fmt
    n = cache.probs.shape[0]
    y = cache.labels
    xp = namespace(cache.probs)
    host = not hasattr(dloss, "dtype") or isinstance(dloss, (np.ndarray, np.generic))
    d = np.asarray(dloss) if host else dloss
    if not (_is_float(d.dtype, d) or _is_int(d.dtype, d)):
        raise TypeError(
            f"dloss must be a real number or a real array of shape ({n},), got {dloss!r:.80} "
            f"(dtype {d.dtype})"
        )
    if tuple(d.shape) not in ((), (n,)):
        raise ValueError(f"dloss must be a scalar or have shape ({n},), got shape {tuple(d.shape)}")
    with np.errstate(over="ignore"), errstate(xp, over="ignore"):
        d = np.asarray(d, dtype=np.float64) if host else d
        d = xp.asarray(d, dtype=xp_dtype(xp, np.float64))
        dl = quantize(xp.broadcast_to(d, (n,)), fmt)[:, None]
    with errstate(xp, invalid="ignore", over="ignore", divide="ignore"):
        p_y = take_at(cache.probs, y)
        g = quantize(cache.probs * dl, fmt)
        if cache.kind == "softmax":
            return put_at(g, y, _times_p_minus_one(p_y, dl[:, 0], fmt, xp))
        if cache.kind == "stablemax":
            s, z = cache.extra
            g = put_at(g, y, _times_p_minus_one(p_y, dl[:, 0], fmt, xp))
            # s'(x)/s(x) is s(x) for x < 0 (s' = s**2) and 1/s(x) for x >= 0 (s' = 1).
            return xp.where(z < 0, quantize(g * s, fmt), quantize(g / s, fmt))
        top, denom = cache.extra
        # Target is the argmax: p_y - 1 = -s / (1 + s), no cancellation.
        tgt = quantize(quantize(-cache.normaliser / denom, fmt) * dl[:, 0], fmt)
        other = _times_p_minus_one(p_y, dl[:, 0], fmt, xp)
        return put_at(g, y, xp.where(top == y, tgt, other))


# --- one rounding of dl * (p - 1) -----------------------------------------------------------


def _two_sum(a, b):
    """``a + b = s + e`` exactly (Knuth's TwoSum; ``s = fl(a + b)``)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _two_prod(a, b, split: float):
    """``a · b = p + e`` exactly (Dekker; ``split = 2**ceil(t/2) + 1`` for ``t``-bit floats)."""
    p = a * b
    ca, cb = a * split, b * split
    ah = ca - (ca - a)
    bh = cb - (cb - b)
    al, bl = a - ah, b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _round_odd(s, e, xp):
    """Round to odd of ``s + e`` (``s = fl(s + e)``, ``e`` the exact remainder): ``s`` when
    exact or when its last significand bit is 1, else its neighbour towards ``s + e``."""
    a = xp.abs(s)
    inf = xp.asarray(xp.inf, dtype=a.dtype)
    ulp = xp.nextafter(a, inf) - a
    odd = (a / ulp) % 2 == 1  # a / ulp: the integral significand, exactly
    step = xp.nextafter(s, xp.where(e > 0, inf, -inf))
    return xp.where((e != 0) & ~odd, step, s)


def _times_p_minus_one(p, dl, fmt: Format, xp):
    """``RN_fmt(dl · (p - 1))`` with one rounding, for ``p``, ``dl`` values of ``fmt``.

    float16/bfloat16/float32: ``dl·p`` is exact in float64 (<= 48 bits), ``dl·p - dl`` is
    an exact float64 pair (TwoSum), rounded to odd in float64 and then to nearest in ``fmt``:
    with ``53 >= p_fmt + 2`` bits the double rounding is innocuous (Boldo--Melquiond).
    float64/longdouble: ``dl·p = ph + pl`` exactly (Dekker), and the sum of the three terms
    ``-dl + ph + pl`` is rounded correctly by Boldo--Melquiond's algorithm (two TwoSums, one
    addition rounded to odd, one to nearest).
    """
    if fmt.precision <= 24:
        f64 = xp_dtype(xp, np.float64)
        p64, d64 = xp.astype(p, f64), xp.astype(dl, f64)
        s, e = _two_sum(p64 * d64, -d64)
        return quantize(_round_odd(s, e, xp), fmt)
    split = 134217729.0 if fmt.precision == 53 else 4294967297.0  # 2**27 + 1, 2**32 + 1
    ph, pl = _two_prod(p, dl, split)
    uh, ul = _two_sum(ph, pl)
    th, tl = _two_sum(-dl, uh)
    v, ve = _two_sum(tl, ul)
    return th + _round_odd(v, ve, xp)


def reduce_loss(loss, reduction: str = "mean"):
    """Reduce per-sample losses: ``mean`` (accumulated in float64, as a report; training uses
    ``dloss = fl(1/N)``) or ``none``.

    ``loss`` is a 1-D array of real numbers (a list is converted); the mean of no losses is
    NaN, and NaN / inf losses give NaN / inf, without warnings. Other dtypes raise TypeError,
    other shapes ValueError."""
    _check_choice(reduction, REDUCTIONS, "reduction")
    if not hasattr(loss, "dtype"):
        loss = np.asarray(loss)
    if not (_is_float(loss.dtype, loss) or _is_int(loss.dtype, loss)):
        raise TypeError(f"loss must be an array of real numbers, got dtype {loss.dtype}")
    if loss.ndim != 1:
        raise ValueError(f"loss must be 1-D (per-sample losses), got shape {tuple(loss.shape)}")
    if reduction == "none":
        return loss
    xp = namespace(loss)
    if loss.shape[0] == 0:
        return np.float64(np.nan)
    wide = xp.astype(loss, xp_dtype(xp, np.float64))
    with errstate(xp, over="ignore", invalid="ignore"):
        mean = xp.mean(wide)
        if bool(xp.isinf(mean)) and bool(xp.all(xp.isfinite(wide))):
            # The sum overflowed, not the mean: the same sum scaled by 2**-64 (exactly).
            mean = xp.mean(wide * 2.0**-64) * 2.0**64
    return mean
