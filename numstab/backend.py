"""Array backends: NumPy on the host, CuPy on a GPU, anything array-API compatible for tests.

Numeric code takes its namespace from its inputs (:func:`namespace`, after SciPy's
``_logsumexp.py``) and otherwise uses only array-API standard functions. The few operations the
standard lacks are the named hooks below, with one implementation per backend:

============================  ===========================================================
hook                          why it is needed
============================  ===========================================================
:func:`errstate`              NumPy's floating-point warnings (also those of array_api_strict,
                              which computes with NumPy; CuPy has none)
:func:`xp_dtype`              a namespace's dtype object for a NumPy dtype (array-API
                              libraries have their own dtype objects; NumPy and CuPy take
                              NumPy dtypes); a clear TypeError where the backend lacks it
                              (longdouble anywhere but NumPy, float16 on array_api_strict)
:func:`uint_view`             bit patterns for the rounding emulation of 16-bit formats
                              (NumPy and CuPy only: the standard has no views)
:func:`native_sum`            NumPy's own loops for two declared summation orders:
                              ``numpy.sum`` (the pairwise tree) and ``numpy.add.accumulate``
                              (left to right). Other backends return None and the caller
                              evaluates the order explicitly with standard functions
                              (CuPy's ``sum`` and ``cumsum`` use other orders)
:func:`take_at`               ``a[i, cols[i]]`` (integer-array indexing is not standard)
:func:`put_at`                ``a[i, cols[i]] = v[i]``
:func:`sparse_rows_matrix`    the CSR matrix of the gather layer's segment sum (NumPy: SciPy
                              CSR, CuPy: ``cupyx`` CSR, others: :class:`SegmentRows`, the
                              CSR product's order written with standard functions)
:func:`to_numpy`              device-to-host transfer (only when metrics are logged)
:func:`inplace_ops`           ``add``, ``subtract``, ``multiply``, ``divide``, ``sqrt`` into
                              an existing array (NumPy's and CuPy's ``out=``, for the
                              optimizers' scratch buffers; others: ``out[...] = a op b``)
:func:`vdot`                  1-D dot product: NumPy's ``einsum`` loop (deterministic, no BLAS
                              threads), else ``xp.sum(a * b)``; the order, hence the last
                              bits, differ per backend
============================  ===========================================================

``array_module`` remains for code that is NumPy/CuPy-specific by nature: the bit-level
rounding of :mod:`numstab.precision` works on the integer views :func:`uint_view` returns,
with the module that owns them (NumPy's and CuPy's ufuncs, ``out=``, boolean masks), one
function for both.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types

import array_api_compat
import numpy as np
import scipy

#: Whether importing scipy.sparse loads a BLAS library of SciPy's own (SciPy before 1.16; 1.13.0
#: adds its libopenblasp); it is then imported with this module, not on first use, so that a
#: threadpool_limits() set later (a sweep worker's --threads) covers it. From 1.16 it loads
#: none (1.17.1: no library added) and waits for first use: its import is 0.1 s of every
#: process's start-up, most of it SciPy's array-API layer importing NumPy's submodules
#: (numpy.f2py, numpy.testing, ...).
SPARSE_LOADS_BLAS = tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 16)
if SPARSE_LOADS_BLAS:
    import scipy.sparse

__all__ = [
    "BACKENDS",
    "SegmentRows",
    "array_module",
    "as_dtype",
    "errstate",
    "get_backend",
    "is_ml_dtype",
    "is_numpy",
    "ml_dtype",
    "ml_dtypes_module",
    "namespace",
    "native_sum",
    "put_at",
    "sparse_rows_matrix",
    "take_at",
    "to_numpy",
    "uint_view",
    "xp_dtype",
]

BACKENDS = ("numpy", "cupy")


def ml_dtypes_module():
    """The ``ml_dtypes`` module, imported on first use, not with numstab.

    Only the formats NumPy lacks (bfloat16, fp8, fp6, fp4) need it, and its import is slow
    in some versions (0.7.0: about a second, nearly all of it registering ufunc loops;
    README, *Tested versions*), which every command line and worker process would pay.
    """
    import ml_dtypes

    return ml_dtypes


@functools.cache
def ml_dtype(name: str) -> np.dtype:
    """ml_dtypes' dtype ``name`` (``"bfloat16"``, ``"float8_e4m3fn"``, ...), importing
    ml_dtypes on first use."""
    return np.dtype(getattr(ml_dtypes_module(), name))


def is_ml_dtype(dt, name: str) -> bool:
    """``dt`` is ml_dtypes' dtype ``name``. Never imports ml_dtypes: while it is not loaded,
    no array of its dtypes exists."""
    return "ml_dtypes" in sys.modules and dt == ml_dtype(name)


def as_dtype(spec) -> np.dtype:
    """``numpy.dtype(spec)``; a name NumPy does not know is tried again with ml_dtypes loaded
    (it registers ``"bfloat16"``, ``"float8_e4m3fn"``, ...). TypeError as NumPy's."""
    try:
        return np.dtype(spec)
    except TypeError:
        if not isinstance(spec, str) or "ml_dtypes" in sys.modules:
            raise
    ml_dtypes_module()
    return np.dtype(spec)


def _cupy_module():
    """Return the ``cupy`` module if it is importable, else ``None`` (never raises)."""
    try:
        import cupy
    except Exception:  # ImportError, or a CUDA library failing to load at import
        return None
    return cupy


def _is_cupy_array(a) -> bool:
    return type(a).__module__.startswith("cupy")


def array_module(*arrays) -> types.ModuleType:
    """The array module (``numpy`` or ``cupy``) that owns ``arrays``.

    Anything that is not a CuPy array counts as NumPy.
    """
    for a in arrays:
        if _is_cupy_array(a):
            return _cupy_module()
    return np


def namespace(*arrays):
    """The array-API namespace of ``arrays``.

    NumPy arrays, Python scalars and lists give ``numpy`` itself (NumPy 2 implements the
    standard functions used here, and its own module avoids a wrapper layer on the hot path);
    CuPy and other array types give ``array_api_compat.array_namespace(...)``. Anything else
    that is not an array (a string, ``None``, an object) counts as NumPy input too, so that
    ``numpy.asarray`` gives it its usual conversion or error message. NumPy arrays next to
    another backend's arrays give the other backend (host data such as labels is then
    converted with its ``asarray``).
    """
    arrs = [
        a
        for a in arrays
        if not isinstance(a, (np.ndarray, np.generic))
        and (hasattr(a, "__array_namespace__") or _is_cupy_array(a))
    ]
    if not arrs:
        return np
    return array_api_compat.array_namespace(*arrs)


def is_numpy(xp) -> bool:
    """True for the NumPy namespace (raw or array-api-compat's wrapper)."""
    return xp is np or getattr(xp, "__name__", "") in ("numpy", "array_api_compat.numpy")


def errstate(xp, **kwargs):
    """``numpy.errstate(**kwargs)`` for NumPy and for array-API libraries that compute with
    NumPy underneath (array_api_strict); a no-op context for CuPy (no floating-point
    warnings)."""
    if is_numpy(xp) or getattr(xp, "__name__", "").startswith("array_api_strict"):
        return np.errstate(**kwargs)
    return contextlib.nullcontext()


def xp_dtype(xp, dtype):
    """The dtype object of namespace ``xp`` for the NumPy dtype ``dtype``.

    NumPy (and CuPy, whose dtypes are NumPy's) get ``numpy.dtype(dtype)`` back; other
    array-API namespaces their attribute of the same name (``xp.float32``).

    Raises
    ------
    TypeError
        The backend has no such dtype (longdouble outside NumPy, float16 on
        array_api_strict): the message names the backend and what it supports.
    """
    if xp is np:
        return np.dtype(dtype)
    dt = np.dtype(dtype)
    name = getattr(xp, "__name__", type(xp).__name__)
    if name in ("cupy", "numpy") and dt != np.longdouble:
        return dt
    found = getattr(xp, dt.name, None) if dt != np.longdouble else None
    if found is None:
        what = "longdouble" if dt == np.longdouble else dt.name
        raise TypeError(
            f"{what} arrays are not available on the {name} backend; formats there are "
            "float32 and float64 (float16/bfloat16 emulation needs NumPy or CuPy, longdouble "
            "NumPy)"
        )
    return found


def uint_view(x, nbits: int):
    """View float ``x`` as unsigned integers of ``nbits`` bits (same memory).

    Raises
    ------
    TypeError
        For backends without views (the array-API standard has none): rounding emulation of
        float16/bfloat16 needs NumPy or CuPy; other backends support the float32 and float64
        formats only.
    """
    if not hasattr(x, "view") or type(x).__module__.startswith("array_api_strict"):
        raise TypeError(
            "float16/bfloat16 emulation rounds bit patterns, which needs NumPy or CuPy arrays; "
            f"got {type(x).__module__}.{type(x).__name__}, whose backend supports the float32 "
            "and float64 formats only"
        )
    return x.view({16: np.uint16, 32: np.uint32, 64: np.uint64}[nbits])


def native_sum(x, order: str):
    """Sum along the last axis in ``x.dtype`` by the backend's own loop for ``order``, or None.

    NumPy: ``"pairwise"`` is ``numpy.sum`` over a C-contiguous copy (its pairwise tree along
    the last axis), ``"sequential"`` is ``numpy.add.accumulate`` (a strict left-to-right
    loop). Other backends (and other orders) return None: their reductions use other
    orders (CuPy's ``sum`` and ``cumsum`` are parallel trees and scans), and the caller
    evaluates the order explicitly with standard functions.
    """
    if not isinstance(x, np.ndarray):
        return None
    if order == "pairwise":
        return _numpy_pairwise(np.ascontiguousarray(x))
    if order == "sequential":
        return np.add.accumulate(x, axis=-1)[..., -1].copy()
    return None


#: The longest run of a row that ``numpy.sum`` adds in one pairwise tree on every supported
#: NumPy. NumPy 2.2 (measured on 2.2.6) sums a longer contiguous row in pieces of its buffer
#: size (``np.getbufsize()``, 8192 elements) added left to right; NumPy 2.4 (2.4.6) sums it in
#: one tree. The pairwise order is the one tree (as the explicit evaluation on other backends).
_ONE_TREE = 8192


def _numpy_pairwise(x):
    """``numpy.sum(x, axis=-1)`` in NumPy's pairwise tree over the whole row, whichever NumPy:
    a row longer than one buffer is split as the tree splits it (``n2 = n // 2``, rounded down
    to a multiple of 8), down to runs that ``numpy.sum`` adds in one tree, and the halves are
    added as the tree adds them. Each run's sum includes NumPy's identity ``+0``: it changes
    no sum but a ``-0``, and the whole row's sum adds it too, so the bits are the same."""
    n = x.shape[-1]
    if n <= min(_ONE_TREE, np.getbufsize()):
        return np.sum(x, axis=-1)
    n2 = n // 2
    n2 -= n2 % 8
    return _numpy_pairwise(x[..., :n2]) + _numpy_pairwise(x[..., n2:])


def _rows(xp, n):
    return xp.arange(n)


def take_at(a, cols):
    """``a[i, cols[i]]`` for every row ``i`` of a 2-D ``a``; shape ``(N,)``."""
    if isinstance(a, np.ndarray) or _is_cupy_array(a):
        return a[_rows(array_module(a), a.shape[0]), cols]
    xp = namespace(a)
    return xp.take_along_axis(a, xp.reshape(cols, (-1, 1)), axis=1)[:, 0]


def put_at(a, cols, values):
    """Return ``a`` with ``a[i, cols[i]] = values[i]`` (in place where the backend allows).

    NumPy and CuPy assign in place and return ``a``; other backends build a new array with
    ``where`` over a one-hot mask. A negative column counts from the end, as in NumPy
    indexing (and in :func:`take_at`).
    """
    if isinstance(a, np.ndarray) or _is_cupy_array(a):
        a[_rows(array_module(a), a.shape[0]), cols] = values
        return a
    xp = namespace(a)
    cols = xp.where(cols < 0, cols + a.shape[1], cols)
    mask = xp.reshape(cols, (-1, 1)) == xp.reshape(xp.arange(a.shape[1]), (1, -1))
    return xp.where(mask, xp.reshape(xp.asarray(values, dtype=a.dtype), (-1, 1)), a)


def sparse_rows_matrix(rows, cols, shape, like):
    """A 0/1 matrix ``M`` (``shape``) with ``M[rows[k], cols[k]] += 1``, as the backend's
    fastest representation for ``M @ dense``.

    NumPy: a SciPy CSR matrix with sorted indices (its product sums each row's entries in
    column order, accumulating in the output dtype). CuPy: a ``cupyx.scipy.sparse`` CSR
    matrix. Other backends: a :class:`SegmentRows` of the namespace of ``like``, which
    evaluates the product in the SciPy CSR kernel's order with standard functions (a dense
    matrix product would add the same terms in BLAS's blocked order: other last bits).
    """
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    if isinstance(like, np.ndarray) or like is None:
        import scipy.sparse as sparse  # loaded at first use (see SPARSE_LOADS_BLAS)

        m = sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=shape)
        m.sum_duplicates()
        m.sort_indices()
        return m
    if _is_cupy_array(like):
        import cupy
        import cupyx.scipy.sparse as csparse

        m = csparse.csr_matrix(
            (cupy.ones(rows.size), (cupy.asarray(rows), cupy.asarray(cols))), shape=shape
        )
        m.sum_duplicates()
        m.sort_indices()
        return m
    return SegmentRows.build(rows, cols, shape, namespace(like))


class SegmentRows:
    """A sparse 0/1 (count) matrix ``M`` whose product ``M @ dense`` runs in SciPy's CSR order.

    SciPy's CSR kernel computes row ``r`` of ``M @ X`` as ``y = +0; y += M[r, c] * X[c]`` over
    the stored columns ``c`` of row ``r`` in ascending order, in the output dtype. Here the
    stored entries sit in a padded ``(n_rows, width)`` table (``width`` the longest row); the
    product walks its columns, adding ``weight * X[slot]`` for every row at once, where
    padding points at an appended row of zeros with weight 0 (``y + 0 == y``: ``y`` starts at
    ``+0`` and so is never ``-0``). Only standard functions: ``take``, ``concat``, ``+=``.

    Attributes
    ----------
    shape : (n_rows, n_cols)
    dtype : the namespace's dtype of the weights
    """

    def __init__(self, xp, slots, weights, shape):
        self.xp, self.slots, self.weights, self.shape = xp, slots, weights, tuple(shape)

    @classmethod
    def build(cls, rows, cols, shape, xp) -> SegmentRows:
        """From entry coordinates (host integer arrays; duplicates add up, as in CSR)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        cols = np.asarray(cols, dtype=np.int64).reshape(-1)
        n_rows, n_cols = (int(v) for v in shape)
        key = rows * n_cols + cols
        uniq, counts = np.unique(key, return_counts=True)  # sorted: by row, then column
        r, c = np.divmod(uniq, n_cols) if n_cols else (uniq, uniq)
        per_row = np.bincount(r, minlength=n_rows)
        width = int(per_row.max()) if per_row.size else 0
        slots = np.full((n_rows, width), n_cols, dtype=np.int64)  # padding: the zero row
        weights = np.zeros((n_rows, width))
        pos = np.arange(r.size) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        slots[r, pos] = c
        weights[r, pos] = counts
        return cls(xp, xp.asarray(slots), xp.asarray(weights, dtype=xp.float64), shape)

    @property
    def dtype(self):
        return self.weights.dtype

    def astype(self, dtype) -> SegmentRows:
        return SegmentRows(self.xp, self.slots, self.xp.astype(self.weights, dtype), self.shape)

    def __matmul__(self, dense):
        xp = self.xp
        n_rows, n_cols = self.shape
        if dense.ndim != 2 or dense.shape[0] != n_cols:
            raise ValueError(
                f"SegmentRows of shape {self.shape} cannot multiply shape {tuple(dense.shape)}"
            )
        k = dense.shape[1]
        ext = xp.concat([dense, xp.zeros((1, k), dtype=dense.dtype)], axis=0)
        weights = xp.astype(self.weights, dense.dtype)
        acc = xp.zeros((n_rows, k), dtype=dense.dtype)
        for j in range(self.slots.shape[1]):
            acc += weights[:, j : j + 1] * xp.take(ext, self.slots[:, j], axis=0)
        return acc


def get_backend(name: str) -> types.ModuleType:
    """Return the array module for a backend name, checking that it can run here.

    Parameters
    ----------
    name : {"numpy", "cupy"}

    Raises
    ------
    ValueError
        Unknown backend name.
    RuntimeError
        ``"cupy"`` requested but CuPy is not installed or no CUDA device is visible; the
        message names what is missing and the install extra.
    """
    if name == "numpy":
        return np
    if name != "cupy":
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    cp = _cupy_module()
    if cp is None:
        raise RuntimeError(
            "backend 'cupy' needs CuPy, which is not installed (or failed to import): "
            "install it with `pip install -e '.[gpu]'`"
        )
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device
        raise RuntimeError(f"backend 'cupy' needs a CUDA GPU, but none is usable: {exc}") from exc
    if count < 1:
        raise RuntimeError("backend 'cupy' needs a CUDA GPU, but no device is visible")
    return cp


def to_numpy(x) -> np.ndarray:
    """The values of an array of any framework as a NumPy array on the host.

    No copy where the memory allows: NumPy arrays as they are; torch tensors detached (one
    that requires grad included), copied from a GPU, and bfloat16 / float8 read through an
    integer view of their bits as the ml_dtypes type of the same name (no rounding, no
    copy); JAX arrays and others with ``__array__`` through ``numpy.asarray``; other
    array-API arrays through DLPack (``numpy.from_dlpack``). CuPy arrays are copied from the
    GPU. Anything else (lists, scalars) goes to ``numpy.asarray``, with its conversions and
    errors.
    """
    if isinstance(x, np.ndarray):
        return x
    if _is_cupy_array(x):
        return x.get()
    if type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach"):
        return _torch_to_numpy(x)
    if hasattr(x, "__dlpack__") and not hasattr(x, "__array__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, TypeError, ValueError, RuntimeError):
            pass  # on another device, or of a dtype NumPy lacks: the library's conversion
    return np.asarray(x)


#: torch dtype -> (the integer dtype of its bits, the ml_dtypes type) for the 16- and 8-bit
#: floats NumPy lacks (bfloat16, float8...), None for the others; filled as dtypes are met.
_TORCH_BIT_VIEWS: dict = {}


def _torch_bit_view(t):
    import torch

    if not t.is_floating_point() or t.element_size() > 2 or t.dtype == torch.float16:
        return None  # NumPy has these dtypes
    ml_type = getattr(ml_dtypes_module(), str(t.dtype).removeprefix("torch."), None)
    if ml_type is None:
        return None
    return (torch.int16 if t.element_size() == 2 else torch.uint8), ml_type


def _torch_to_numpy(t) -> np.ndarray:
    """A torch tensor's values as a NumPy array (see :func:`to_numpy`)."""
    t = t.detach()
    dtype = t.dtype
    if dtype not in _TORCH_BIT_VIEWS:  # a dict lookup per call: the monitor makes 15 a step
        _TORCH_BIT_VIEWS[dtype] = _torch_bit_view(t)
    view = _TORCH_BIT_VIEWS[dtype]
    if view is not None:
        return t.view(view[0]).numpy(force=True).view(view[1])
    return t.numpy(force=True)  # on the CPU, conjugate and negative views resolved


# --- hooks of the optimizers (numstab.optim) --------------------------------------------------

__all__ += ["common_namespace", "copy_to", "has_bit_views", "inplace_ops", "new_array", "vdot"]


def common_namespace(*arrays):
    """The one namespace of ``arrays``, refusing a mix of backends.

    Unlike :func:`namespace`, NumPy arrays beside another backend's arrays are an error (state
    tensors and parameters must live on one device). All-NumPy input is recognised by a plain
    type test (the optimizers' hot path).

    Raises
    ------
    TypeError
        Arrays of several backends; the message says which.
    """
    if all(type(a) is np.ndarray for a in arrays):
        return np
    try:
        xp = namespace(*arrays)
    except TypeError as exc:
        raise TypeError(f"arrays of several backends: {exc}") from None
    if not is_numpy(xp) and any(isinstance(a, np.ndarray) for a in arrays):
        raise TypeError("arrays of several backends: NumPy arrays among them")
    return xp


def has_bit_views(xp) -> bool:
    """Whether ``xp``'s arrays have the integer views (:func:`uint_view`) that float16 /
    bfloat16 emulation rounds on: NumPy and CuPy."""
    return is_numpy(xp) or getattr(xp, "__name__", "") in ("cupy", "array_api_compat.cupy")


def new_array(kind: str, like, dtype):
    """``zeros`` or ``empty`` (``kind``) of ``like``'s shape, NumPy dtype ``dtype``, on
    ``like``'s backend and device."""
    xp = namespace(like)
    if is_numpy(xp):
        return getattr(np, kind)(like.shape, dtype=dtype)

    return getattr(xp, kind)(
        like.shape, dtype=xp_dtype(xp, dtype), device=array_api_compat.device(like)
    )


def copy_to(arr, like=None):
    """A copy of array ``arr`` on ``like``'s backend and device (``arr``'s own if None);
    between backends through a host copy (values unchanged)."""
    xs = namespace(arr)
    xt = xs if like is None else namespace(like)
    if xt is xs:
        return np.array(arr, copy=True) if is_numpy(xs) else xs.asarray(arr, copy=True)
    host = to_numpy(arr)
    if is_numpy(xt):
        return np.array(host, copy=True)

    return xt.asarray(host, copy=True, device=array_api_compat.device(like))


_INPLACE_OPS: dict = {}


class _CupyInplaceOps:
    """CuPy's ufuncs with ``out=``, the operands first brought to ``out``'s dtype.

    CuPy's promotion of a NumPy scalar against an array of another precision has followed
    NumPy's changing rules (value-based before NEP 50); widening explicitly makes the
    compute dtype ``out.dtype`` on every version. Widening float32 to float64 is exact.
    """

    def __init__(self, cp):
        self._cp = cp

    def _call(self, name, args, out):
        dt = out.dtype
        args = [
            dt.type(a) if isinstance(a, (int, float)) else a if a.dtype == dt else a.astype(dt)
            for a in args
        ]
        return getattr(self._cp, name)(*args, out=out)

    def add(self, a, b, out):
        return self._call("add", (a, b), out)

    def subtract(self, a, b, out):
        return self._call("subtract", (a, b), out)

    def multiply(self, a, b, out):
        return self._call("multiply", (a, b), out)

    def divide(self, a, b, out):
        return self._call("divide", (a, b), out)

    def sqrt(self, a, out):
        return self._call("sqrt", (a,), out)


class _ArrayAPIInplaceOps:
    """The same functions for any array-API namespace: ``out[...] = op(a, b)``.

    A new array is computed and copied into ``out`` (the standard has no ``out=``; arrays
    such as array_api_strict's allow ``__setitem__``). Array operands of a narrower dtype are
    widened with ``astype`` (exact); a scalar operand becomes a Python float, which the
    standard converts to the other operand's dtype -- ``out``'s.
    """

    def __init__(self, xp):
        self._xp = xp

    def _prep(self, a, dt):
        if isinstance(a, (int, float, np.generic)):
            return float(a)
        return a if a.dtype == dt else self._xp.astype(a, dt)

    def _binary(self, fn, a, b, out):
        out[...] = fn(self._prep(a, out.dtype), self._prep(b, out.dtype))
        return out

    def add(self, a, b, out):
        return self._binary(lambda x, y: x + y, a, b, out)

    def subtract(self, a, b, out):
        return self._binary(lambda x, y: x - y, a, b, out)

    def multiply(self, a, b, out):
        return self._binary(lambda x, y: x * y, a, b, out)

    def divide(self, a, b, out):
        return self._binary(lambda x, y: x / y, a, b, out)

    def sqrt(self, a, out):
        out[...] = self._xp.sqrt(self._prep(a, out.dtype))
        return out


def inplace_ops(xp):
    """Element-wise functions writing into an existing array: ``add``, ``subtract``,
    ``multiply``, ``divide`` (``f(a, b, out=out)``) and ``sqrt`` (``f(a, out=out)``).

    Contract: the result is evaluated in ``out``'s dtype and stored in ``out`` (which may be
    ``a`` or ``b``); array operands have ``out``'s dtype or a narrower float dtype (widened
    exactly), a scalar operand is a NumPy scalar of ``out``'s dtype (so that NumPy's own
    promotion gives the same compute dtype). Each function also returns ``out``.

    NumPy: the ``numpy`` module itself (its ufuncs, no wrapper on the hot path). CuPy: its
    ufuncs, after bringing the operands to ``out``'s dtype. Other namespaces:
    ``out[...] = a op b`` (a temporary, then a copy).
    """
    if is_numpy(xp):
        return np
    ops = _INPLACE_OPS.get(xp)
    if ops is None:
        if getattr(xp, "__name__", "") in ("cupy", "array_api_compat.cupy"):
            ops = _CupyInplaceOps(_cupy_module())
        else:
            ops = _ArrayAPIInplaceOps(xp)
        _INPLACE_OPS[xp] = ops
    return ops


def vdot(a, b):
    """``sum_i a[i] * b[i]`` of two 1-D arrays of one float dtype, as a 0-d value of their
    backend (a NumPy scalar on NumPy; a device array on CuPy: no transfer).

    The summation order is the backend's and so are the last bits of the result:

    * NumPy: ``numpy.einsum("i,i->", a, b)``, NumPy's own single-threaded sum-of-products
      loop (deterministic; longdouble too). Not ``numpy.dot``: BLAS ``ddot`` changes its
      order with the thread count and was measured ~700x slower with 2 OpenBLAS threads on a
      2-core machine.
    * Other namespaces: ``xp.sum(a * b)``, the backend's reduction (array_api_strict: NumPy's
      pairwise sum; CuPy: its parallel tree).

    Any order gives ``|computed - exact| <= gamma_n * sum_i |a[i] b[i]|`` with
    ``gamma_n = n u / (1 - n u)`` (``u`` the unit roundoff of the dtype), so two backends
    differ by at most twice that; inputs whose partial sums are all exact (e.g. few-bit
    dyadic values) give identical results everywhere.
    """
    if isinstance(a, np.ndarray):
        return np.einsum("i,i->", a, b)
    xp = namespace(a, b)
    return xp.sum(a * b)
