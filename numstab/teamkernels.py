"""The fused softmax kernel's row blocks as the body of an OpenMP parallel region.

A region's body (:meth:`numstab.ompteam.Team.run`) is a C function of one pointer: here a
numba ``cfunc`` reading a *descriptor*, an int64 array holding the arrays' addresses and
shapes, the scalars' bits and a shared counter. Each of the team's threads takes the next
block of ``quantum`` rows from the counter (an atomic add) until none is left and runs
:func:`numstab.kernels.softmax_rows32`'s compiled loop on it. A row's results depend on that
row alone, so the outputs are the same bits however the blocks fall to threads
(``tests/test_kernels.py``). Imported on first use, where numba is installed.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir

from numstab import kernels

kernels._numba()  # numba's CPU target loaded as numstab loads it (its BLAS threads pinned)

from numba import carray, cfunc, njit, types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

__all__ = ["softmax_rows32"]

_SOFTMAX32 = kernels._softmax32.compiled()


@intrinsic
def _pointer(typingctx, address):
    """The ``void *`` at an int64 address."""

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

    return types.voidptr(types.int64), codegen


@intrinsic
def _fetch_add(typingctx, address, value):
    """``*address += value`` atomically on the int64 at ``address``; the value before."""

    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", ptr, args[1], "monotonic")

    return types.int64(types.int64, types.int64), codegen


# The descriptor's words: rows, quantum, the counter's address, classes; then the addresses of
# z, y, the six outputs and the four tables (each followed by its length); then the bits of
# half_k, mask, two_k, rel, tiny and below.
_ROWS, _QUANTUM, _COUNTER, _CLASSES, _ARRAYS = 0, 1, 2, 3, 4
_TABLES = _ARRAYS + 8
_SCALARS = _TABLES + 8
_WORDS = _SCALARS + 6 + 1  # the counter itself last


@njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
def _rows(d, lo, hi):
    n, c = d[_ROWS], d[_CLASSES]
    a = _ARRAYS
    z = carray(_pointer(d[a]), (n, c), np.float32)[lo:hi]
    y = carray(_pointer(d[a + 1]), (n,), np.int64)[lo:hi]
    hit = carray(_pointer(d[a + 2]), (n,), np.bool_)[lo:hi]
    s = carray(_pointer(d[a + 3]), (n,), np.float32)[lo:hi]
    dy = carray(_pointer(d[a + 4]), (n,), np.float32)[lo:hi]
    rs = carray(_pointer(d[a + 5]), (n,), np.float64)[lo:hi]
    flag = carray(_pointer(d[a + 6]), (n,), np.bool_)[lo:hi]
    win = carray(_pointer(d[a + 7]), (n,), np.bool_)[lo:hi]
    t = _TABLES
    th = carray(_pointer(d[t]), (d[t + 1],), np.float64)
    tl = carray(_pointer(d[t + 2]), (d[t + 3],), np.float64)
    tf = carray(_pointer(d[t + 4]), (d[t + 5],), np.float64)
    cs = carray(_pointer(d[t + 6]), (d[t + 7],), np.float64)
    b = _SCALARS
    half_k, mask, two_k = np.uint64(d[b]), np.uint64(d[b + 1]), np.uint64(d[b + 2])
    f = d[b + 3 : b + 6].view(np.float64)
    _SOFTMAX32(z, y, f[2], hit, s, dy, rs, flag, win, th, tl, tf, cs, half_k, mask, two_k,
               f[0], f[1])  # fmt: skip


@cfunc(types.void(types.voidptr), cache=True, nogil=True, error_model="numpy")
def _softmax32_body(data):
    d = carray(data, (_WORDS,), np.int64)
    n, q = d[_ROWS], d[_QUANTUM]
    while True:
        lo = _fetch_add(d[_COUNTER], q)
        if lo >= n:
            break
        _rows(d, lo, min(lo + q, n))


def softmax_rows32(team, threads, quantum, z, y, below, outs, consts) -> None:
    """:func:`numstab.kernels.softmax_rows32` of ``z`` (N, C) float32 and ``y`` (N,) int64,
    both C-contiguous, into ``outs`` (its six output arrays, (N,) each), in blocks of
    ``quantum`` rows on ``threads`` threads of ``team`` (:class:`numstab.ompteam.Team`)."""
    th, tl, tf, cs, half_k, mask, two_k, rel, tiny = consts
    d = np.empty(_WORDS, np.int64)
    d[_ROWS], d[_QUANTUM], d[_CLASSES] = z.shape[0], quantum, z.shape[1]
    d[_ARRAYS : _ARRAYS + 8] = [a.ctypes.data for a in (z, y, *outs)]
    d[_TABLES : _TABLES + 8 : 2] = [a.ctypes.data for a in (th, tl, tf, cs)]
    d[_TABLES + 1 : _TABLES + 8 : 2] = [a.size for a in (th, tl, tf, cs)]
    d[_SCALARS : _SCALARS + 3] = np.array([half_k, mask, two_k], np.uint64).view(np.int64)
    d[_SCALARS + 3 : _SCALARS + 6] = np.array([rel, tiny, below], np.float64).view(np.int64)
    d[_COUNTER] = d.ctypes.data + 8 * (_WORDS - 1)
    d[-1] = 0
    team.run(_softmax32_body.address, d, threads)
