"""Correctly rounded ``exp``, ``log``, ``log1p`` and ``expm1`` in every format.

Each function returns ``RN_fmt(f(x))``: the exact value of the function at the exact input,
rounded once to nearest (ties to even) in the declared format, with subnormals, overflow to
``±inf`` and IEEE / C99 Annex F special values. ``mode="libm"`` instead gives what the array
library's own functions give (the project's behaviour before this module: NumPy's SIMD float32
``exp`` is not correctly rounded, e.g. ``exp(-2**-23)`` is ``0.99999994`` where the correctly
rounded value is ``1 - 2**-23``), so that old runs stay reproducible bit for bit.

How the correct result is obtained (``docs/elementary.md`` has the full account)
------------------------------------------------------------------------------
No installable library fitted (CRlibm's Python binding is from 2016 with no wheels and scalar
calls; ``crival`` ships CORE-MATH only as interval functions): the result is computed in a wider
format with a stated error bound, rounded, and the rare inputs whose wide value lies too close to
a rounding boundary of the target are settled exactly with mpmath (a Ziv loop).

* float16, bfloat16, float32: the function in float64 (NumPy's / CuPy's float64 functions,
  a few ulps at most: measured max 0.66 ulp here; the argument is exact in float64). A wide value
  ``w`` is decided when ``w (1 - 2**-44)`` and ``w (1 + 2**-44)`` round to the same target value
  (rounding is monotone, and the exact value lies in between as long as the float64 error is
  below 2**8 ulps: a margin of more than 2**7 over the measured error). About one input in 2**19
  (float32) is left undecided: for float32 with a normal result, the x87 long double function
  (where long double is that format) decides it with the window ``2**-61`` used for float64
  below; the rest (and every undecided float16 / bfloat16 input) goes to mpmath.
* float64, ``exp``: Cody--Waite reduction ``x = (4096 m + j) ln2/4096 + r`` (``ln2/4096`` as
  two constants), a table of ``2**(j/4096)`` as double-doubles and a degree-4 polynomial. A
  fast pass in plain float64 (relative error below ``2**-63.5``) decides all but about 0.3 %
  of the inputs (window ``2**-61.5``); those are redone in double-double arithmetic (Dekker's
  exact product; error below ``2**-70.5``, window ``2**-68``), and about one input in 2**14
  (plus results in the subnormal range and at the overflow threshold) goes to mpmath.
* float64, ``log``, ``log1p``, ``expm1``: x87 ``long double`` functions (glibc, 64-bit
  significand; measured relative error below ``2**-63.5``), window ``2**-61`` (at least 4
  long-double ulps, 5x the measured error); about 0.6 % of inputs need mpmath. These run on the
  host (NumPy); on other backends the array is copied to the host and back.
* longdouble: no wider hardware format exists, so every element is evaluated with mpmath (a Ziv
  loop): correctly rounded, tens of µs per element. ``mode="libm"`` gives glibc's x87 result
  (not proven correctly rounded, nor faithful).
* ``sqrt`` and ``+ - * /`` need nothing here: IEEE 754 makes them correctly rounded.

Backends: NumPy (chunked, with reused buffers; the float64 ``exp``'s fast pass and the
float32 rounding test fused into one pass each where :mod:`numstab.kernels` runs, the same
bits), and any array-API namespace with the same algorithm through standard functions (CuPy;
array_api_strict in the tests). mpmath resolution always runs on the host. Correctly rounded
results are the same bits on every backend.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np

from numstab import exact, kernels, parallel, workspace
from numstab.backend import errstate, namespace, to_numpy, xp_dtype
from numstab.fastround import magic_constants, quantize_into
from numstab.precision import ELEMENTARY_MODES, Format, get_format, quantize
from numstab.rounding_modes import flush_subnormals

__all__ = [
    "ELEMENTARY_MODES",
    "FUNCTIONS",
    "apply",
    "check_mode",
    "evaluate",
    "exact_round",
    "exp",
    "expm1",
    "log",
    "log1p",
]

# ELEMENTARY_MODES (from numstab.precision, which validates policies with it): ``correct``
# (correctly rounded) or ``libm`` (the array library's own functions).
#: The functions this module provides.
FUNCTIONS = ("exp", "log", "log1p", "expm1")

_CHUNK = 1 << 13  # elements per NumPy block: the temporaries stay in the L2 cache
#: Block of the float32-and-narrower path: fewer NumPy calls per element; measured fastest
#: (2**13 .. 2**17 tried) on a (5107, 113) softmax batch.
_CHUNK_NARROW = 1 << 15
_REL_NARROW = 2.0**-44  # window around a float64 value (>= 2**8 float64 ulps)
_REL_LD = 2.0**-61  # window around a long double value (>= 4 long double ulps)
_REL_DD = 2.0**-68  # window around the double-double exp (error < 2**-72)
#: long double is x87 extended here (64-bit significand): the ``_REL_LD`` window holds for it.
_X87 = np.finfo(np.longdouble).nmant == 63


def check_mode(mode) -> str:
    """Return ``mode`` if it is one of :data:`ELEMENTARY_MODES`, else raise ``ValueError``."""
    if mode not in ELEMENTARY_MODES:
        raise ValueError(f"unknown elementary mode {mode!r}; valid: {', '.join(ELEMENTARY_MODES)}")
    return mode


def _check_name(name) -> str:
    if name not in FUNCTIONS:
        raise ValueError(f"unknown elementary function {name!r}; valid: {', '.join(FUNCTIONS)}")
    return name


def evaluate(name: str, x, fmt=None, *, mode: str = "correct"):
    """``name(x)`` rounded to ``fmt``: the public entry of the four functions.

    Parameters
    ----------
    name : {"exp", "log", "log1p", "expm1"}
    x : array of any shape (NumPy, CuPy or array-API), values representable in ``fmt``
        (a value that is not is first rounded to ``fmt``).
    fmt : str or Format, optional
        Default: the format of ``x.dtype`` (float16, bfloat16, float32, float64, longdouble).
    mode : {"correct", "libm"}

    Returns
    -------
    array, shape of ``x``, carrier dtype of ``fmt`` (float32 for float16/bfloat16)
        ``correct``: ``RN_fmt(f(x))``. Special values as C99 Annex F: ``exp(-inf) = +0``,
        ``exp(+inf) = +inf``, ``log(±0) = -inf``, ``log(x < 0) = NaN``, ``log(+inf) = +inf``,
        ``log1p(-1) = -inf``, ``log1p(x < -1) = NaN``, ``expm1(-inf) = -1``, ``log1p(±0)``
        and ``expm1(±0)`` keep the sign of zero, NaN gives NaN. No floating-point warnings.
        ``libm``: ``fl_fmt(libm_f(x))`` in the carrier dtype (float16/bfloat16 through float32).
    """
    _check_name(name)
    check_mode(mode)
    xp = namespace(x)
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    f = get_format(x.dtype if fmt is None else fmt)
    with errstate(xp, invalid="ignore", over="ignore", divide="ignore"):
        x = quantize(x, f)
    return apply(name, x, f, mode, xp)


def exp(x, fmt=None, *, mode: str = "correct"):
    """``e**x`` rounded to ``fmt`` (see :func:`evaluate`)."""
    return evaluate("exp", x, fmt, mode=mode)


def log(x, fmt=None, *, mode: str = "correct"):
    """Natural logarithm rounded to ``fmt`` (see :func:`evaluate`)."""
    return evaluate("log", x, fmt, mode=mode)


def log1p(x, fmt=None, *, mode: str = "correct"):
    """``log(1 + x)`` rounded to ``fmt``, without forming ``1 + x`` (see :func:`evaluate`)."""
    return evaluate("log1p", x, fmt, mode=mode)


def expm1(x, fmt=None, *, mode: str = "correct"):
    """``e**x - 1`` rounded to ``fmt``, without cancellation (see :func:`evaluate`)."""
    return evaluate("expm1", x, fmt, mode=mode)


def apply(name: str, x, fmt: Format, mode: str, xp):
    """:func:`evaluate` without its checks, for the engine's hot path: ``name`` and ``mode``
    already valid, ``fmt`` a :class:`~numstab.precision.Format`, ``x`` in ``fmt``'s carrier
    dtype (values of ``fmt``), ``xp`` its namespace."""
    if fmt.rounding != "nearest" or fmt.subnormals != "gradual":
        return _apply_arithmetic(name, x, fmt, mode, xp)
    with errstate(xp, invalid="ignore", over="ignore", divide="ignore"):
        if mode == "libm":
            return quantize(getattr(xp, name)(x), fmt)
        if fmt.precision <= 24 and fmt.emax <= 127:  # float32 and everything it holds
            return _narrow(name, x, fmt, xp)
        if fmt.name == "float64":
            if name == "exp":
                return _exp64(x, xp)
            return _via_longdouble(name, x, xp)
        return _all_exact(name, x, fmt)


def _apply_arithmetic(name, x, fmt: Format, mode: str, xp):
    """:func:`apply` for a format with another rounding mode or subnormal rule.

    Operands are flushed first under DAZ. To nearest: the correctly rounded result, flushed
    under FTZ. Directed modes and round to odd: the float64 function value (a few float64 ulps
    from the exact one) rounded in the mode, not proven correct: it can differ from rounding
    the exact value only when that lies within ``2**-50`` (relative) of a value of the format.
    Stochastic: that value rounded to the carrier (float32) first, as every result of the
    emulation is.
    """
    if fmt.subnormals in ("daz", "ftz_daz"):
        x = flush_subnormals(x, fmt)
    if fmt.rounding == "nearest":
        return quantize(apply(name, x, fmt.plain, mode, xp), fmt)
    with errstate(xp, invalid="ignore", over="ignore", divide="ignore"):
        w = getattr(xp, name)(xp.astype(x, xp_dtype(xp, np.float64)))
        if fmt.rounding == "stochastic":  # from the carrier's value, like every other result
            w = xp.astype(w, xp_dtype(xp, fmt.carrier))
        return quantize(w, fmt)


# --- exact resolution (mpmath, Ziv loop) ---------------------------------------------------


def exact_round(name: str, values, fmt) -> np.ndarray:
    """``RN_fmt(name(v))`` for every element of a host array, by mpmath (a Ziv loop).

    Each value is taken exactly (float16 ... longdouble, via :func:`numstab.exact.to_exact`);
    ``f(v)`` is evaluated at ``P`` bits, whose error mpmath keeps below ``2**(1 - P)`` relative,
    and accepted when ``f(v) (1 ± 2**(3 - P))`` round to one value; otherwise ``P`` doubles. The
    loop ends because the results are transcendental except at the trivial exact points
    (``exp(0)``, ``log(1)``, ...), which are never midpoints. Tens of µs per element.

    Returns
    -------
    numpy.ndarray of ``fmt``'s dtype, shape of ``values``
    """
    _check_name(name)
    f = get_format(fmt)
    values = np.asarray(values)
    flat = values.reshape(-1)
    with np.errstate(all="ignore"):
        # Special values (inf, NaN, the poles, the NaN domain) and the exact results at 0
        # (exp(0) = 1; log1p(±0), expm1(±0) = ±0, sign kept): IEEE results, exact.
        out = getattr(np, name)(flat.astype(np.float64) if f.dtype != np.longdouble else flat)
        out = np.asarray(out).astype(f.dtype)
        regular = np.isfinite(flat) & (flat != 0)
        if name == "log":
            regular &= flat > 0
        elif name == "log1p":
            regular &= flat > -1
    todo = np.flatnonzero(regular)
    prec = f.precision + 40
    while todo.size:
        if prec > 1 << 14:
            raise RuntimeError(f"{name}({flat[todo[0]]!r}) not decided within 16384 bits")
        ctx, wide = exact.context(prec), exact.context(2 * prec + 8)
        fn = getattr(ctx, name)
        tol = wide.mpf(2) ** (3 - prec)
        ys = [wide.mpf(fn(t)) for t in exact.to_exact(flat[todo], prec=prec)]
        lo = exact.round_exact(np.array([y * (1 - tol) for y in ys], dtype=object), f)
        hi = exact.round_exact(np.array([y * (1 + tol) for y in ys], dtype=object), f)
        # NaN only where both ends overflow in a format without infinities (E4M3FN); a zero
        # cannot be an end (the results are nonzero)
        done = (lo == hi) | (np.isnan(lo) & np.isnan(hi))
        out[todo[done]] = lo[done]
        todo = todo[~done]
        prec *= 2
    return out.reshape(values.shape)


def _resolve(name, x, r, amb, fmt: Format, xp):
    """Replace ``r`` where ``amb`` by the mpmath result for ``x`` (same backend as ``r``)."""
    if xp is np:
        idx = np.flatnonzero(amb)
        if idx.size:
            flat = r.reshape(-1)
            flat[idx] = exact_round(name, x.reshape(-1)[idx], fmt)
        return r
    amb_h = to_numpy(amb).reshape(-1)
    if not amb_h.any():
        return r
    idx = np.flatnonzero(amb_h)
    r_h = np.array(to_numpy(r)).reshape(-1)  # a writable host copy
    r_h[idx] = exact_round(name, np.asarray(to_numpy(x)).reshape(-1)[idx], fmt)
    return xp.reshape(xp.asarray(r_h.astype(fmt.carrier)), r.shape)


def _all_exact(name, x, fmt: Format):
    """longdouble (NumPy only): every element by mpmath."""
    return exact_round(name, np.asarray(x), fmt)


# --- float16, bfloat16, float32: float64 evaluation ------------------------------------------

_HALF29 = np.uint64(1 << 28)
_MASK29 = np.uint64((1 << 29) - 1)
_K64 = 1 << 9  # float64 ulps on each side of a float32 midpoint: 2**9 * 2**-52 >= 2**-44
#: The same test's constants for :func:`numstab.kernels.narrow_round`.
_NARROW_TEST = (_HALF29 - np.uint64(_K64), _MASK29, np.uint64(2 * _K64), _REL_NARROW, 2.0**-126)


#: float16 / bfloat16 (nearest even, gradual underflow): the float64 bits below the target's
#: significand (53 - precision) and the smallest normal target magnitude.
_LOW_BITS = {"float16": (42, 2.0**-14), "bfloat16": (45, 2.0**-126)}


def _near_midpoint(w, u, amb, fmt: Format):
    """The float32 test of :func:`_narrow_block` for float16 / bfloat16: ``w`` within
    ``_K64`` float64 ulps of a midpoint of the target (its low bits near half their range),
    where the target's quantum is relative (``|w|`` at least its smallest normal); below
    that, the bracket. ``u``, ``amb``: scratch of ``w``'s size. Returns the mask or None."""
    bits, tiny = _LOW_BITS[fmt.name]
    half, mask = np.uint64(1 << (bits - 1)), np.uint64((1 << bits) - 1)
    np.subtract(w.view(np.uint64), half - np.uint64(_K64), out=u)
    np.bitwise_and(u, mask, out=u)
    out = None
    if u.min() <= 2 * _K64:
        out = np.less_equal(u, np.uint64(2 * _K64), out=amb)
    sel = np.flatnonzero(np.abs(w) < tiny)  # subnormal results (and zeros): the bracket
    if sel.size:
        if out is None:
            out = np.zeros(w.size, dtype=bool)
        out[sel] = _bracket_ambiguous(w[sel], fmt, _REL_NARROW, np)
    return out


def _round_near_midpoint(w, of, amb, fmt: Format):
    """``of <- quantize(w, fmt)`` and the mask of the elements left undecided (or None) in
    one pass (:func:`numstab.kernels.narrow_round16`): :func:`_near_midpoint`'s test for
    normal results; for subnormal ones (and zeros), a midpoint of their grid (the quantum
    ``2 q_half = 2**(emin + 1 - precision)``) within ``|w| 2**-44`` plus a slack of
    ``q_half 2**-40`` of ``|w|`` (the slack covers the bracket's float64 roundings,
    ``|w| 2**-53 < q_half 2**-42``: every element the bracket leaves is left). The rare
    elements beyond the format's largest finite value are rounded as :func:`_near_midpoint`
    does them."""
    bits, tiny = _LOW_BITS[fmt.name]
    _, absmask, expmask, floor, shift, top, _ = magic_constants(np.dtype(np.float64), fmt)
    half, low = np.uint64(1 << (bits - 1)), np.uint64((1 << bits) - 1)
    q_half = math.ldexp(tiny, -fmt.precision)  # half the subnormal quantum
    consts = (absmask, expmask, floor, shift, top, half - np.uint64(_K64), low,
              np.uint64(2 * _K64), tiny, q_half, _REL_NARROW, math.ldexp(q_half, -40))  # fmt: skip
    counts = np.zeros(2, np.int64)
    kernels.narrow_round16(w, of, amb, counts, consts)
    n_amb, n_special = (int(c) for c in counts)
    if n_special:
        special = np.flatnonzero((w.view(np.uint64) & absmask) > top)
        of[special] = quantize(w[special], fmt)
    return amb if n_amb else None


def _bracket_ambiguous(w, fmt: Format, rel: float, xp):
    """``w (1 - rel)`` and ``w (1 + rel)`` round to different values of ``fmt``."""
    d = workspace.ufunc(np.multiply, w, rel)  # exact (a power of two); 1 - rel would
    # round to 1 in float64 for 2**-60
    lo = quantize_into(workspace.ufunc(np.subtract, w, d), fmt)
    hi = quantize_into(workspace.ufunc(np.add, w, d), fmt)
    return (lo != hi) & xp.isfinite(w)


def _narrow(name, x, fmt: Format, xp):
    f64 = xp_dtype(xp, np.float64)
    if xp is not np:
        w = getattr(xp, name)(xp.astype(x, f64))
        r = quantize(w, fmt)
        return _resolve(name, x, r, _bracket_ambiguous(w, fmt, _REL_NARROW, xp), fmt, xp)
    fn = getattr(np, name)
    out = workspace.empty(x.shape, np.float32)
    xf, of = x.reshape(-1), out.reshape(-1)
    n = xf.size

    def block(start, stop):
        return _narrow_block(fn, name, xf[start:stop], of[start:stop], fmt, start)

    # Each element's result depends on that element alone: blocks on parallel threads.
    amb_idx = [i for part in parallel.map_blocks(block, n, _CHUNK_NARROW) for i in part]
    if amb_idx:
        idx = np.concatenate(amb_idx)
        of[idx] = _settle(name, xf[idx], fmt)
    return out


def _narrow_block(fn, name, xf, of, fmt: Format, offset: int) -> list:
    """``of <- RN_fmt(fn(xf))`` chunk by chunk where the float64 value decides it; returns the
    flat indices (plus ``offset``) left for :func:`_settle`."""
    n = xf.size
    wbuf = workspace.empty(min(n, _CHUNK_NARROW), np.float64)
    ubuf = workspace.empty(min(n, _CHUNK_NARROW), np.uint64)
    abuf = workspace.empty(min(n, _CHUNK_NARROW), bool)
    amb_idx = []
    for s in range(0, n, _CHUNK_NARROW):
        xs = xf[s : s + _CHUNK_NARROW]
        k = xs.size
        w, u = wbuf[:k], ubuf[:k]
        fn(xs, out=w, dtype=np.float64)
        if fmt.name == "float32":
            # Near a float32 midpoint the low 29 bits of w are near 2**28: ambiguous when
            # within _K64 float64 ulps of it. Valid where the float32 quantum is 2**-23
            # relative, i.e. |w| >= 2**-126; the subnormal range is checked by the bracket.
            # inf and NaN (input NaNs widened, or the default NaN) have low bits 0: decided.
            amb = None
            if kernels.applies(w):  # the rounding and both tests in one pass
                if kernels.narrow_round(w, of[s : s + k], abuf[:k], *_NARROW_TEST):
                    amb = abuf[:k]
            else:
                amb = _narrow32_numpy(name, xs, w, u, of[s : s + k], abuf[:k], fmt)
        elif fmt.name in _LOW_BITS:
            if kernels.applies(w):  # the rounding and the test in one pass
                amb = _round_near_midpoint(w, of[s : s + k], abuf[:k], fmt)
            else:
                of[s : s + k] = quantize_into(w, fmt)
                amb = _near_midpoint(w, u, abuf[:k], fmt)
        else:
            of[s : s + k] = quantize_into(w, fmt)
            amb = _bracket_ambiguous(w, fmt, _REL_NARROW, np)
        if amb is not None and amb.any():
            amb_idx.append(np.flatnonzero(amb) + (s + offset))
    return amb_idx


def _narrow32_numpy(name, xs, w, u, of, abuf, fmt: Format):
    """:func:`_narrow_block`'s float32 rounding and test on the NumPy path: ``of <- w``
    rounded, and the mask of the elements left undecided (or None): the low-bits test where
    the float32 quantum is relative, the bracket where results can be subnormal."""
    # Results below 2**-126 (subnormal) need the bracket: only exp of x < -87.3 and log1p /
    # expm1 of tiny x produce them (log's smallest non-zero |result| is ~2**-24); tested on
    # the chunk's input, NaN included.
    if name == "exp":
        tiny_out = not xs.min() >= -87.3
    else:
        tiny_out = name in ("log1p", "expm1") and not np.min(np.abs(xs)) >= 2.0**-125
    of[...] = w  # one rounding, float64 -> float32 (RN)
    np.subtract(w.view(np.uint64), _HALF29 - np.uint64(_K64), out=u)
    np.bitwise_and(u, _MASK29, out=u)
    amb = None
    # A minimum first: one pass instead of a mask and its ``any`` in the usual block with no
    # ambiguous element (a block of 2**15 has one with probability ~6 %).
    if u.min() <= 2 * _K64:
        amb = np.less_equal(u, np.uint64(2 * _K64), out=abuf)
    if tiny_out:
        if amb is None:
            amb = np.zeros(w.size, dtype=bool)
        # exp(x) >= exp(-87.33) > 2**-126 elsewhere: a test on the (narrower) input
        tiny = xs < -87.33 if name == "exp" else np.abs(w) < 2.0**-126
        sel = np.flatnonzero(tiny)
        amb[sel] = _bracket_ambiguous(w[sel], fmt, _REL_NARROW, np)
    return amb


def _settle(name, x, fmt: Format):
    """``RN_fmt(f(x))`` (float32 carrier) for the few inputs whose float64 value was too close
    to call: float32 results first from x87 long double (window ``_REL_LD``; where long double
    is that format, and only for normal results), the rest by mpmath, each distinct value once
    (a training batch repeats values)."""
    out = np.empty(x.shape, dtype=np.float32)
    todo = np.ones(x.shape, dtype=bool)
    if fmt.name == "float32" and _X87:
        w = getattr(np, name)(x.astype(np.longdouble))
        out[...] = w  # one rounding, long double -> float32 (RN)
        todo = _bracket_ambiguous(w, fmt, _REL_LD, np) | (np.abs(w) < 2.0**-126)
    if todo.any():
        values, where = np.unique(x[todo], return_inverse=True)
        out[todo] = exact_round(name, values, fmt).astype(np.float32)[where]
    return out


# --- float64 log, log1p, expm1: x87 long double evaluation ----------------------------------


def _via_longdouble(name, x, xp):
    f64 = get_format("float64")
    if xp is not np:
        r = _via_longdouble(name, np.asarray(to_numpy(x)), np)
        return xp.asarray(r)
    w = getattr(np, name)(x.astype(np.longdouble))
    r = w.astype(np.float64)
    amb = _bracket_ambiguous(w, f64, _REL_LD, np)
    return _resolve(name, x, r, amb, f64, np)


# --- float64 exp: double-double evaluation ---------------------------------------------------

_N = 4096  # table size: x = (4096 m + j) ln2/4096 + r, |r| <= ln2/8192 < 2**-13.5
_LOG2N = 12
_MAGIC_R1 = 1.5 * 2.0**12  # (r + M) - M rounds r to a multiple of 2**-40 (<= 27 bits here)
_SPLIT = 134217729.0  # Dekker's 2**27 + 1
_EXP_TABLES: dict = {}


def _exp_tables(xp):
    """Constants of the float64 exp for namespace ``xp`` (built once per namespace)."""
    tabs = _EXP_TABLES.get(xp)
    if tabs is not None:
        return tabs
    ctx = mpmath.MPContext()
    ctx.prec = 200
    c = ctx.log(2) / _N
    c1 = _round_bits(c, 30)  # kf * c1 is exact for |kf| < 2**23
    c2 = float(c - c1)
    th = np.empty(_N)
    tl = np.empty(_N)
    for j in range(_N):
        t = ctx.power(2, ctx.mpf(j) / _N)
        th[j] = float(t)
        tl[j] = float(t - th[j])
    split = th * _SPLIT  # Dekker's split: th = tha + thb, <= 26 bits each
    tha = split - (split - th)
    thb = th - tha
    pow2 = np.ldexp(1.0, np.arange(-520, 521))
    f64 = xp_dtype(xp, np.float64)
    tabs = {
        "inv_l": float(_N / ctx.log(2)),
        "c1": c1,
        "c2": c2,
        "th": xp.asarray(th, dtype=f64),
        "tl": xp.asarray(tl, dtype=f64),
        "tha": xp.asarray(tha, dtype=f64),
        "thb": xp.asarray(thb, dtype=f64),
        "pow2": xp.asarray(pow2, dtype=f64),
    }
    _EXP_TABLES[xp] = tabs
    return tabs


def _round_bits(v, bits: int) -> float:
    """``v`` (an mpf) rounded to ``bits`` significant bits, as a float."""
    m, e = mpmath.frexp(v)
    return math.ldexp(round(float(mpmath.ldexp(m, bits))), int(e) - bits)


# Range of the double-double path's normal results: exp(x) < 2**-1022 below
# ln(2**-1022) = -708.3964..., exp(x) >= max + ulp/2 (-> inf) above 709.78271289338...; from
# _ZERO_BELOW to _LOW its results are rounded on the subnormal grid (_exp64_block)
_LOW, _HIGH = -708.39, 709.78
_ZERO_BELOW, _INF_ABOVE = -745.14, 709.79  # exp < 2**-1075 (rounds to +0) / overflow
# Window of the rounding test, absolute on the scaled value s + lo in [0.999, 2.002): at least
# 2**-68 relative, against an error below 2**-70.5.
_EPS_DD = 2.0**-67
# Window of the tiny results' test, absolute on q (units of 2**-1074), against an error of
# q below 2**-18.4 (the relative 2**-70.5 at q < 2**52.01, and d's rounding): a margin of 5.
_EPS_SUB = 2.0**-16
_C3, _C4 = 1 / 6, 1 / 24


def _exp64(x, xp):
    if xp is not np:
        flat = xp.reshape(x, (-1,))  # the standard's take wants 1-D indices
        r, amb = _exp64_block(flat, xp)
        r = _resolve("exp", flat, r, amb, get_format("float64"), xp)
        return xp.reshape(r, x.shape)
    out = workspace.empty(x.shape, np.float64)
    xf, of = x.reshape(-1), out.reshape(-1)
    if kernels.applies(xf):
        idx = _exp64_fused(xf, of)
        refine = [idx] if idx.size else []
    else:
        kernel = _Exp64Kernel(min(xf.size, _CHUNK))
        refine = []  # undecided by the fast pass: refined with the double-double, all at once
        for s in range(0, xf.size, _CHUNK):
            xs = xf[s : s + _CHUNK]
            if kernel.run(xs, of[s : s + xs.size]):
                refine.append(np.arange(s, s + xs.size))  # out-of-range values or NaN here
            elif kernel.amb[: xs.size].any():
                refine.append(np.flatnonzero(kernel.amb[: xs.size]) + s)
    if refine:
        idx = np.concatenate(refine)
        r, amb = _exp64_block(xf[idx], np)
        of[idx] = r
        idx = idx[amb]
        if idx.size:
            of[idx] = exact_round("exp", xf[idx], "float64")
    return out


def _exp64_fused(xf, of):
    """The fast pass of :class:`_Exp64Kernel` element by element, fused
    (:func:`numstab.kernels.exp64_fast`): decided elements written to ``of``; returns the
    indices left to :func:`_exp64_block` (the NumPy path leaves a whole chunk there when one
    of its elements is out of range; both paths round correctly, so the bits are the same)."""
    t = _exp_tables(np)
    consts = t.get("fused")
    if consts is None:
        consts = t["fused"] = np.array(
            [t["inv_l"], t["c1"], -t["c2"], _C3, _C4, _LOW, _HIGH, _EPS_FAST]
        )
    flag = workspace.empty(xf.size, bool)
    if not kernels.exp64_fast(xf, of, flag, t["th"], t["tl"], consts):
        return np.empty(0, dtype=np.intp)
    return np.flatnonzero(flag)


#: The float32 softmax kernel's fast ``exp`` pass takes every 16th entry of the table:
#: ``2**(j/256)``, 2 KiB (numstab.kernels.softmax_rows32).
_FAST_STRIDE = 16


def softmax32_consts() -> tuple:
    """The constants of :func:`numstab.kernels.softmax_rows32` (built once): the float64
    ``exp``'s tables ``th``, ``tl`` (4096 entries), the fast pass's table ``tf`` (256:
    ``th[::16]``, ``2**(j/256)`` rounded to float64) and ``(inv_l, c1, -c2, c3, c4, settle,
    open, inv_f, c1_f, -c2_f)`` (``settle``: ``2**-62``, the relative distance from a float32
    midpoint below which a term stays undecided after the last correction, whose error is
    below ``2**-63.4``; ``open``: :data:`_OPEN32`; ``_f``: the fast pass's reduction
    constants, those of the 4096 table divided by 16, exactly), then the float32 rounding
    test's ``(half_k, mask, two_k, rel, tiny)``.

    The fast pass ``2**(k/256) (1 + p)``, ``p = rh + rh**2 (1/2 + rh/6 + rh**2/24)``:
    ``|rh| <= ln2/512 + 2**-46 < 2**-9.5``; relative error, term by term: the polynomial's
    truncation ``|r|**5/120 < 2**-54.4``, ``tf``'s rounding ``2**-53``, the products' and sums'
    roundings ``2**-53`` (the last addition) and ``2**-61`` (the others), the reduction
    (``kf c1`` exact for ``|kf| < 2**23``; ``rh``'s and ``kf c2``'s roundings) ``2**-62``:
    below ``2**-51.3`` in all, under the ``2**-45`` the rounding test allows (a margin of 2**6)
    and measured in the tests against mpmath."""
    t = _exp_tables(np)
    consts = t.get("softmax32")
    if consts is None:
        s = _FAST_STRIDE
        fast = (t["inv_l"] / s, t["c1"] * s, -t["c2"] * s)  # exact: powers of 2
        c = np.array([t["inv_l"], t["c1"], -t["c2"], _C3, _C4, _SETTLE32, _OPEN32, *fast])
        tf = np.ascontiguousarray(t["th"][::s])
        consts = t["softmax32"] = (t["th"], t["tl"], tf, c, *_NARROW_TEST)
    return consts


def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _exp64_block(x, xp):
    """Double-double ``exp`` of a float64 block: ``(result, needs_mpmath)``.

    ``e**x = 2**m T_j e**r`` with ``T_j = 2**(j/4096) = th + tl`` (double-double) and
    ``r = rh + rl``; ``e**r - 1 = r + q(r)``, ``q`` of degree 4. ``th * r1`` (``r1``: ``rh``
    rounded to 27 bits) is the exact sum ``tha r1 + thb r1``; the rest is small.

    Error budget (relative, of ``s + lo`` against ``e**x``): reduction ``2**-71.5``
    (``kf * c2``'s rounding and ``c``'s truncation, times ``|kf| < 2**23``), polynomial
    truncation ``2**-74.4`` and evaluation ``2**-79``, the small terms' roundings ``2**-77``,
    the last addition ``2**-79``: below ``2**-70.5`` in all, against the window ``2**-68``.
    :class:`_Exp64Kernel` runs the same operations in the same order (same bits).

    Results below ``2**-1022`` (``_ZERO_BELOW < x < _LOW``: subnormal, or the first normals)
    lie on the grid of ``2**-1074``: ``q = (s + lo) 2**(m + 1074) < 2**52.01`` is rounded to an
    integer ``n`` (``y = s + lo`` and its rounding error scaled exactly, ``d = q - rint(q)``
    with one rounding), and the result is ``n 2**-1074``, exact. ``q``'s error is below
    ``2**-70.5 q < 2**-18.4``, so ``n`` is referred to mpmath only where ``|d|`` is within
    :data:`_EPS_SUB` of ``1/2``.
    """
    t = _exp_tables(xp)
    inside = (x >= _LOW) & (x <= _HIGH)
    tiny = (x > _ZERO_BELOW) & (x < _LOW)  # |kf| < 2**23 still: the same budget holds
    xc = xp.where(inside | tiny, x, 0.0)
    kf = xp.round(xc * t["inv_l"])
    a = xc - kf * t["c1"]  # exact: kf * c1 has <= 53 bits and is within a factor 2 of x
    rh, rl = _two_sum(a, kf * -t["c2"])
    ki = xp.astype(kf, xp_dtype(xp, np.int64))
    j = ki & (_N - 1)
    m = ki >> _LOG2N
    tha, thb, tl = xp.take(t["tha"], j), xp.take(t["thb"], j), xp.take(t["tl"], j)
    th = tha + thb  # exact
    r1 = (rh + _MAGIC_R1) - _MAGIC_R1
    small = (rh - r1) + rl  # r2 + rl, |.| <= 2**-40
    q = (rh * _C4 + _C3) * rh + 0.5
    q = q * (rh * rh)
    small = (small + q) * th + (tl + tl * rh) + thb * r1  # thb * r1: exact
    big = tha * r1  # exact
    s = th + big
    lo = small - ((s - th) - big)  # Fast2Sum error of th + big, plus the small terms
    y = s + lo
    amb = (s + (lo - _EPS_DD)) != (s + (lo + _EPS_DD))
    amb = amb & inside
    p2 = t["pow2"]
    # Only a block with tiny results pays for them (on CuPy and the array API this block is
    # every element's path): their m (down to -1076) is outside the scaling table.
    any_tiny = bool(xp.any(tiny))
    mn = xp.where(inside, m, 0) if any_tiny else m
    m1 = mn >> 1
    r = (y * xp.take(p2, m1 + 520)) * xp.take(p2, (mn - m1) + 520)
    if any_tiny:
        # k = m + 1074 in [-2, 52] scales s + lo to units of 2**-1074 (exactly)
        pk = xp.take(p2, xp.where(tiny, m + 1074, 0) + 520)
        qh = y * pk
        n = xp.round(qh)  # exact: qh < 2**53
        d = (qh - n) + (lo - (y - s)) * pk  # y's rounding error (Fast2Sum, exact); qh - n exact
        n = xp.where(d > 0.5, n + 1.0, xp.where(d < -0.5, n - 1.0, n))
        r = xp.where(tiny, n * 2.0**-1074, r)  # exact: an integer below 2**53 times 2**-1074
        amb = amb | (tiny & (xp.abs(xp.abs(d) - 0.5) <= _EPS_SUB))
    edge = ~inside & ~tiny & (x > _ZERO_BELOW) & (x < _INF_ABOVE)
    r = xp.where(x >= _INF_ABOVE, xp.inf, xp.where(x <= _ZERO_BELOW, 0.0, r))
    r = xp.where(xp.isnan(x), x, r)
    return r, amb | edge


# The fast path's window, absolute on the scaled value s + lo in [0.999, 2.002): its error is
# below 2**-63.5 (see _Exp64Kernel), so 2**-61.5 leaves a margin of 4.
_EPS_FAST = 2.0**-61.5
# The float32 softmax kernel's second test (numstab.kernels.softmax_rows32), relative to the
# term: s + lo scaled is within 2**-63.4 of e**d, and the distance to the midpoint is itself
# computed with a relative error of 2**-53; 2**-62 leaves a margin of 2.6.
_SETTLE32 = 2.0**-62


def _open32() -> float:
    """The smallest float32 ``d`` with ``RN(e**d) > 2**-24`` in float32: the smallest float32
    at or above ``ln(2**-24 (1 + 2**-24))`` (the midpoint above ``2**-24``; float64's error
    here, ~1e-15, is far below float32's spacing, 2**-20; checked against mpmath in the
    tests)."""
    v = -24 * math.log(2.0) + math.log1p(2.0**-24)
    d = np.float32(v)
    return float(d if float(d) >= v else np.nextafter(d, np.float32(0)))


#: A softmax row with a second entry at ``d >= _OPEN32`` does not collapse in float32:
#: ``RN(1 + e) > 1`` for that term ``e``, and a sum of non-negative terms in any tree is
#: monotone in each term (numstab.kernels.softmax_rows32).
_OPEN32 = _open32()


class _Exp64Kernel:
    """A fast first pass of the float64 ``exp`` on NumPy, with reused buffers (no
    temporaries): the same reduction and table as :func:`_exp64_block`, but single-double
    arithmetic where that one is exact.

    ``e**x ~ 2**m (th + (th·p + tl))``, ``p = rh + q(rh)``, ``rh = fl(a + b)`` (no TwoSum).
    Error budget, absolute on the scaled value ``th (1 + p) in [0.999, 2.002)``: errors of
    ``p`` are multiplied by ``th < 2``: ``rh``'s rounding (``|rh| < 2**-13.5``) ``2**-66``,
    ``p``'s rounding ``2**-66``, ``kf·c2``'s rounding and ``c``'s truncation ``2**-73.5``,
    ``q``'s truncation ``2**-73.5``; then ``th·p`` and ``+ tl`` (``< 2**-12.5``) ``2**-66``
    each and the dropped ``tl·p`` ``2**-65.5``: below ``2**-63.5`` in all, against the window
    ``2**-61.5`` (a margin of 4). About 0.3 % of the values fall in the window and go to
    :func:`_exp64_block`.
    """

    def __init__(self, n: int):
        self.t = _exp_tables(np)
        self.f = [workspace.empty(n, np.float64) for _ in range(4)]
        self.i = [workspace.empty(n, np.int64) for _ in range(2)]
        self.amb = workspace.empty(n, bool)

    def run(self, x, out) -> bool:
        """Write ``exp(x)`` to ``out`` and the undecided mask to ``self.amb``; return True
        (and write nothing) when some element needs :func:`_exp64_block` instead."""
        k = x.size
        if not (x.min() >= _LOW and x.max() <= _HIGH):  # a NaN fails both comparisons
            return True
        t = self.t
        f0, f1, f2, f3 = (b[:k] for b in self.f)
        ki, j = (b[:k] for b in self.i)
        np.multiply(x, t["inv_l"], out=f0)
        np.rint(f0, out=f0)  # kf (xp.round: to nearest, ties to even)
        np.multiply(f0, t["c1"], out=f1)
        np.subtract(x, f1, out=f1)  # a (exact)
        np.multiply(f0, -t["c2"], out=f2)  # b
        np.add(f1, f2, out=f1)  # rh = fl(a + b)
        np.copyto(ki, f0, casting="unsafe")
        np.bitwise_and(ki, _N - 1, out=j)
        np.right_shift(ki, _LOG2N, out=ki)  # m
        np.multiply(f1, _C4, out=f0)
        np.add(f0, _C3, out=f0)
        np.multiply(f0, f1, out=f0)
        np.add(f0, 0.5, out=f0)
        np.multiply(f1, f1, out=f2)
        np.multiply(f0, f2, out=f0)  # q
        np.add(f1, f0, out=f1)  # p = rh + q
        np.take(t["th"], j, out=f0, mode="clip")  # th (0 <= j < _N: no bounds check)
        np.take(t["tl"], j, out=f2, mode="clip")  # tl
        np.multiply(f0, f1, out=f1)
        np.add(f1, f2, out=f1)  # th·p + tl
        np.add(f0, f1, out=f3)  # s = y: s + lo is exactly th + (th·p + tl), already rounded
        np.subtract(f3, f0, out=f2)
        np.subtract(f1, f2, out=f1)  # lo (Fast2Sum error, exact)
        np.subtract(f1, _EPS_FAST, out=f0)
        np.add(f3, f0, out=f0)
        np.add(f1, _EPS_FAST, out=f2)
        np.add(f3, f2, out=f2)
        np.not_equal(f0, f2, out=self.amb[:k])
        # y in [0.999, 2.002) and the result normal: scaling adds m to the exponent field.
        np.left_shift(ki, 52, out=ki)
        np.add(f3.view(np.int64), ki, out=out.view(np.int64))
        return False
