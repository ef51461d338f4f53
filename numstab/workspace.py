"""Buffers reused across training steps, handed out only when nothing else holds them.

A training step makes the same large arrays every time (activations, logits, gradients, each
megabytes). Fresh arrays of that size come from ``mmap`` or the top of glibc's heap, which
glibc hands back to the kernel when they are freed, so every step page-faults them in again
(measured: a float32 step of the paper's MLP 38 ms against 26 ms with glibc's thresholds
raised, :func:`numstab.run.runtime.tune_allocator`). A :class:`Workspace` keeps the arrays
instead: :meth:`Workspace.empty` returns a kept array of the requested shape and dtype whose
only references are the workspace's own (``sys.getrefcount``; a view holds its base, so an
array with a live view is held too), and a new one otherwise. An array handed out is never
overwritten while the caller, a cache, a log or a user still refers to it: reuse changes
where results are written, never what they are.

The hot path asks through :func:`empty` and :func:`ufunc`, which use the workspace made
active by :func:`using` (``Run.advance`` activates its run's own), and allocate as usual
outside one, for small arrays, and for arrays of other backends.
"""

from __future__ import annotations

import math
import operator
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

__all__ = ["Workspace", "empty", "ufunc", "using"]

#: Arrays smaller than this are allocated as usual (glibc keeps small blocks anyway).
MIN_BYTES = 1 << 16
#: At most this many arrays kept per (shape, dtype): a caller that holds every step's output
#: gets fresh arrays beyond it, and the workspace keeps no more than this alive.
MAX_PER_KEY = 8

_ACTIVE: ContextVar[Workspace | None] = ContextVar("numstab_workspace", default=None)


def _free_refcount() -> int:
    """``sys.getrefcount`` of a kept array that nothing else refers to, as seen in the loop
    of :meth:`Workspace.empty` (its list, the loop variable, the call's argument)."""
    kept = [np.empty(0)]
    for a in kept:
        return sys.getrefcount(a)
    raise AssertionError  # unreachable


_FREE = _free_refcount()


class Workspace:
    """A pool of NumPy arrays keyed by (shape, dtype); see the module docstring."""

    def __init__(self):
        self._pool: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()  # elementwise threads (numstab.parallel) share it

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` that nothing else
        refers to: a kept one when one is free, else a new one (kept if there is room)."""
        key = (_shape(shape), np.dtype(dtype))
        with self._lock:
            kept = self._pool.setdefault(key, [])
            for a in kept:
                if sys.getrefcount(a) == _FREE:
                    return a
            a = np.empty(key[0], key[1])
            if len(kept) < MAX_PER_KEY:
                kept.append(a)
            return a

    def clear(self) -> None:
        """Forget every kept array (arrays in use stay with whoever holds them)."""
        with self._lock:
            self._pool.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of all kept arrays."""
        return sum(a.nbytes for kept in self._pool.values() for a in kept)


def _shape(shape) -> tuple:
    return (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)


@contextmanager
def using(ws: Workspace | None) -> Iterator[Workspace | None]:
    """Make ``ws`` the active workspace in this block (this thread/task); None: none."""
    token = _ACTIVE.set(ws)
    try:
        yield ws
    finally:
        _ACTIVE.reset(token)


def empty(shape, dtype) -> np.ndarray:
    """A NumPy array of ``shape`` and ``dtype`` from the active workspace (a new one outside
    one, or when smaller than :data:`MIN_BYTES`)."""
    ws = _ACTIVE.get()
    shape, dtype = _shape(shape), np.dtype(dtype)
    if ws is None or math.prod(shape) * dtype.itemsize < MIN_BYTES:
        return np.empty(shape, dtype)
    return ws.empty(shape, dtype)


#: The operators of the arithmetic ufuncs, for operands of other backends.
_OPERATORS = {
    np.add: operator.add,
    np.subtract: operator.sub,
    np.multiply: operator.mul,
    np.true_divide: operator.truediv,
}


def ufunc(fn: np.ufunc, *operands):
    """``fn(*operands)`` written into an array of the active workspace.

    ``fn`` an arithmetic ufunc (its result dtype is ``np.result_type`` of the operands:
    ``add``, ``subtract``, ``multiply``, ``true_divide``, ``maximum``, ``exp``...). For
    NumPy operands (arrays and Python/NumPy scalars) and an active workspace; otherwise
    ``fn(*operands)`` as it is (the operator ``+ - * /`` for the four arithmetic ufuncs, so
    that operands of another backend keep their own). The result is the same bits either way:
    ``out=`` only says where NumPy writes (its dtype is the one NumPy would choose).
    """
    ws = _ACTIVE.get()
    scalar = (np.generic, float, int)
    numpy = all(isinstance(v, (np.ndarray, *scalar)) for v in operands)
    if ws is None or not numpy or all(isinstance(v, scalar) for v in operands):
        return _OPERATORS.get(fn, fn)(*operands)
    shape = np.broadcast_shapes(*(np.shape(v) for v in operands))
    dtype = np.result_type(*operands)
    if math.prod(shape) * dtype.itemsize < MIN_BYTES:
        return fn(*operands)
    return fn(*operands, out=ws.empty(shape, dtype))
