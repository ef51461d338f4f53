"""Array backends: NumPy on the host, CuPy on a GPU.

Numeric code asks its inputs which module they belong to (:func:`array_module`) instead of
importing NumPy or CuPy directly. The handful of operations that need more than the array-API
standard offers (bit views for rounding emulation, segment sums, device transfer) are named
hooks in this module with one implementation per backend.
"""

from __future__ import annotations

import types

import numpy as np

BACKENDS = ("numpy", "cupy")


def _cupy_module():
    """Return the ``cupy`` module if it is importable, else ``None`` (never raises)."""
    try:
        import cupy
    except Exception:  # ImportError, or a CUDA library failing to load at import
        return None
    return cupy


def array_module(*arrays) -> types.ModuleType:
    """The array module (``numpy`` or ``cupy``) that owns ``arrays``.

    Parameters
    ----------
    *arrays : array_like
        Arrays or scalars. Anything that is not a CuPy array counts as NumPy.

    Returns
    -------
    module
        ``cupy`` if any argument is a CuPy array, else ``numpy``.
    """
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            return _cupy_module()
    return np


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
    if get is not None:
        return get()
    return np.asarray(x)
