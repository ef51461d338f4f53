"""Rounding modes other than nearest-even, flush-to-zero, and stochastic rounding's random bits.

:func:`numstab.precision.quantize` rounds to nearest, ties to even, by default (its fast path).
Every other mode, and flush-to-zero, goes through :func:`round_to_grid` here: one vectorised
formula for all formats and modes, on NumPy or CuPy arrays of float32 or float64.

Modes (:data:`ROUNDING_MODES`)
------------------------------
``nearest``       nearest, ties to even (IEEE roundTiesToEven; the default)
``nearest_away``  nearest, ties away from zero (IEEE roundTiesToAway)
``toward_zero``   truncation (roundTowardZero)
``up``            toward +inf (roundTowardPositive)
``down``          toward -inf (roundTowardNegative)
``odd``           round to odd: exact values stay, others go to the neighbour whose last
                  significand bit is 1 (Boldo--Melquiond; makes a later rounding innocuous)
``stochastic``    up with probability ``(|x| - lo) / (hi - lo)``, else down: unbiased,
                  ``E[SR(x)] = x`` (the random bits: :func:`stochastic_uniform`)

Overflow follows IEEE 754 (clause 7.4): the modes that round away from zero at ``x``
(``nearest``, ``nearest_away``, ``stochastic`` rounding up, ``up`` for positive and ``down``
for negative ``x``) give the format's overflow value (``±inf``; NaN or ``±max`` for formats
without infinities, :attr:`~numstab.precision.Format.overflow`); the others give ``±max``.
``odd`` overflows to ``±max`` like truncation.

Subnormals (:data:`SUBNORMAL_RULES`)
------------------------------------
``gradual`` (IEEE), ``ftz`` (flush-to-zero on outputs: a rounded result below ``tiny`` in
magnitude becomes a zero of its sign; tininess after rounding), ``daz`` (denormals-are-zero on
inputs: operands below ``tiny`` are read as zero, :func:`flush_subnormals`; the rounding of
outputs is gradual), ``ftz_daz`` (both).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np

from numstab.backend import array_module, errstate

__all__ = [
    "ROUNDING_ALIASES",
    "ROUNDING_MODES",
    "SUBNORMAL_RULES",
    "canonical_rounding",
    "flush_subnormals",
    "in_stochastic_scope",
    "next_key",
    "round_to_grid",
    "stochastic_scope",
    "stochastic_uniform",
    "stochastic_words",
    "tensor_id",
]

#: Rounding modes, the default first.
ROUNDING_MODES = (
    "nearest", "nearest_away", "toward_zero", "up", "down", "odd", "stochastic",
)
#: Other spellings of the modes.
ROUNDING_ALIASES = {
    "rne": "nearest", "nearest_even": "nearest", "rn": "nearest",
    "rna": "nearest_away", "rz": "toward_zero", "truncate": "toward_zero",
    "ru": "up", "rd": "down", "ro": "odd", "sr": "stochastic",
}
#: Subnormal rules, the default first.
SUBNORMAL_RULES = ("gradual", "ftz", "daz", "ftz_daz")

_MASK64 = (1 << 64) - 1
_LITTLE = sys.byteorder == "little"
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (the golden ratio in 64 bits)
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def canonical_rounding(mode: str) -> str:
    """The canonical name of a rounding mode or alias; ``ValueError`` naming the valid ones."""
    key = ROUNDING_ALIASES.get(str(mode).strip().lower().replace("-", "_"), str(mode).lower())
    if key not in ROUNDING_MODES:
        raise ValueError(
            f"unknown rounding mode {mode!r}; valid: {', '.join(ROUNDING_MODES)} "
            f"(aliases: {', '.join(sorted(ROUNDING_ALIASES))})"
        )
    return key


# --- the random bits of stochastic rounding -------------------------------------------------


def _mix(z: int) -> int:
    """SplitMix64's finaliser on a Python int (mod 2**64)."""
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def _mix_array(z, xp):
    """The same finaliser on a uint64 array, in place (multiplications wrap mod 2**64)."""
    z ^= z >> xp.uint64(30)
    z *= xp.uint64(_M1)
    z ^= z >> xp.uint64(27)
    z *= xp.uint64(_M2)
    z ^= z >> xp.uint64(31)
    return z


def tensor_id(name: str) -> int:
    """A tensor's id for :func:`stochastic_uniform`: the first 8 bytes (little-endian) of the
    SHA-256 of its name, e.g. ``tensor_id("W1")``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def stochastic_words(key, n: int, xp=np, offset: int = 0):
    """Random 32-bit words, a pure function of ``(seed, step, tensor, element index)``.

    With ``key = (seed, step, tensor)`` (integers, taken mod 2**64) and ``mix`` SplitMix64's
    finaliser, ``h = mix(mix(mix(seed) ^ step) ^ tensor)``; counter ``k = 0, 1, ...`` gives
    ``z_k = mix(h + (k + 1) * 0x9E3779B97F4A7C15 mod 2**64)``, and word ``j`` is the low
    (``j`` even) or high (``j`` odd) half of ``z_{j // 2}``. Element ``i`` of a rounding uses
    word ``offset + i``. Nothing else enters: a resumed run redraws the same bits.

    Returns
    -------
    uint32 array of shape ``(n,)`` of module ``xp`` (NumPy or CuPy)
    """
    seed, step, tensor = (int(k) & _MASK64 for k in key)
    h = _mix(_mix(_mix(seed) ^ step) ^ tensor)
    k0, k1 = offset // 2, (offset + n + 1) // 2
    z = xp.arange(k0 + 1, k1 + 1, dtype=xp.uint64)
    z *= xp.uint64(_GAMMA)
    z += xp.uint64(h)
    _mix_array(z, xp)
    if _LITTLE:
        words = z.view(xp.uint32)
    else:  # the same words, split explicitly
        words = xp.stack([z & xp.uint64(0xFFFFFFFF), z >> xp.uint64(32)], axis=1)
        words = words.astype(xp.uint32).reshape(-1)
    return words[offset - 2 * k0 : offset - 2 * k0 + n]


def stochastic_uniform(key, n: int, xp=np, offset: int = 0):
    """The words of :func:`stochastic_words` as uniform numbers ``w * 2**-32`` in [0, 1)
    (float64, exact)."""
    return stochastic_words(key, n, xp, offset).astype(xp.float64) * 2.0**-32


_SCOPE: ContextVar[list | None] = ContextVar("numstab_stochastic_scope", default=None)


@contextmanager
def stochastic_scope(seed: int, step: int, phase: str) -> Iterator[None]:
    """Keys for the stochastic roundings inside the block: the ``n``-th rounding (in program
    order, from 0) draws with key ``(seed, step, tensor_id(phase) + n mod 2**64)``.

    The training loop opens one scope per phase of a step (``forward``, ``backward``,
    ``update``, ...), so every random bit is a function of (seed, step, phase, position of the
    rounding in the phase, element index), and a resumed run draws the same bits.
    """
    token = _SCOPE.set([int(seed), int(step) & _MASK64, tensor_id(phase), 0])
    try:
        yield
    finally:
        _SCOPE.reset(token)


def in_stochastic_scope() -> bool:
    """Whether a :func:`stochastic_scope` encloses the caller (its keys are then used)."""
    return _SCOPE.get() is not None


def next_key() -> tuple[int, int, int]:
    """The key of the next stochastic rounding of the enclosing :func:`stochastic_scope`."""
    s = _SCOPE.get()
    if s is None:
        raise ValueError(
            "stochastic rounding needs key=(seed, step, tensor), or a "
            "numstab.rounding_modes.stochastic_scope(seed, step, phase) block around it"
        )
    s[3] += 1
    return s[0], s[1], (s[2] + s[3] - 1) & _MASK64


# --- rounding onto a format's grid -----------------------------------------------------------


def flush_subnormals(x, fmt):
    """``x`` with every element below ``fmt``'s ``tiny`` in magnitude replaced by a zero of its
    sign (DAZ: how hardware reads subnormal operands). Same array type and dtype."""
    xp = array_module(x)
    tiny = float(fmt.tiny)
    with errstate(xp, invalid="ignore"):
        small = xp.abs(x) < tiny
    if not small.any():
        return x
    return xp.where(small, xp.copysign(x.dtype.type(0), x), x)


def round_to_grid(x, fmt, mode: str, ftz: bool, key=None, offset: int = 0, words=None):
    """Round a 1-D float32/float64 array (NumPy or CuPy) to ``fmt`` in ``mode``, keeping its
    dtype. No checks (``quantize`` validated everything).

    With ``q = 2**(max(e, emin) - p + 1)`` the quantum of ``fmt`` at ``|x|``'s binade ``e``,
    ``t = |x| / q`` is exact (a power-of-two scaling), ``lo = floor(t) q`` and
    ``hi = lo + q`` are the two neighbours on the format's grid (``hi`` may be the next
    binade's power of two, or beyond ``max``: overflow), and ``f = t - floor(t)`` (exact) is
    the distance to ``lo`` in quanta. Each mode picks ``hi`` on a condition of ``f``, the sign
    and the parity of ``floor(t)``; ``stochastic`` when ``w 2**-32 >= 1 - f``, ``w`` word
    ``offset + i`` of :func:`stochastic_words` (or ``words[i]`` when given): ``P(hi) = f``
    whenever ``f`` is a multiple of ``2**-32`` (every float32 input from ``2**-9 q`` up;
    below, ``f`` rounded up to one). float32 input in stochastic mode
    takes :func:`_stochastic_float32`, the same rounding with the same words, faster.
    """
    if mode == "stochastic" and words is None:
        words = stochastic_words(key, x.size, array_module(x), offset)
        if x.dtype == np.float32 and not (ftz or not fmt.has_subnormals):
            return _stochastic_float32(x, fmt, words)
    xp = array_module(x)
    dt = x.dtype.type
    p, emin = fmt.precision, fmt.emin
    top = dt(float(fmt.max))
    with errstate(xp, over="ignore", invalid="ignore", under="ignore"):
        a = xp.abs(x)
        _, e = xp.frexp(a)
        e = xp.maximum(e - 1, emin) - (p - 1)
        q = xp.ldexp(xp.ones_like(a), e)
        t = a / q
        fl = xp.floor(t)
        f = t - fl
        neg = xp.signbit(x)
        if mode == "nearest":
            up = (f > 0.5) | ((f == 0.5) & (xp.fmod(fl, 2) == 1))
        elif mode == "nearest_away":
            up = f >= 0.5
        elif mode == "toward_zero":
            up = xp.zeros(a.shape, dtype=bool)
        elif mode == "up":
            up = (f > 0) & ~neg
        elif mode == "down":
            up = (f > 0) & neg
        elif mode == "odd":
            up = (f > 0) & (xp.fmod(fl, 2) == 0)
        else:  # stochastic
            up = words.astype(xp.float64) * 2.0**-32 >= 1.0 - f.astype(xp.float64)
        r = (fl + up) * q
        if ftz or not fmt.has_subnormals:
            r = xp.where(r < float(fmt.tiny), dt(0), r)
        r = xp.copysign(r, x)
        special = ~(r <= top) | ~(a <= top)  # overflow, inf or NaN input
        if special.any():
            r = _overflow(x, r, special, fmt, mode, up, neg, top, xp)
        if not fmt.signed_zero:
            r += dt(0)  # -0 + 0 = +0: the "fnuz" formats have no -0
    return r


def _overflow(x, r, special, fmt, mode, up, neg, top, xp):
    """Results beyond ``max`` or from ±inf/NaN input (a sparse mask)."""
    xs, rs = x[special], r[special]
    ups, negs = up[special], neg[special]
    dt = x.dtype.type
    away = xp.isinf(xs) | {
        "nearest": True, "nearest_away": True, "toward_zero": False, "odd": False,
        "up": ~negs, "down": negs, "stochastic": ups,
    }[mode]
    big = {"inf": dt(np.inf), "nan": dt(np.nan), "saturate": top}[fmt.overflow]
    fixed = xp.where(away & ~(xp.abs(rs) <= top), big, xp.minimum(xp.abs(rs), top))
    fixed = xp.where(xp.isnan(xs), dt(np.nan), fixed)
    out = r.copy()
    out[special] = xp.copysign(fixed, xs)
    return out


def _stochastic_float32(x, fmt, words):
    """Stochastic rounding of float32 ``x`` (1-D) on its bit pattern.

    Where ``fmt``'s quantum ``q`` at ``|x|`` spans ``d <= 23`` low bits of ``|x|``'s pattern
    (``d = 23 - (p - 1)`` for normal results, more below ``fmt``'s ``tiny``), adding the top
    ``d`` bits of the word ``w`` to the pattern and clearing the low ``d`` bits rounds up
    exactly when ``w >> (32 - d)`` reaches the distance to the upper neighbour in source ulps,
    ``2**d (1 - f)``: the event ``w 2**-32 >= 1 - f`` of :func:`round_to_grid`, ``P = f``; a
    carry into the exponent is the next binade. Below ``q`` (``d > 23``) the result is ``q``
    when ``w 2**-32 >= 1 - |x| / q``, else 0. Elements below ``tiny`` are redone on a sparse
    mask; those beyond ``max`` (and ±inf, NaN) go through :func:`round_to_grid` with their
    words.
    """
    xp = array_module(x)
    u32 = xp.uint32
    u = x.view(u32)
    a = u & u32(0x7FFFFFFF)
    d0 = 23 - (fmt.precision - 1)
    r = words >> u32(32 - d0)
    r += a
    r &= u32(~((1 << d0) - 1) & 0xFFFFFFFF)
    small = a < np.float32(float(fmt.tiny)).view(u32)
    if small.any():
        r[small] = _stochastic_below_tiny(a[small], fmt, words[small], xp)
    r |= u & u32(0x80000000)
    out = r.view(np.float32)
    top = np.float32(float(fmt.max)).view(u32)
    if a.max() > top:
        special = a > top
        out[special] = round_to_grid(x[special], fmt, "stochastic", False, words=words[special])
    if not fmt.signed_zero:
        out += np.float32(0)
    return out


def _stochastic_below_tiny(a, fmt, words, xp):
    """:func:`_stochastic_float32` for magnitudes (bit patterns ``a``) below ``fmt``'s tiny."""
    u32 = xp.uint32
    ef = xp.maximum(a >> u32(23), u32(1)).astype(xp.int32)
    d = (23 - (fmt.precision - 1)) + ((fmt.emin + 127) - ef)
    below = d > 23
    d = xp.minimum(d, 23).astype(u32)
    r = words >> (u32(32) - d)
    r += a
    r &= ~((u32(1) << d) - u32(1))
    if below.any():
        q = 2.0 ** (fmt.emin - fmt.precision + 1)
        v = a[below].view(np.float32).astype(xp.float64)
        up = words[below].astype(xp.float64) * 2.0**-32 >= 1.0 - v / q
        r[below] = xp.where(up, np.float32(q).view(u32), u32(0))
    return r
