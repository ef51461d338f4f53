"""Arbitrary-precision reference for softmax / StableMax losses (mpmath).

Every float input is taken as the exact binary rational it is (:func:`to_exact`), every result is
an mpmath ``mpf`` carrying ``prec`` bits, and :func:`round_exact` rounds such results (or any
``int`` / :class:`fractions.Fraction`) correctly to one of the five formats of
:mod:`numstab.precision`. The functions mirror the float API of :mod:`numstab.functional`, so
every float operation has an exact twin to test and audit against.

Contexts
--------
Each working precision gets its own private ``mpmath.MPContext`` (created once, cached); the
global ``mpmath.mp`` is never touched. Every public function takes ``prec=None`` (meaning
:data:`DEFAULT_PREC`); returned ``mpf`` values belong to the context of precision ``prec``, so
arithmetic on them continues at that precision.

Accuracy (why ``DEFAULT_PREC = 256``)
--------------------------------------
Internally every function works at ``w = prec + 20`` bits and rounds each result once to
``prec`` bits. Inside, the error budget is:

* inputs are exact; the differences ``z_k - z_max``, and ``x + 1``, ``1 - x + eps`` for
  StableMax, are formed *exactly* (mpmath's unrounded addition);
* ``exp``, ``log``, ``log1p`` and ``/`` each have relative error below ``2**(1 - w)`` (mpmath
  evaluates them with guard bits; the basic operations are correctly rounded);
* every sum is a sum of non-negative terms, which mpmath's ``fsum`` adds exactly (up to terms
  ``2**-(2w)`` below the running sum) and rounds once, so its relative error is at most the
  largest relative error of its terms plus ``2**-w``;
* **no result is formed by cancellation** -- each is a quotient, a ``log1p``, or a sum of two
  terms of the same sign:

  - ``cross_entropy = (z_max - z_y) + log1p(s)``, both terms ``>= 0``, with
    ``s = sum_{k != k*} exp(z_k - z_max)``: a loss of ``1e-40`` keeps full relative accuracy
    (``log(1 + s)`` would lose it);
  - ``log_softmax_k = (z_k - z_max) - log1p(s)``, both terms ``<= 0``;
  - the target entry of the gradient is ``-A / S`` with ``A = sum_{k != y} exp(z_k - z_max)``,
    ``S = sum_k exp(z_k - z_max)``, which equals ``-t_y / (1 + t_y)``,
    ``t_y = sum_{k != y} exp(z_k - z_y)``, and never forms ``p_y - 1``;
  - StableMax uses ``-log(s_y / S) = log1p(R_y / s_y)`` with ``R_y = sum_{k != y} s_k`` summed
    directly (never ``S - s_y``), and the gradient ``-(s'(z_y) / s_y) * R_y / S``.

  The one exception is :func:`logsumexp`, ``z_max + log1p(s)``, which cancels when
  ``z_max`` lies in ``[-log C, 0)``; it measures the bits lost and recomputes at a higher
  working precision until the result has ``prec + 4`` correct bits (a Ziv loop).

So each internal value has relative error below ``2**(4 - w) = 2**-(prec + 16)``, and the
returned, rounded value below ``2**-prec * (1 + 2**-15) < 2**(1 - prec)``: one ulp at
``prec`` bits.

Rounding a value known to relative error ``d`` to a ``p``-bit format gives the correctly rounded
result unless the exact value lies within ``d`` of a rounding boundary. The softmax results are
transcendental for non-trivial inputs (Lindemann--Weierstrass), so they are never exactly on a
midpoint; heuristically a value falls within ``2**-255`` of a float64 (``p = 53``) or x87
(``p = 64``) midpoint with probability about ``2**(p + 1 - 255) <= 2**-190``. For comparison,
the hardest-to-round arguments known for a single ``exp`` or ``log`` in binary64 need about
``2p + 12 ~ 118`` bits, and about 140 bits for the 64-bit format; 256 bits leaves more than 100
bits of margin over those. StableMax values are rational and *can* be exact midpoints (e.g.
ties give ``1/2``); those are found exactly whenever the intermediate sums fit in ``w`` bits
(inputs whose exponents span fewer than about ``prec`` bits), since mpmath's addition and
division are correctly rounded. Each function costs a few microseconds per logit at this
precision (the paper's full batch, 5107 x 113, takes a few seconds).

Special values
--------------
mpmath ``mpf`` has no signed zero: ``-0.0`` becomes ``0`` (and rounds back to ``+0.0``).
NaN and infinite logits propagate as IEEE arithmetic would through the formula each function
documents; division by zero, which mpmath raises on, is replaced by its IEEE result.
"""

from __future__ import annotations

import math
import numbers
import re
from fractions import Fraction
from typing import NamedTuple

import mpmath
import numpy as np
from mpmath import libmp

from numstab.backend import is_ml_dtype
from numstab.precision import get_format

__all__ = [
    "DEFAULT_PREC",
    "context",
    "cross_entropy",
    "cross_entropy_grad",
    "log_softmax",
    "log_stablemax",
    "logsumexp",
    "mse",
    "mse_grad",
    "round_exact",
    "softmax",
    "stablemax",
    "stablemax_cross_entropy",
    "stablemax_cross_entropy_grad",
    "stablemax_s",
    "tail_sum",
    "to_exact",
]

#: Default working precision in bits (see the module docstring for the error analysis).
DEFAULT_PREC = 256

#: Guard bits added to ``prec`` for intermediate values.
_GUARD = 20

_RND = libmp.round_nearest
_FZERO = libmp.fzero
_FONE = libmp.fone
_FNAN = libmp.fnan
_FINF = libmp.finf
_FNINF = libmp.fninf

_CONTEXTS: dict[int, mpmath.MPContext] = {}

_ALLOWED_INPUT = "float16, bfloat16, float32, float64 or longdouble (or Python float/int)"

# The parameters every row function shares, documented once: ``{name}`` on a line of its own
# in a docstring of a function decorated with :func:`_doc` becomes this text.
_PARAM_DOCS = {
    "z": """z : array_like, shape (N, C) or (C,)
    Logits (float arrays of the five formats, Python floats, or object arrays of mpf).""",
    "y": """y : array_like of int, shape (N,); an int for 1-D ``z``
    Labels in ``[0, C)``.""",
    "eps": """eps : float, optional
    See :func:`stablemax_s` (default 0).""",
    "prec": """prec : int, optional
    Result precision in bits (default :data:`DEFAULT_PREC`; the error analysis is in the
    module docstring).""",
}
_PARAM_LINE = re.compile(r"^( *)\{(" + "|".join(_PARAM_DOCS) + r")\}$", re.MULTILINE)


def _doc(func):
    """Fill the ``{z}`` / ``{y}`` / ``{eps}`` / ``{prec}`` lines of ``func``'s docstring."""

    def fill(m):
        return "\n".join(m.group(1) + line for line in _PARAM_DOCS[m.group(2)].splitlines())

    if func.__doc__:  # None under python -OO
        func.__doc__ = _PARAM_LINE.sub(fill, func.__doc__)
    return func


# --- contexts and precision ---------------------------------------------------------------


def _check_prec(prec) -> int:
    if prec is None:
        return DEFAULT_PREC
    if isinstance(prec, bool) or not isinstance(prec, numbers.Integral):
        raise TypeError(f"prec must be an integer number of bits (or None), got {prec!r}")
    prec = int(prec)
    if prec < 2:
        raise ValueError(f"prec must be at least 2 bits, got {prec}")
    return prec


def context(prec: int | None = None) -> mpmath.MPContext:
    """The private, cached mpmath context of ``prec`` bits (default :data:`DEFAULT_PREC`).

    Use it to do arithmetic on the mpf values this module returns without touching the global
    ``mpmath.mp``.
    """
    return _context(DEFAULT_PREC if prec is None else int(prec))


def _context(prec: int) -> mpmath.MPContext:
    """The private, cached mpmath context of precision ``prec`` bits (never ``mpmath.mp``)."""
    ctx = _CONTEXTS.get(prec)
    if ctx is None:
        ctx = mpmath.MPContext()
        ctx.prec = prec
        _CONTEXTS[prec] = ctx
    return ctx


def _is_special(t) -> bool:
    """True for the raw nan / +inf / -inf (zero has ``exp == 0``)."""
    return not t[1] and t[2] != 0


def _mag(t) -> int:
    """``e`` with ``2**(e - 1) <= |t| < 2**e`` for a finite non-zero raw mpf."""
    return t[2] + t[3]


def _div(a, b, prec):
    """``a / b`` on raw mpfs, with IEEE results instead of ``ZeroDivisionError``."""
    if b == _FZERO:
        if a == _FZERO or a == _FNAN:
            return _FNAN
        return _FINF if a[0] == 0 else _FNINF
    return libmp.mpf_div(a, b, prec, _RND)


def _log1p(t, wp):
    """``log(1 + t)`` of a raw mpf ``t >= 0`` (or nan / inf) at ``wp`` bits."""
    if t == _FZERO or _is_special(t):
        return t  # log1p(0) = 0, log1p(inf) = inf, log1p(nan) = nan
    ctx = _context(wp)
    return ctx.log1p(ctx.make_mpf(t))._mpf_


def _log(t, wp):
    """``log(t)`` of a raw mpf ``t >= 0`` (or nan / inf) at ``wp`` bits."""
    if t == _FZERO:
        return _FNINF
    if _is_special(t):
        return t
    return libmp.mpf_log(t, wp, _RND)


def _wrap(raw, prec):
    """Round raw mpfs to ``prec`` bits and wrap them as mpfs of the ``prec`` context."""
    make = _context(prec).make_mpf
    pos = libmp.mpf_pos
    return [make(t if t[3] <= prec else pos(t, prec, _RND)) for t in raw]


def _obj_array(items, shape):
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out.reshape(shape)


# --- exact conversion -----------------------------------------------------------------------


def _float_kind(dt: np.dtype) -> bool:
    return dt.kind == "f" or is_ml_dtype(dt, "bfloat16")


def _raw_longdouble(a: np.ndarray) -> list:
    """Exact raw mpfs of a longdouble array (flattened), without going through float."""
    a = a.ravel()
    out = [None] * a.size
    finite = np.isfinite(a)
    m, e = np.frexp(np.where(finite, a, 0))
    neg = np.signbit(m)
    # |m| in [0.5, 1) has at most 64 significant bits, so |m| * 2**64 is an integer < 2**64;
    # its two 32-bit halves are exact in longdouble and in float64.
    m64 = np.ldexp(np.abs(m), 64)
    hi = np.floor(np.ldexp(m64, -32))
    lo = m64 - np.ldexp(hi, 32)
    his = hi.astype(np.float64).astype(np.uint64).tolist()
    los = lo.astype(np.float64).astype(np.uint64).tolist()
    exps = (e.astype(np.int64) - 64).tolist()
    negs = neg.tolist()
    for i, ok in enumerate(finite.tolist()):
        if ok:
            man = (his[i] << 32) | los[i]
            out[i] = libmp.from_man_exp(-man if negs[i] else man, exps[i])
        else:
            v = a[i]
            out[i] = _FNAN if np.isnan(v) else (_FINF if v > 0 else _FNINF)
    return out


def _raw_scalar(v):
    """Exact raw mpf of a Python int / float, a NumPy real scalar or an mpf; else ``None``."""
    if isinstance(v, (bool, np.bool_)):
        return None
    t = getattr(v, "_mpf_", None)
    if t is not None:
        return t
    if isinstance(v, (int, np.integer)):
        return libmp.from_man_exp(int(v), 0)
    if isinstance(v, float):
        return libmp.from_float(v)
    if isinstance(v, np.generic) and _float_kind(v.dtype):
        return _raw_flat(v, allow_object=False)[0][0]
    return None


def _raw_flat(x, *, allow_object: bool, what: str = "input"):
    """Exact raw mpfs of ``x`` flattened, and ``x``'s shape.

    Float arrays of the five formats, Python floats / ints (and lists of them), and -- with
    ``allow_object`` -- object arrays of mpf / int / float are accepted.
    """
    if isinstance(x, (np.ndarray, np.generic)):
        arr = np.asarray(x)
        from_python = False
    else:
        t = _raw_scalar(x)
        if t is not None:
            return [t], ()
        arr = np.asarray(x)
        from_python = True
    dt = arr.dtype
    if _float_kind(dt):
        if dt == np.longdouble:
            return _raw_longdouble(arr), arr.shape
        if dt.itemsize > 8:
            raise TypeError(f"{what} has dtype {dt}; allowed: {_ALLOWED_INPUT}")
        vals = arr.astype(np.float64).ravel().tolist()  # exact widening
        return [libmp.from_float(v) for v in vals], arr.shape
    if (from_python and dt.kind in "iu") or (dt.kind == "O" and (from_python or allow_object)):
        flat = arr.ravel().tolist() if dt.kind != "O" else list(arr.ravel())
        raws = [_raw_scalar(v) for v in flat]
        for v, t in zip(flat, raws, strict=True):
            if t is None:
                allowed = "mpf, int or float" if allow_object else "int or float"
                raise TypeError(
                    f"{what} contains {v!r} of type {type(v).__name__}; allowed elements: {allowed}"
                )
        return raws, arr.shape
    extra = " or an object array of mpf" if allow_object else ""
    raise TypeError(f"{what} has dtype {dt}; allowed: {_ALLOWED_INPUT}{extra}")


def to_exact(x, *, prec=None):
    """Convert floats to mpmath numbers exactly (every float is a binary rational).

    Parameters
    ----------
    x : array_like, any shape
        A float16, bfloat16 (ml_dtypes), float32, float64 or longdouble array or NumPy scalar,
        or a Python float / int, or a (nested) list of them.
    prec : int, optional
        Precision in bits of the mpmath context the results belong to (default
        :data:`DEFAULT_PREC`). The *values* are exact whatever ``prec`` is: a longdouble
        element keeps its 64 significand bits even with ``prec=53``; ``prec`` only sets the
        precision of later arithmetic on them.

    Returns
    -------
    numpy.ndarray of object (mpf), shape of ``x``; or one mpf for a scalar input
        NaN becomes ``nan``, ``±inf`` becomes ``±inf``, ``-0.0`` becomes ``0`` (mpf has no
        signed zero).

    Raises
    ------
    TypeError
        Integer, bool, complex or object arrays (the message names the dtype and the allowed
        ones). Python ints are accepted and converted exactly.

    Notes
    -----
    longdouble (x87, 64-bit significand) is converted without going through ``float``:
    ``np.frexp`` gives ``m * 2**e`` and ``|m| * 2**64`` is split into two 32-bit integers,
    each exact in float64.

    Examples
    --------
    >>> import numpy as np
    >>> v = to_exact(np.float32(0.1))
    >>> v == mpmath.mpf(13421773) / 2**27
    True
    >>> to_exact(np.array([1.0, np.inf], dtype=np.float16)).tolist()
    [mpf('1.0'), mpf('inf')]
    """
    prec = _check_prec(prec)
    raws, shape = _raw_flat(x, allow_object=False, what="x")
    out = [_context(prec).make_mpf(t) for t in raws]
    if shape == ():
        return out[0]
    return _obj_array(out, shape)


# --- correct rounding -----------------------------------------------------------------------


def _round_man_exp(sign: int, man: int, exp: int, fmt):
    """Round ``(-1)**sign * man * 2**exp`` (``man > 0``) to nearest even in ``fmt``.

    Returns ``(sign, M, q)`` with value ``M * 2**q`` and ``0 <= M < 2**p``, or ``None`` for
    overflow (the value rounded with unbounded exponent exceeds the largest finite number).
    """
    p, emin, emax = fmt.precision, fmt.emin, fmt.emax
    bc = man.bit_length()
    e = exp + bc - 1  # 2**e <= |x| < 2**(e + 1)
    if e > emax:
        return None
    q = max(e, emin) - p + 1  # quantum of the target at |x|
    if exp >= q:
        big = man << (exp - q)
    else:
        shift = q - exp
        if shift > bc:  # |x| < 2**(q - 1): below half a quantum, rounds to zero
            return sign, 0, q
        big = man >> shift
        rem = man & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and big & 1):
            big += 1
    return _finish(sign, big, q, fmt)


def _finish(sign, big, q, fmt):
    p = fmt.precision
    if big == 1 << p:  # carry into the next binade
        big >>= 1
        q += 1
    if q > fmt.emax - p + 1 or (q == fmt.emax - p + 1 and big > fmt.max_significand):
        return None
    return sign, big, q


def _round_fraction(v: Fraction, fmt):
    n, d = v.numerator, v.denominator
    sign = 1 if n < 0 else 0
    n = abs(n)
    e = n.bit_length() - d.bit_length()
    if (n << max(0, -e)) < (d << max(0, e)):
        e -= 1  # now 2**e <= n/d < 2**(e + 1)
    if e > fmt.emax:
        return None
    q = max(e, fmt.emin) - fmt.precision + 1
    num, den = (n << -q, d) if q <= 0 else (n, d << q)
    big, rem = divmod(num, den)
    if 2 * rem > den or (2 * rem == den and big & 1):
        big += 1
    return _finish(sign, big, q, fmt)


def _round_one(v, fmt):
    """``('f', sign, M, q)`` | ``('inf', sign)`` | ``('nan',)`` for one exact value."""
    if isinstance(v, Fraction):
        if v == 0:
            return ("f", 0, 0, 0)
        r = _round_fraction(v, fmt)
        return _overflow(int(v < 0), fmt) if r is None else ("f", *r)
    t = _raw_scalar(v)
    if t is None:
        raise TypeError(
            f"round_exact cannot round {v!r} of type {type(v).__name__}; allowed: mpf, int, "
            "fractions.Fraction, float, or arrays of them (or float arrays)"
        )
    sign, man, exp, _ = t
    if not man:
        if t == _FZERO:
            return ("f", 0, 0, 0)
        if t == _FNAN:
            return ("nan",)
        return _overflow(1 if t == _FNINF else 0, fmt)
    r = _round_man_exp(int(sign), int(man), int(exp), fmt)
    return _overflow(int(sign), fmt) if r is None else ("f", *r)


def _overflow(sign: int, fmt):
    """The overflow value of ``fmt`` (``±inf``; NaN or ``±max`` without infinities)."""
    if fmt.overflow == "inf":
        return ("inf", sign)
    if fmt.overflow == "nan":
        return ("nan",)
    return ("f", sign, fmt.max_significand, fmt.emax - fmt.precision + 1)


def round_exact(x, fmt, *, prec=None):
    """Round exact values correctly (to nearest, ties to even) to a floating-point format.

    Parameters
    ----------
    x : mpf, int, fractions.Fraction, float, or array_like of them (object arrays), any shape
        Float arrays of the five formats are accepted too (their exact values are rounded).
    fmt : str or numpy.dtype or Format
        Target format: float16, bfloat16, float32, float64 or longdouble (x87).
    prec : None or int, optional
        Accepted for uniformity with the other functions and validated; rounding is exact
        whatever it is.

    Returns
    -------
    numpy.ndarray of ``get_format(fmt).dtype``, shape of ``x``; a NumPy scalar for a scalar
        Round to nearest even with subnormals (fixed quantum ``2**(emin - p + 1)`` below
        ``2**emin``); a value whose rounding with unbounded exponent exceeds the largest finite
        number, i.e. ``|x| >= max + ulp(max)/2``, becomes ``±inf``; tiny values round to a zero
        of their sign; NaN gives NaN; ``±inf`` stays.

    Notes
    -----
    Pure integer arithmetic on ``(sign, man, exp)`` (mpf) or numerator / denominator
    (Fraction): the value is never passed through ``float``. The result ``M * 2**q``
    (``M < 2**p``) is then built exactly: with ``math.ldexp`` in float64 for formats up to
    float64, and for longdouble from two 32-bit halves of ``M`` with ``np.ldexp``.

    Examples
    --------
    >>> from fractions import Fraction
    >>> float(round_exact(Fraction(1) + Fraction(1, 2**11), "float16"))  # tie -> even
    1.0
    >>> float(round_exact(Fraction(65520), "float16"))  # max + ulp(max)/2 overflows
    inf
    """
    _check_prec(prec)
    f = get_format(fmt)
    if isinstance(x, (np.ndarray, np.generic)) and _float_kind(x.dtype):
        raws, shape = _raw_flat(x, allow_object=False, what="x")
        make = _context(DEFAULT_PREC).make_mpf
        flat = [make(t) for t in raws]
    elif isinstance(x, (np.ndarray, np.generic, list, tuple)):
        arr = np.asarray(x, dtype=object) if isinstance(x, (list, tuple)) else np.asarray(x)
        if arr.dtype.kind not in "Oiu":
            raise TypeError(
                f"round_exact cannot round an array of dtype {arr.dtype}; allowed: object "
                "arrays of mpf / int / Fraction / float, integer or float arrays"
            )
        flat, shape = list(arr.ravel()), arr.shape
    else:
        flat, shape = [x], ()
    results = [_round_one(v, f) for v in flat]
    out = _build(results, f)
    out = out.reshape(shape)
    return out[()] if shape == () else out


def _build(results, fmt) -> np.ndarray:
    n = len(results)
    if fmt.dtype != np.longdouble:
        vals = [0.0] * n
        for i, r in enumerate(results):
            if r[0] == "f":
                _, sign, big, q = r
                v = math.ldexp(float(big), q) if big else 0.0  # exact: big < 2**53
                vals[i] = -v if sign else v
            elif r[0] == "inf":
                vals[i] = -math.inf if r[1] else math.inf
            else:
                vals[i] = math.nan
        # Every value is exactly representable in fmt, so this cast is exact.
        return np.array(vals, dtype=np.float64).astype(fmt.dtype)
    his = np.zeros(n, dtype=np.float64)
    los = np.zeros(n, dtype=np.float64)
    qs = np.zeros(n, dtype=np.int64)
    signs = np.zeros(n, dtype=bool)
    special = {}
    for i, r in enumerate(results):
        if r[0] == "f":
            _, sign, big, q = r
            his[i], los[i] = divmod(big, 1 << 32)
            qs[i], signs[i] = q, bool(sign)
        elif r[0] == "inf":
            special[i] = -np.inf if r[1] else np.inf
        else:
            special[i] = np.nan
    ld = np.longdouble
    m = his.astype(ld) * ld(2**32) + los.astype(ld)  # exact: < 2**64 + 2**32
    out = np.ldexp(m, qs)  # exact: the result is representable
    out = np.where(signs, -out, out)
    for i, v in special.items():
        out[i] = v
    return out


# --- logits: shared plumbing ----------------------------------------------------------------


def _logits(z):
    """Raw rows of ``z`` (list of lists), ``N``, ``C`` and whether ``z`` was 1-D."""
    raws, shape = _raw_flat(z, allow_object=True, what="logits z")
    if len(shape) not in (1, 2):
        raise ValueError(
            f"logits z must be 1-D (C,) or 2-D (N, C); got shape {shape} ({len(shape)}-D)"
        )
    one_row = len(shape) == 1
    n, c = (1, shape[0]) if one_row else shape
    if c == 0:
        raise ValueError(f"logits z has C = 0 classes (shape {shape}); need at least one class")
    rows = [raws[i * c : (i + 1) * c] for i in range(n)]
    return rows, n, c, one_row


def _labels(y, n, c, one_row):
    """Validated labels as a list of Python ints."""
    arr = np.asarray(y)
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise TypeError(f"labels y must be integers, got dtype {arr.dtype} (y = {y!r})")
    if one_row:
        if arr.shape != ():
            raise ValueError(
                f"for 1-D logits z, the label y must be one integer; got shape {arr.shape}"
            )
        arr = arr.reshape(1)
    elif arr.shape != (n,):
        raise ValueError(f"labels y must have shape ({n},) to match z (N = {n}); got {arr.shape}")
    labels = [int(v) for v in arr.tolist()]
    for i, v in enumerate(labels):
        if not 0 <= v < c:
            raise ValueError(f"label y[{i}] = {v} is out of range [0, {c}) for C = {c} classes")
    return labels


def _out_rows(rows_out, n, c, one_row, prec):
    """Wrap per-row lists of raw mpfs (length ``c``) into an (N, C) or (C,) object array."""
    flat = _wrap([t for r in rows_out for t in r], prec)
    return _obj_array(flat, (c,) if one_row else (n, c))


def _out_vec(vals, one_row, prec):
    flat = _wrap(vals, prec)
    return flat[0] if one_row else _obj_array(flat, (len(flat),))


def _has_nan(row) -> bool:
    return any(t == _FNAN for t in row)


class _Work(NamedTuple):
    """What a row function needs besides its row: result and working precision, raw ``eps``."""

    prec: int
    wp: int
    eps: tuple | None


_NO_LABELS = object()


def _rowwise(row_fn, z, y=_NO_LABELS, *, prec, eps=None, per_entry: bool):
    """The public entry of every row function: validate, split into rows, map, round.

    Checks ``prec``, then ``eps`` (StableMax only: pass ``None`` otherwise), the logits ``z``
    and the labels ``y`` (if given). A row holding a NaN gives NaN (every entry of it when
    ``per_entry``); every other row ``r`` gives ``row_fn(r, work)`` -- ``row_fn(r, y_i, work)``
    with labels -- a list of ``C`` raw mpfs (``per_entry``) or one raw mpf, which is rounded
    once to ``prec`` bits. Returns the shape of ``z`` (``per_entry``) or ``(N,)``, one mpf for
    1-D ``z``.
    """
    prec = _check_prec(prec)
    work = _Work(prec, prec + _GUARD, None if eps is None else _eps_raw(eps))
    rows, n, c, one_row = _logits(z)
    nan = _nan_row(c) if per_entry else _FNAN
    if y is _NO_LABELS:
        out = [nan if _has_nan(r) else row_fn(r, work) for r in rows]
    else:
        labels = _labels(y, n, c, one_row)
        out = [
            nan if _has_nan(r) else row_fn(r, yi, work) for r, yi in zip(rows, labels, strict=True)
        ]
    if per_entry:
        return _out_rows(out, n, c, one_row, prec)
    return _out_vec(out, one_row, prec)


def _first_argmax(row) -> int:
    best, k = row[0], 0
    cmp = libmp.mpf_cmp
    for i in range(1, len(row)):
        if cmp(row[i], best) > 0:
            best, k = row[i], i
    return k


class _Row:
    """Max-shifted exponentials of one (NaN-free) row at working precision ``wp``.

    ``d[k] = z_k - z_max`` exactly (``d[k*] = 0`` for the first argmax ``k*``; another
    ``+inf`` gives ``inf - inf = nan``, ``-inf`` gives ``-inf``), ``e[k] = exp(d[k])``,
    ``s = sum_{k != k*} e[k]`` (the tail) and ``S = 1 + s``.

    Written on mpmath's raw ``libmp`` tuples: the context API (``ctx.fsub(a, b, exact=True)``,
    ``ctx.exp``, ``ctx.fsum``) gives the same values bit for bit but made this class about
    25 % slower on 64 x 97 float32 logits (it wraps every intermediate in an mpf object).
    """

    __slots__ = ("S", "d", "e", "k", "s", "wp", "zmax")

    def __init__(self, row, wp):
        self.k = k = _first_argmax(row)
        self.zmax = zmax = row[k]
        sub = libmp.mpf_sub
        self.d = [_FZERO if i == k else sub(t, zmax, 0) for i, t in enumerate(row)]
        self.exps(wp)

    def exps(self, wp):
        self.wp = wp
        exp = libmp.mpf_exp
        k = self.k
        self.e = e = [_FONE if t == _FZERO else exp(t, wp, _RND) for t in self.d]
        self.s = libmp.mpf_sum(e[:k] + e[k + 1 :], wp, _RND)
        self.S = libmp.mpf_add(_FONE, self.s, wp, _RND)


def _nan_row(c):
    return [_FNAN] * c


# --- softmax family -------------------------------------------------------------------------


@_doc
def tail_sum(z, *, prec=None):
    """Softmax tail ``s = sum_{k != k*} exp(z_k - z_max)``, ``k*`` the first argmax.

    The float sum ``sum_k exp(z_k - z_max)`` is exactly 1 (Softmax Collapse) iff this tail is
    absorbed, which for a sequential sum starting with the max term is ``s <= 2**-p``.
    Other entries equal to the maximum contribute exactly 1 each.

    Parameters
    ----------
    {z}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape (N,); one mpf for 1-D ``z``
        Relative error below ``2**(1 - prec)``.

    Notes
    -----
    Special values: NaN in a row gives NaN; a single ``+inf`` gives 0 (every other term is
    ``exp(-inf)``); two ``+inf`` or (with ``C > 1``) an all ``-inf`` row give NaN
    (``inf - inf``); ``-inf`` entries contribute 0.

    Examples
    --------
    >>> import numpy as np
    >>> float(round_exact(tail_sum(np.array([0.0, -1.0, 0.0])), "float64"))  # e**-1 + 1
    1.3678794411714423
    """
    return _rowwise(_tail_sum_row, z, prec=prec, per_entry=False)


def _tail_sum_row(row, w):
    return _Row(row, w.wp).s


def _logsumexp_row(row, w):
    """``z_max + log1p(s)`` with a Ziv loop against cancellation (``z_max`` in [-log C, 0))."""
    prec = w.prec
    r = _Row(row, w.wp)
    cap = 32 * prec + 4096
    while True:
        b = _log1p(r.s, r.wp)
        total = libmp.mpf_add(r.zmax, b, 0)  # exact: all error is b's
        if _is_special(total) or _is_special(b) or r.zmax == _FZERO or b == _FZERO:
            return total
        if r.zmax[0] == b[0]:
            return total  # same sign: no cancellation
        # b has relative error < 2**(4 - wp); need that over |total| below 2**-(prec + 4).
        lost = _mag(b) - (_mag(total) if total != _FZERO else -r.wp)
        if lost + prec + 9 <= r.wp or r.wp >= cap:
            return total
        r.exps(min(cap, max(2 * r.wp, prec + _GUARD + lost + 8)))


@_doc
def logsumexp(z, *, prec=None):
    """``log(sum_k exp(z_k))`` per row, computed as ``z_max + log1p(s)``.

    Parameters
    ----------
    {z}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape (N,); one mpf for 1-D ``z``
        Relative error below ``2**(1 - prec)``, also where ``z_max + log1p(s)`` cancels (the
        working precision is raised until the lost bits are recovered).

    Notes
    -----
    ``s`` is :func:`tail_sum`. Special values: NaN in a row gives NaN; one ``+inf`` gives
    ``+inf``; two ``+inf`` give NaN (``inf - inf`` in the shift); an all ``-inf`` row gives
    ``-inf`` for ``C = 1`` and NaN otherwise; other ``-inf`` entries contribute nothing.

    Examples
    --------
    >>> import numpy as np
    >>> float(round_exact(logsumexp(np.array([[2.0, 2.0]])), "float64")[0])  # 2 + log 2
    2.6931471805599454
    """
    return _rowwise(_logsumexp_row, z, prec=prec, per_entry=False)


@_doc
def log_softmax(z, *, prec=None):
    """``log softmax(z)_k = (z_k - z_max) - log1p(s)`` (two non-positive terms).

    Parameters
    ----------
    {z}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape of ``z``
        Relative error below ``2**(1 - prec)`` for every entry, including the near-zero
        log-probability of a dominant class.

    Notes
    -----
    Special values: a NaN row gives NaN; a single ``+inf`` gives 0 there and ``-inf``
    elsewhere; two ``+inf`` (or an all ``-inf`` row with ``C > 1``) give NaN; ``-inf`` entries
    give ``-inf``.

    Examples
    --------
    >>> import numpy as np
    >>> lp = log_softmax(np.array([0.0, -100.0]))
    >>> float(round_exact(-lp[0], "float64"))  # log1p(e**-100), not 0
    3.720075976020836e-44
    """
    return _rowwise(_log_softmax_row, z, prec=prec, per_entry=True)


def _log_softmax_row(row, w):
    r = _Row(row, w.wp)
    b = _log1p(r.s, w.wp)
    return [libmp.mpf_sub(d, b, w.prec, _RND) for d in r.d]


@_doc
def softmax(z, *, prec=None):
    """``softmax(z)_k = exp(z_k - z_max) / (1 + s)``.

    Parameters
    ----------
    {z}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape of ``z``
        Relative error below ``2**(1 - prec)`` per entry (no underflow: mpmath's exponent is
        unbounded, so a probability of ``1e-10000`` is still resolved).

    Notes
    -----
    Special values: a NaN row gives NaN; a single ``+inf`` gives a one-hot row; two ``+inf``
    (or an all ``-inf`` row with ``C > 1``) give NaN (``inf - inf``); ``-inf`` entries give 0.

    Examples
    --------
    >>> import numpy as np
    >>> p = softmax(np.array([[0.0, 0.0, 0.0, 0.0]]))
    >>> round_exact(p, "float32").tolist()
    [[0.25, 0.25, 0.25, 0.25]]
    """
    return _rowwise(_softmax_row, z, prec=prec, per_entry=True)


def _softmax_row(row, w):
    r = _Row(row, w.wp)
    return [_div(e, r.S, w.prec) for e in r.e]


@_doc
def cross_entropy(z, y, *, prec=None):
    """Per-sample softmax cross-entropy ``-log softmax(z)_y = (z_max - z_y) + log1p(s)``.

    Parameters
    ----------
    {z}
    {y}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape (N,); one mpf for 1-D ``z``
        Relative error below ``2**(1 - prec)``, however small the loss (both terms are
        ``>= 0``; ``log(1 + s)`` is never formed).

    Notes
    -----
    Special values: a NaN row gives NaN; with a single ``+inf`` the loss is 0 if it is the
    label's logit and ``+inf`` otherwise; two ``+inf`` give NaN; ``z_y = -inf`` (with a finite
    maximum) gives ``+inf``.

    Examples
    --------
    >>> import numpy as np
    >>> loss = cross_entropy(np.array([[0.0, -92.0, -92.0]]), [0])
    >>> float(round_exact(loss, "float64")[0])  # 2 e**-92, float64 softmax gives 0
    2.217878038624273e-40
    """
    return _rowwise(_cross_entropy_row, z, y, prec=prec, per_entry=False)


def _cross_entropy_row(row, yi, w):
    r = _Row(row, w.wp)
    return libmp.mpf_sub(_log1p(r.s, w.wp), r.d[yi], w.prec, _RND)  # log1p(s) - (z_y - z_max)


@_doc
def cross_entropy_grad(z, y, *, prec=None):
    """Gradient of :func:`cross_entropy` w.r.t. the logits: ``softmax(z) - onehot(y)``.

    Off-target entries are ``exp(z_k - z_max) / S`` with ``S = 1 + s``; the target entry is
    ``-A / S`` with ``A = sum_{k != y} exp(z_k - z_max)``, which equals ``-t_y / (1 + t_y)``,
    ``t_y = sum_{k != y} exp(z_k - z_y)``. ``p_y - 1`` is never formed, so a target gradient
    of ``-1e-26`` (where float64 gives exactly 0) keeps full relative accuracy.

    Parameters
    ----------
    {z}
    {y}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape of ``z``
        Relative error below ``2**(1 - prec)`` per entry. Each row sums to 0 exactly in exact
        arithmetic.

    Notes
    -----
    Special values: a NaN row gives NaN; a single ``+inf`` at ``k*`` gives
    ``onehot(k*) - onehot(y)``; two ``+inf`` (or an all ``-inf`` row with ``C > 1``) give NaN;
    ``-inf`` entries give 0 off target and a target at ``-inf`` gives ``-1``.

    Examples
    --------
    >>> import numpy as np
    >>> g = cross_entropy_grad(np.array([0.0, -60.0, -60.0]), 0)
    >>> round_exact(g, "float64").tolist()
    [-1.751302152539304e-26, 8.75651076269652e-27, 8.75651076269652e-27]
    """
    return _rowwise(_cross_entropy_grad_row, z, y, prec=prec, per_entry=True)


def _cross_entropy_grad_row(row, yi, w):
    r = _Row(row, w.wp)
    g = [_div(e, r.S, w.prec) for e in r.e]
    a = libmp.mpf_sum(r.e[:yi] + r.e[yi + 1 :], w.wp, _RND)  # A = sum_{k != y} e_k
    g[yi] = libmp.mpf_neg(_div(a, r.S, w.prec))
    return g


# --- mean squared error ---------------------------------------------------------------------


@_doc
def mse(z, y, *, prec=None):
    """Per-sample mean squared error on one-hot targets: ``Σ_k (z_k - δ_ky)² / C``.

    The mean over a row of PyTorch's ``mse_loss(z, onehot(y))``; the mean of these over the
    samples is ``mse_loss``'s mean over all ``N·C`` entries.

    Parameters
    ----------
    {z}
    {y}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape (N,); one mpf for 1-D ``z``
        The exact value rounded once to ``prec`` bits (the squares and their sum are exact).

    Notes
    -----
    A NaN row gives NaN; an infinite logit gives ``+inf``.

    Examples
    --------
    >>> float(mse([0.5, 1.0, -1.0], 1))  # (0.25 + 0 + 1) / 3
    0.4166666666666667
    """
    return _rowwise(_mse_row, z, y, prec=prec, per_entry=False)


def _residuals(row, yi):
    """``z_k - δ_ky`` as exact raw mpfs."""
    return [libmp.mpf_sub(t, _FONE, 0, _RND) if k == yi else t for k, t in enumerate(row)]


def _mse_row(row, yi, w):
    total = _FZERO
    for d in _residuals(row, yi):
        total = libmp.mpf_add(total, libmp.mpf_mul(d, d, 0, _RND), 0, _RND)  # exact
    return libmp.mpf_div(total, libmp.from_int(len(row)), w.prec, _RND)


@_doc
def mse_grad(z, y, *, prec=None):
    """Gradient of :func:`mse` w.r.t. the logits: ``2 (z_k - δ_ky) / C``.

    Parameters
    ----------
    {z}
    {y}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape of ``z``
        Each entry the exact value rounded once to ``prec`` bits; ``±inf`` at infinite logits,
        NaN rows NaN.

    Examples
    --------
    >>> [float(g) for g in mse_grad([0.5, 1.0, -1.0], 1)]
    [0.3333333333333333, 0.0, -0.6666666666666666]
    """
    return _rowwise(_mse_grad_row, z, y, prec=prec, per_entry=True)


def _mse_grad_row(row, yi, w):
    c = libmp.from_int(len(row))
    return [libmp.mpf_div(libmp.mpf_shift(d, 1), c, w.prec, _RND) for d in _residuals(row, yi)]


# --- StableMax ------------------------------------------------------------------------------


def _eps_raw(eps):
    if isinstance(eps, (np.ndarray, np.generic)) and np.asarray(eps).shape != ():
        raise ValueError(f"eps must be a scalar, got an array of shape {np.shape(eps)}")
    try:
        raws, _ = _raw_flat(eps, allow_object=True, what="eps")
    except TypeError:
        raise TypeError(f"eps must be a real number (float or int), got {eps!r}") from None
    t = raws[0]
    if _is_special(t) or t[0]:
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return t


def _s_raw(t, eps, wp):
    """StableMax ``s(x)`` of a raw mpf: ``x + 1`` (x >= 0), ``1 / (1 - x + eps)`` (x < 0)."""
    if t == _FNAN:
        return _FNAN
    if t[0] == 0:  # x >= 0 (or +inf)
        return libmp.mpf_add(t, _FONE, 0) if t[1] else (_FONE if t == _FZERO else _FINF)
    if t == _FNINF:
        return _FZERO
    den = libmp.mpf_sum([_FONE, libmp.mpf_neg(t), eps], 0)  # exact, > 1
    return libmp.mpf_div(_FONE, den, wp, _RND)


@_doc
def stablemax_s(x, *, eps=0, prec=None):
    """StableMax's ``s(x) = x + 1`` for ``x >= 0`` and ``1 / (1 - x + eps)`` for ``x < 0``.

    Parameters
    ----------
    x : array_like, any shape
        Values (float arrays, Python floats, or object arrays of mpf).
    eps : float, optional
        The authors' code uses ``1 / (1 - x + 1e-30)``; pass ``eps=1e-30`` to reproduce it.
        Taken as the exact binary value of the float given (``np.float32(1e-30)`` differs from
        ``1e-30``). Must be finite and ``>= 0``. Default 0 (the paper's ``s``).
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape of ``x``; one mpf for a scalar
        Correctly rounded to ``prec`` bits (``x + 1`` and ``1 - x + eps`` are exact). ``s`` is
        continuous at 0 (``s(0) = 1`` from both sides, for ``eps = 0``) with ``s'(0) = 1``.
        ``s(+inf) = +inf``, ``s(-inf) = 0``, ``s(nan) = nan``.

    Examples
    --------
    >>> import numpy as np
    >>> round_exact(stablemax_s(np.array([-3.0, 0.0, 2.5])), "float64").tolist()
    [0.25, 1.0, 3.5]
    """
    prec = _check_prec(prec)
    e = _eps_raw(eps)
    raws, shape = _raw_flat(x, allow_object=True, what="x")
    out = _wrap([_s_raw(t, e, prec) for t in raws], prec)
    return out[0] if shape == () else _obj_array(out, shape)


def _stable_row(row, eps, wp):
    s = [_s_raw(t, eps, wp) for t in row]
    S = libmp.mpf_sum(s, wp, _RND)
    ok = not _is_special(S) and S != _FZERO  # finite and positive
    return s, S, ok


def _others(s, i, wp):
    return libmp.mpf_sum(s[:i] + s[i + 1 :], wp, _RND)


@_doc
def stablemax(z, *, eps=0, prec=None):
    """``StableMax(z)_i = s(z_i) / sum_j s(z_j)`` (see :func:`stablemax_s`).

    Equal to ``softmax(sign(z) * log1p(|z|))``.

    Parameters
    ----------
    {z}
    {eps}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape of ``z``
        Relative error below ``2**(1 - prec)``.

    Notes
    -----
    Special values follow IEEE evaluation of ``s_i / S``: a NaN row gives NaN; a ``+inf``
    makes ``S = inf``, so ``+inf`` entries give NaN and the others 0; an all ``-inf`` row gives
    ``0 / 0 = NaN``; ``-inf`` entries otherwise give 0.

    Examples
    --------
    >>> import numpy as np
    >>> round_exact(stablemax(np.array([1.0, 0.0, -1.0])), "float64").tolist()
    [0.5714285714285714, 0.2857142857142857, 0.14285714285714285]
    """
    return _rowwise(_stablemax_row, z, prec=prec, eps=eps, per_entry=True)


def _stablemax_row(row, w):
    s, S, _ = _stable_row(row, w.eps, w.wp)
    return [_div(si, S, w.prec) for si in s]


@_doc
def log_stablemax(z, *, eps=0, prec=None):
    """``log StableMax(z)_i = log(s_i / S)``, computed without cancellation.

    For the (at most one) entry with ``s_i > S / 2`` the result is ``-log1p(R_i / s_i)`` with
    ``R_i = sum_{k != i} s_k`` summed directly; the others are ``log(s_i / S)`` with
    ``s_i / S <= 1/2``.

    Parameters
    ----------
    {z}
    {eps}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape of ``z``
        Relative error below ``2**(1 - prec)``.

    Notes
    -----
    Special values: as :func:`stablemax`, then ``log``: NaN rows give NaN; with a ``+inf``
    the ``+inf`` entries give NaN and the others ``-inf``; an all ``-inf`` row gives NaN;
    other ``-inf`` entries give ``-inf``.

    Examples
    --------
    >>> import numpy as np
    >>> lp = log_stablemax(np.array([1e20, 0.0]))
    >>> float(round_exact(-lp[0], "float64"))  # log1p(1 / (1e20 + 1))
    1e-20
    """
    return _rowwise(_log_stablemax_row, z, prec=prec, eps=eps, per_entry=True)


def _log_stablemax_row(row, w):
    wp = w.wp
    s, S, ok = _stable_row(row, w.eps, wp)
    out = []
    for i, si in enumerate(s):
        if ok and libmp.mpf_cmp(libmp.mpf_shift(si, 1), S) > 0:  # s_i > S / 2
            out.append(libmp.mpf_neg(_log1p(_div(_others(s, i, wp), si, wp), wp)))
        else:
            out.append(_log(_div(si, S, wp), wp))
    return out


@_doc
def stablemax_cross_entropy(z, y, *, eps=0, prec=None):
    """Per-sample StableMax cross-entropy ``-log(s_y / S) = log1p(R_y / s_y)``.

    ``R_y = sum_{k != y} s_k`` is summed directly, so a tiny loss keeps its relative
    accuracy.

    Parameters
    ----------
    {z}
    {y}
    {eps}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape (N,); one mpf for 1-D ``z``
        Relative error below ``2**(1 - prec)``.

    Notes
    -----
    Special values: a NaN row gives NaN; ``z_y = -inf`` gives ``+inf`` (``s_y = 0``); with a
    ``+inf`` logit in the row, ``-log(s_y / S)`` is ``+inf`` if ``z_y`` is finite and NaN if
    ``z_y = +inf``; an all ``-inf`` row gives NaN.

    Examples
    --------
    >>> import numpy as np
    >>> loss = stablemax_cross_entropy(np.array([[3.0, 0.0]]), [0])
    >>> float(round_exact(loss, "float64")[0])  # log(5/4)
    0.22314355131420976
    """
    return _rowwise(_stablemax_cross_entropy_row, z, y, prec=prec, eps=eps, per_entry=False)


def _stablemax_cross_entropy_row(row, yi, w):
    wp = w.wp
    s, S, ok = _stable_row(row, w.eps, wp)
    if ok:
        return _log1p(_div(_others(s, yi, wp), s[yi], wp), wp)  # log1p(R_y / s_y)
    return libmp.mpf_neg(_log(_div(s[yi], S, wp), wp))


@_doc
def stablemax_cross_entropy_grad(z, y, *, eps=0, prec=None):
    """Gradient of :func:`stablemax_cross_entropy` w.r.t. the logits.

    ``dL/dz_i = s'(z_i) / S`` for ``i != y`` and
    ``s'(z_y) * (1/S - 1/s_y) = -(s'(z_y) / s_y) * R_y / S`` for ``i = y``, with
    ``s'(x) = 1`` for ``x >= 0`` and ``s'(x) = s(x)**2`` (``1 / (1 - x + eps)**2``) for
    ``x < 0``; ``R_y = sum_{k != y} s_k``, so nothing cancels.

    Parameters
    ----------
    {z}
    {y}
    {eps}
    {prec}

    Returns
    -------
    numpy.ndarray of object (mpf), shape of ``z``
        Relative error below ``2**(1 - prec)``.

    Notes
    -----
    Special values: a NaN row gives NaN; ``z_i = -inf`` gives 0 (``s' = s**2 = 0``, also at
    the target, the limit of ``-s_y R_y / S``); with a ``+inf`` logit (``S = inf``) the
    off-target entries are 0 and the target entry is NaN (``inf / inf``); an all ``-inf`` row
    gives NaN (``0 / 0``).

    Examples
    --------
    >>> import numpy as np
    >>> g = stablemax_cross_entropy_grad(np.array([1.0, -1.0]), 0)
    >>> round_exact(g, "float64").tolist()  # s = (2, 1/2), S = 5/2
    [-0.1, 0.1]
    """
    return _rowwise(_stablemax_cross_entropy_grad_row, z, y, prec=prec, eps=eps, per_entry=True)


def _stablemax_cross_entropy_grad_row(row, yi, w):
    wp, mul = w.wp, libmp.mpf_mul
    s, S, ok = _stable_row(row, w.eps, wp)
    g = []
    for t, si in zip(row, s, strict=True):
        ds = mul(si, si, wp, _RND) if t[0] else _FONE  # s'(x); s(-inf) = 0 gives 0
        g.append(_div(ds, S, wp))
    if ok:
        ratio = s[yi] if row[yi][0] else _div(_FONE, s[yi], wp)  # s'(z_y) / s_y
        g[yi] = libmp.mpf_neg(mul(ratio, _div(_others(s, yi, wp), S, wp), wp, _RND))
    else:  # S = inf or 0: the literal formula in IEEE arithmetic gives NaN
        g[yi] = _FNAN
    return g
