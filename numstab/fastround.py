"""Rounding a float32 carrier to float16 or bfloat16, written into reused arrays.

The same bits as :func:`numstab.precision.quantize` (round to nearest even, gradual
underflow, overflow to ``±inf``, NaN kept with its sign) for float32 input, with its
temporaries taken from the active :mod:`numstab.workspace` instead of fresh allocations: the
training step rounds megabyte arrays to its storage format about twenty times per step, and
each fresh temporary is page-faulted in again. ``tests/test_fastround.py`` checks it against
``quantize`` on every float32 bit pattern near each float16 / bfloat16 rounding boundary and
on random patterns; ``scripts/check_fastround.py`` on all 2**32 float32 patterns.

The algorithms are :func:`numstab.precision._round_bits`'s: float16, the "magic number"
``M = 2**(max(e, emin) - p + 1 + 23)`` built from the exponent bits, ``(|x| + M) - M`` (the
source's own rounding to the target's quantum), the sign put back, and the rare elements
above the target's largest finite value (overflow, inf, NaN) redone by ``quantize``;
bfloat16 (float32's exponent range), rounding the bit pattern with the carry into the
exponent, NaN restored. Where the fused kernels run (:mod:`numstab.kernels`: numba
installed, the default), each algorithm is one pass of the same operations
(``magic_round``, ``bfloat16_round``); ``scripts/check_fastround.py`` with
``NUMSTAB_KERNELS=numba`` checks that path on all 2**32 patterns.
"""

from __future__ import annotations

import numpy as np

from numstab import kernels, workspace
from numstab.precision import Format, quantize

__all__ = ["magic_constants", "quantize_into", "rounds_fast"]

_SAME_RANGE_DROP = 16  # bfloat16 from float32: the 16 low bits dropped
_BF16_HALF = np.uint32((1 << 15) - 1)
_BF16_KEEP = np.uint32(0xFFFF0000)
_CONSTANTS: dict = {}


def rounds_fast(x, fmt: Format) -> bool:
    """Whether :func:`quantize_into` handles ``x`` and ``fmt`` (else use ``quantize``)."""
    return (
        isinstance(x, np.ndarray)
        and x.dtype in (np.float32, np.float64)
        and fmt.name in ("float16", "bfloat16")
        and fmt.rounding == "nearest"
        and fmt.subnormals == "gradual"
    )


def quantize_into(x, fmt: Format):
    """``quantize(x, fmt)`` for float32/float64 ``x``, result and temporaries from the
    workspace.

    Parameters
    ----------
    x : ndarray of float32 or float64, any shape
    fmt : Format
        float16 or bfloat16 (nearest even, gradual underflow: :func:`rounds_fast`), else
        this is ``quantize(x, fmt)``.

    Returns
    -------
    ndarray of float32, the shape of ``x``; the bits of ``quantize(x, fmt)``.
    """
    if not rounds_fast(x, fmt):
        return quantize(x, fmt)
    if x.dtype == np.float32 and fmt.name == "bfloat16":
        return _same_range(x, _c_order(x).view(np.uint32))
    r = _magic(x, fmt)
    if r.dtype == np.float32:
        return r
    out = workspace.empty(r.shape, np.float32)
    out[...] = r  # exact: r holds values of fmt
    return out


def _c_order(x):
    """``x`` itself when C-contiguous (0-d included), else a C-ordered copy."""
    return x if x.flags.c_contiguous else x.copy(order="C")


def magic_constants(dtype: np.dtype, fmt: Format) -> tuple:
    """``_round_bits``'s constants for a float32/float64 source and a target format:
    ``(uint dtype, |x| mask, exponent field, smallest quantum's exponent, magic shift,
    largest finite value's bits, sign bit)``."""
    key = (dtype, fmt.name)
    if key not in _CONSTANTS:
        uint, mant = (np.uint32, 23) if dtype == np.float32 else (np.uint64, 52)
        bits = 8 * dtype.itemsize
        bias = (1 << (bits - 2 - mant)) - 1
        _CONSTANTS[key] = (
            uint,
            uint((1 << (bits - 1)) - 1),  # |x| mask
            uint(((1 << (bits - 1 - mant)) - 1) << mant),  # exponent field
            uint((bias + fmt.emin) << mant),  # the target's smallest quantum's exponent
            uint((mant - (fmt.precision - 1)) << mant),  # magic = quantum * 2**mant
            dtype.type(float(fmt.max)).view(uint),
            uint(1 << (bits - 1)),  # sign bit
        )
    return _CONSTANTS[key]


def _magic(x, fmt: Format):
    """``(|x| + M) - M`` with the sign put back; the shape and dtype of ``x``."""
    uint, absmask, expmask, floor, shift, top, signmask = magic_constants(x.dtype, fmt)
    x = _c_order(x)
    u = x.view(uint)
    r = workspace.empty(u.shape, x.dtype)
    if kernels.applies(x):  # the passes below in one (the same operations, numstab.kernels)
        consts = (absmask, signmask, expmask, floor, shift, top)
        above_top = kernels.magic_round(x.reshape(-1), u.reshape(-1), r.reshape(-1), consts)
    else:
        a = np.bitwise_and(u, absmask, out=workspace.empty(u.shape, uint))
        m = np.bitwise_and(a, expmask, out=workspace.empty(u.shape, uint))
        np.maximum(m, floor, out=m)
        m += shift
        mf = m.view(x.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            np.add(a.view(x.dtype), mf, out=r)
            r -= mf
        np.copysign(r, x, out=r)  # r >= +0: copysign sets the sign bit as ``|= sign`` does
        above_top = a.size and a.max() > top
        del a, m, mf
    if above_top:  # beyond the largest finite value: overflow, inf, NaN
        special = np.bitwise_and(u, absmask) > top
        r[special] = quantize(x[special], fmt)
    return r


def _same_range(x, u):
    """bfloat16 from float32: the bit pattern rounded, the carry into the exponent."""
    if kernels.applies(x):  # the passes below in one (numstab.kernels.bfloat16_round)
        r = workspace.empty(u.shape, np.uint32)
        kernels.bfloat16_round(u.reshape(-1), r.reshape(-1))
        return r.view(np.float32)
    r = np.right_shift(u, np.uint32(_SAME_RANGE_DROP), out=workspace.empty(u.shape, np.uint32))
    r &= np.uint32(1)
    r += u
    r += _BF16_HALF
    r &= _BF16_KEEP
    out = r.view(np.float32)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.copysign(np.float32(np.nan), x[nan])
    return out
