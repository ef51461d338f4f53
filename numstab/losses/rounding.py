"""The rounding helper the losses are written over: each operation rounded once to a format.

A loss formula reads like the math with a :class:`Rounding` ``r`` in hand::

    d = r.sub(z, m)        # RN(z - m)
    e = r.exp(d)           # RN(exp d), correctly rounded ("correct") or the library's ("libm")
    total = r.sum(e)       # the ordered sum, every partial sum rounded

``RN`` is one rounding to nearest-even in ``r.fmt`` (in the format's own mode, and with its
subnormal rule, when its name says so: ``float16@stochastic``, ``float32@ftz``; a mode other
than nearest rounds the carrier's result, float32 for the emulated formats: the hardware
model of a float32 unit converting its result). For float16/bfloat16 the carrier is
float32 and an operation is the float32 one rounded once more: innocuous for ``+ - × ÷``
(24 >= 2·11 + 2 bits, Boldo--Melquiond), so every method below is one correct rounding of the
exact operation except ``exp``/``log``/``log1p`` in ``libm`` mode and :meth:`Rounding.sum`
(a reduction in a declared order).

Inside :func:`recording`, every elementwise operation appends an :class:`Op` (name, operands,
result) to a list: :func:`numstab.fidelity.engine_fidelity` checks each against the exact value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np

from numstab import workspace
from numstab.backend import namespace, xp_dtype
from numstab.elementary import apply
from numstab.fastround import quantize_into
from numstab.precision import Format, quantize
from numstab.rounding_modes import flush_subnormals
from numstab.summation import ordered_sum

__all__ = ["Op", "Rounding", "is_recording", "recording"]

_RECORD: ContextVar[list | None] = ContextVar("numstab_recorded_ops", default=None)


@dataclass(frozen=True)
class Op:
    """One recorded elementwise operation: ``result = RN_fmt(name(*operands))``.

    ``name`` is one of ``add sub mul div exp log log1p dl_p_minus_one mul_sub``
    (``dl·(p - 1)`` from operands ``(p, dl)``; ``p·dl - c`` from ``(p, dl, c)``); operands
    are arrays or Python floats that broadcast against ``result``; ``elementary`` says how
    ``exp``/``log``/``log1p`` were evaluated.
    """

    name: str
    fmt: Format
    elementary: str
    operands: tuple
    result: Any


@contextmanager
def recording() -> Iterator[list[Op]]:
    """Record every elementwise loss operation evaluated inside the block (this thread/task)."""
    ops: list[Op] = []
    token = _RECORD.set(ops)
    try:
        yield ops
    finally:
        _RECORD.reset(token)


def is_recording() -> bool:
    """Whether a :func:`recording` block is active here (then every operation must go
    through :class:`Rounding`, not a fused kernel)."""
    return _RECORD.get() is not None


@dataclass(frozen=True)
class Rounding:
    """Operations of one format, reduction order and elementary-function mode.

    Operands are arrays of ``fmt``'s carrier dtype holding values of ``fmt`` (or Python floats
    exact in it); results are too. No checks: the public entries validated everything.
    """

    fmt: Format
    order: str = "pairwise"
    elementary: str = "correct"
    xp: Any = None

    def _out(self, name: str, result, *operands):
        ops = _RECORD.get()
        if ops is not None:
            # Copies: the losses update some results in place later (put_at).
            kept = tuple(_copy(v) for v in operands)
            ops.append(Op(name, self.fmt, self.elementary, kept, _copy(result)))
        return result

    def _in(self, a, b):
        """The operands as the format's arithmetic reads them (DAZ flushes subnormals)."""
        if self.fmt.subnormals in ("daz", "ftz_daz"):
            return tuple(_daz(v, self.fmt) for v in (a, b))
        return a, b

    def _binary(self, name: str, fn, a, b):
        """``RN(fn(a, b))`` for an arithmetic ufunc ``fn`` (into reused arrays in a step)."""
        x, y = self._in(a, b)
        return self._out(name, quantize_into(workspace.ufunc(fn, x, y), self.fmt), a, b)

    def add(self, a, b):
        """``RN(a + b)``."""
        return self._binary("add", np.add, a, b)

    def sub(self, a, b):
        """``RN(a - b)``."""
        return self._binary("sub", np.subtract, a, b)

    def mul(self, a, b):
        """``RN(a · b)``."""
        return self._binary("mul", np.multiply, a, b)

    def div(self, a, b):
        """``RN(a / b)``."""
        return self._binary("div", np.true_divide, a, b)

    def exp(self, x):
        """``RN(exp x)`` (``libm``: the library's exp in the carrier dtype, rounded)."""
        return self._out("exp", apply("exp", x, self.fmt, self.elementary, self.xp), x)

    def log(self, x):
        """``RN(log x)`` (``libm`` as :meth:`exp`)."""
        return self._out("log", apply("log", x, self.fmt, self.elementary, self.xp), x)

    def log1p(self, x):
        """``RN(log1p x)`` (``libm`` as :meth:`exp`)."""
        return self._out("log1p", apply("log1p", x, self.fmt, self.elementary, self.xp), x)

    def sum(self, x):
        """Row sums of a 2-D ``x`` in ``order``, every partial sum rounded (shape ``(N,)``)."""
        return ordered_sum(x, self.fmt, self.order)

    def dl_p_minus_one(self, p, dl):
        """``RN(dl · (p - 1))`` with one rounding (not ``RN(RN(p·dl) - dl)``)."""
        return self._out("dl_p_minus_one", _mul_sub(p, dl, dl, self.fmt, self.xp), p, dl)

    def mul_sub(self, p, dl, c):
        """``RN(p·dl - c)`` with one rounding (a fused multiply-subtract)."""
        return self._out("mul_sub", _mul_sub(p, dl, c, self.fmt, self.xp), p, dl, c)


def _daz(v, fmt: Format):
    if isinstance(v, float):
        return 0.0 * v if abs(v) < float(fmt.tiny) else v
    return flush_subnormals(v, fmt)


def _copy(v):
    return v if isinstance(v, float) else namespace(v).asarray(v, copy=True)


# --- one rounding of p * dl - c -------------------------------------------------------------


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


def _mul_sub(p, dl, c, fmt: Format, xp):
    """``RN_fmt(p·dl - c)`` with one rounding, for ``p``, ``dl``, ``c`` values of ``fmt``
    (``c = dl`` gives the losses' target entry ``dl·(p - 1)``).

    float16/bfloat16/float32: ``dl·p`` is exact in float64 (<= 48 bits), ``dl·p - c`` is
    an exact float64 pair (TwoSum), rounded to odd in float64 and then to nearest in ``fmt``:
    with ``53 >= p_fmt + 2`` bits the double rounding is innocuous (Boldo--Melquiond).
    float64/longdouble: ``dl·p = ph + pl`` exactly (Dekker), and the sum of the three terms
    ``-c + ph + pl`` is rounded correctly by Boldo--Melquiond's algorithm (two TwoSums, one
    addition rounded to odd, one to nearest).
    """
    if fmt.precision <= 24:
        f64 = xp_dtype(xp, np.float64)
        p64, d64, c64 = xp.astype(p, f64), xp.astype(dl, f64), xp.astype(c, f64)
        s, e = _two_sum(p64 * d64, -c64)
        return quantize(_round_odd(s, e, xp), fmt)
    split = 134217729.0 if fmt.precision == 53 else 4294967297.0  # 2**27 + 1, 2**32 + 1
    ph, pl = _two_prod(p, dl, split)
    uh, ul = _two_sum(ph, pl)
    th, tl = _two_sum(-c, uh)
    v, ve = _two_sum(tl, ul)
    return th + _round_odd(v, ve, xp)
