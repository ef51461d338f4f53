"""Array backends: NumPy on the host, CuPy on a GPU, anything array-API compatible for tests.

Numeric code takes its namespace from its inputs (:func:`namespace`, after SciPy's
``_logsumexp.py``) and otherwise uses only array-API standard functions. The few operations the
standard lacks are the named hooks below, with one implementation per backend:

============================  ===========================================================
hook                          why it is needed
============================  ===========================================================
:func:`errstate`              NumPy's floating-point warnings (other backends have none)
:func:`uint_view`             bit patterns for the rounding emulation of 16-bit formats
:func:`take_at`               ``a[i, cols[i]]`` (integer-array indexing is not standard)
:func:`put_at`                ``a[i, cols[i]] = v[i]``
:func:`sparse_rows_matrix`    the CSR matrix of the gather layer's segment sum
:func:`to_numpy`              device-to-host transfer (only when metrics are logged)
============================  ===========================================================

``array_module`` remains for code that is NumPy/CuPy-specific by nature.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np

__all__ = [
    "BACKENDS",
    "array_module",
    "errstate",
    "get_backend",
    "is_numpy",
    "namespace",
    "put_at",
    "sparse_rows_matrix",
    "take_at",
    "to_numpy",
    "uint_view",
]

BACKENDS = ("numpy", "cupy")


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
    CuPy and other array types give ``array_api_compat.array_namespace(...)``.
    """
    arrs = [a for a in arrays if a is not None and not isinstance(a, (int, float, bool, list,
                                                                        tuple))]
    if all(isinstance(a, (np.ndarray, np.generic)) for a in arrs):
        return np
    import array_api_compat

    return array_api_compat.array_namespace(*arrs)


def is_numpy(xp) -> bool:
    """True for the NumPy namespace (raw or array-api-compat's wrapper)."""
    return xp is np or getattr(xp, "__name__", "") in ("numpy", "array_api_compat.numpy")


def errstate(xp, **kwargs):
    """``numpy.errstate(**kwargs)`` for NumPy; a no-op context for other backends."""
    if is_numpy(xp):
        return np.errstate(**kwargs)
    return contextlib.nullcontext()


def uint_view(x, nbits: int):
    """View float ``x`` as unsigned integers of ``nbits`` bits (same memory).

    Raises
    ------
    TypeError
        For backends without views (the array-API standard has none): rounding emulation of
        float16/bfloat16 needs NumPy or CuPy.
    """
    if not hasattr(x, "view") or type(x).__module__.startswith("array_api_strict"):
        raise TypeError(
            f"bit-level rounding needs NumPy or CuPy arrays, got {type(x).__module__}."
            f"{type(x).__name__}; float16/bfloat16 emulation is unavailable on this backend"
        )
    return x.view({16: np.uint16, 32: np.uint32, 64: np.uint64}[nbits])


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
    ``where`` over a one-hot mask.
    """
    if isinstance(a, np.ndarray) or _is_cupy_array(a):
        a[_rows(array_module(a), a.shape[0]), cols] = values
        return a
    xp = namespace(a)
    mask = xp.reshape(cols, (-1, 1)) == xp.reshape(xp.arange(a.shape[1]), (1, -1))
    return xp.where(mask, xp.reshape(xp.asarray(values, dtype=a.dtype), (-1, 1)), a)


def sparse_rows_matrix(rows, cols, shape, like):
    """A 0/1 matrix ``M`` (``shape``) with ``M[rows[k], cols[k]] += 1``, as the backend's
    fastest representation for ``M @ dense``.

    NumPy: a SciPy CSR matrix with sorted indices (its product sums each row's entries in
    column order, accumulating in the output dtype). CuPy: a ``cupyx.scipy.sparse`` CSR
    matrix. Other backends: a dense array of the namespace of ``like``.
    """
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    if isinstance(like, np.ndarray) or like is None:
        import scipy.sparse as sparse

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
    xp = namespace(like)
    dense = np.zeros(shape)
    np.add.at(dense, (rows, cols), 1.0)
    return xp.asarray(dense)


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
    """Copy an array to the host as a NumPy array (no copy if it already is one)."""
    if isinstance(x, np.ndarray):
        return x
    get = getattr(x, "get", None)
    if get is not None and _is_cupy_array(x):
        return get()
    return np.asarray(x)
