"""Helpers shared by several test modules (imported as ``from helpers import ...``).

Exact arithmetic (``frac``, ``fsum_dot``), Higham's ``gamma``, dyadic test points for
finite differences, bit patterns, NumPy's pairwise summation and ``numstab.metrics``'
``"lanes8"`` dot products written out, and the modular-addition index inputs.
"""

from __future__ import annotations

import math
import signal
import subprocess
from fractions import Fraction

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, settings

from numstab.precision import quantize
from numstab.run.driver import StopFlag

U = 2.0**-53  #: unit roundoff of float64
BITS = 20  #: dyadic test points are multiples of 2**-BITS
_UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}
_PATTERN_DTYPE = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# Example budgets for slow properties, scaled with the loaded hypothesis profile (conftest:
# ci = 60, thorough = 600).
_BASE = settings().max_examples
SOME = settings(
    max_examples=max(8, _BASE // 4),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
FEW = settings(
    max_examples=max(5, _BASE // 8),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class StopAfter(StopFlag):
    """A stop request (SIGTERM) at the ``n``-th step boundary, as if the signal had come."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __bool__(self):
        self.n -= 1
        if self.n < 0:
            self.signum = signal.SIGTERM
        return self.n < 0


def gamma(n, u=U):
    """Higham's ``γ_n = n u / (1 - n u)``: an ``n``-term sum or dot product, in any order, is
    within ``γ_n · Σ|terms|`` of the exact value."""
    return n * u / (1 - n * u)


def frac(v) -> Fraction:
    """Exact Fraction of a finite mpf (any context) or float / NumPy scalar of any format."""
    t = getattr(v, "_mpf_", None)
    if t is not None:
        sign, man, exp, _ = t
        assert man or exp == 0, f"{v} is not finite"
        f = Fraction(int(man)) * Fraction(2) ** int(exp)
        return -f if sign else f
    if isinstance(v, np.longdouble):
        return Fraction(*v.as_integer_ratio())
    return Fraction(float(v))


def fsum_dot(a, b) -> float:
    """``Σ a·b`` in float64: each product rounded once (u), then an exactly rounded sum (u)."""
    return math.fsum((np.asarray(a, np.float64) * np.asarray(b, np.float64)).ravel().tolist())


def abs_dot(a, b) -> float:
    """``Σ |a·b|`` in float64 (products rounded once, exactly rounded sum)."""
    return math.fsum(np.abs(np.asarray(a, np.float64) * np.asarray(b, np.float64)).ravel().tolist())


def dyadic(rng, shape, scale=1.0):
    """Random multiples of 2**-BITS (so that x ± h·v is exact for power-of-two h)."""
    return np.round(rng.standard_normal(shape) * scale * 2.0**BITS) / 2.0**BITS


def shifted(x, v, h):
    """``x + h v`` and ``x - h v``, asserting both are exact: x, v multiples of 2**-BITS, h a
    power of two, and |x| + h|v| below 2**53 quanta of 2**-BITS·h."""
    assert h <= 1 and h == 2.0 ** round(math.log2(h))
    assert np.all(np.mod(x, 2.0**-BITS) == 0) and np.all(np.mod(v, 2.0**-BITS) == 0)
    assert np.all(np.abs(x) + h * np.abs(v) < 2.0 ** (53 - BITS) * h)
    return x + h * v, x - h * v


def bits(x):
    """Bit patterns of a float32 / float64 array (bit-for-bit comparisons, signed zeros too)."""
    x = np.ascontiguousarray(x)
    return x.view(_UINT[x.dtype])


def representable(x, fmt) -> bool:
    """True where every element is a value of ``fmt`` (NaN counts as representable)."""
    x = np.asarray(x)
    q = quantize(x, fmt)
    return bool(np.all((q == x) | (np.isnan(q) & np.isnan(x))))


def all_patterns(fmt) -> np.ndarray:
    """All 65 536 values of a 16-bit format (name or dtype), every NaN payload included."""
    dt = _PATTERN_DTYPE.get(fmt, fmt) if isinstance(fmt, str) else fmt
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dt)


def numpy_pairwise_sum(row, dtype):
    """NumPy's pairwise summation of a whole 1-D ``row`` in ``dtype``, written scalar by scalar
    from NumPy's C source (``@TYPE@_pairwise_sum``, loops_utils.h.src): under 8 terms a loop
    from ``-0.0``; up to 128, eight interleaved partial sums joined as
    ``((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))``, then the rest left to right; above,
    halves of ``n // 2`` rounded down to a multiple of 8. The reduction adds it to the
    identity ``+0``. Independent of numstab, and of how a NumPy release splits long rows."""
    t = np.dtype(dtype).type
    a = [t(v) for v in np.asarray(row, dtype=dtype)]

    def pw(lo, n):
        if n < 8:
            res = t(-0.0)
            for i in range(n):
                res = t(res + a[lo + i])
            return res
        if n <= 128:
            r = a[lo : lo + 8]
            i = 8
            while i < n - n % 8:
                r = [t(r[k] + a[lo + i + k]) for k in range(8)]
                i += 8
            res = t(t(t(r[0] + r[1]) + t(r[2] + r[3])) + t(t(r[4] + r[5]) + t(r[6] + r[7])))
            for j in range(i, n):
                res = t(res + a[lo + j])
            return res
        n2 = n // 2
        n2 -= n2 % 8
        return t(pw(lo, n2) + pw(lo + n2, n - n2))

    return t(t(0.0) + pw(0, len(a)))


def modular_idx(p):
    """Index inputs ``(a, p + b)`` of all ``p²`` pairs of the modular-addition task."""
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    return np.stack([a.ravel(), p + b.ravel()], axis=1)


def onehot_counts(idx, n_rows):
    """Dense multi-hot matrix of index inputs (counts), built independently of the module."""
    out = np.zeros((idx.shape[0], n_rows))
    np.add.at(out, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    return out


def read_head_then_close(cmd, n_lines: int, **popen_kw):
    """Run ``cmd``, read ``n_lines`` lines of its stdout and close the pipe, as ``| head``
    does; return ``(lines, returncode, stderr text)``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_kw)
    try:
        head = [proc.stdout.readline() for _ in range(n_lines)]
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return head, proc.returncode, err


def lanes8_loop(a, b):
    """The order ``"lanes8"`` written out as its definition: Python floats (IEEE float64),
    the product of entry ``i`` added to lane ``i mod 8`` from ``+0`` in order of ``i``, the
    lanes summed ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``."""
    lanes = [[0.0] * 8 for _ in range(3)]
    xs, ys = a.astype(np.float64).tolist(), b.astype(np.float64).tolist()
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        j = i % 8
        lanes[0][j] += x * x
        lanes[1][j] += y * y
        lanes[2][j] += x * y
    return [((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])) for v in lanes]
