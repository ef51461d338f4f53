"""Precision-audit utilities for your own arrays.

>>> import numpy as np
>>> from numstab.audit import sc_fraction, audit_cross_entropy
>>> z = np.array([[0.0, -30.0, -30.0], [0.0, -1.0, -2.0]], dtype=np.float32)
>>> sc_fraction(z, dtype="float32")          # the first row's tail is absorbed
0.5
>>> report = audit_cross_entropy(z, np.array([0, 0]), dtype="float32")
>>> bool(report.collapsed[0]), float(report.loss[0]), bool(report.zero_target_grad[0])
(True, 0.0, True)
>>> float(report.loss_exact[0]) > 0            # the exact loss is 2 e^-30, not 0
True

Which format
------------
Every audit takes NumPy, PyTorch, JAX, CuPy and DLPack arrays (:mod:`numstab.interop`), and
every audit that takes a format (``dtype`` or ``fmt``) defaults to the format its array
carries: float16, bfloat16, float32, float64 or longdouble, in either byte order
(``report.dtype`` says which one was used); ``dtype=torch.bfloat16`` and the like name
formats too. Lists of Python floats are
float64; integer and bool arrays carry no format and are audited in float32. numstab's own
float16 / bfloat16 values live in float32 carriers: pass the format for them.
:func:`sc_gap_window` has no array and always needs one. A bad argument is refused with a
one-line ValueError or TypeError that names it (``labels[1]: None is not a real number``,
``unknown kind 'softmin'``).

Logits have the shape ``(..., C)`` (one sample per row along the last axis; labels and
per-sample results have the leading shape) and are audited in blocks of ``block_rows`` rows,
so that memory stays bounded for language-model batches (docs/interop.md has the bound).

How the exact audit stays fast
------------------------------
:func:`audit_cross_entropy` needs, per row, exact values (loss, target-class gradient) and
exact *verdicts* (does the exact tail ``s = Σ_{k≠k*} exp(z_k - max)`` lie at or below the unit
roundoff, i.e. must the correctly rounded normaliser be 1?). It first evaluates everything in
float64 (or x87 longdouble when auditing float64) with a rigorous relative error bound
``ε`` per row; a verdict whose threshold lies inside ``[s(1-ε), s(1+ε)]`` is recomputed with
mpmath (:mod:`numstab.exact`), and so are rows with non-finite logits. Everything else keeps
the fast values, whose relative error is at most ``ε`` (reported as ``exact_rel_bound``).
``method="mpmath"`` computes every row with mpmath instead (the slow, trusted path).

The bound: each term ``exp(d_k)`` with ``d_k = z_k - max`` carries the rounding of ``d_k``
(relative ``u_w``, so ``|d_k|·u_w`` on the term) and of ``exp`` (taken as ``2**12·u_w``, far
above any libm's error), each addition at most ``u_w`` per level of the sum (``n·u_w`` for
any order), where ``u_w`` is the unit roundoff of the working format; terms that underflow
add an absolute ``n·2**-1074`` (float64) term. ``log1p`` and the final subtraction add a few
``u_w`` more.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from numstab import exact
from numstab.audit_stochastic import StochasticAudit, stochastic_rows
from numstab.fidelity import FidelityReport, op_fidelity, rounding_fidelity
from numstab.functional import (
    _check_eps,
    collapse_mask,
    loss_backward,
    loss_forward,
    stablemax_s,
)
from numstab.interop import _one_line as _line
from numstab.interop import as_numpy, format_arg
from numstab.losses.rounding import recording
from numstab.metrics import param_cosines
from numstab.precision import (
    REDUCTION_ORDERS,
    Format,
    available_formats,
    format_of,
    get_format,
    quantize,
)
from numstab.process_arithmetic import FlushToZeroError, require_gradual_underflow
from numstab.rounding_modes import in_stochastic_scope, stochastic_scope
from numstab.summation import wide_format

__all__ = [
    "CrossEntropyAudit",
    "FidelityReport",
    "StochasticAudit",
    "absorbed",
    "audit_cross_entropy",
    "exact_logit_gradient",
    "nlm_cosine",
    "op_fidelity",
    "recording",
    "rounding_fidelity",
    "sc_fraction",
    "sc_gap_window",
    "ulp_error",
]

try:  # checked once on import (a warning); every collapse figure checks again (an error)
    require_gradual_underflow()
except FlushToZeroError as _exc:
    warnings.warn(f"numstab.audit: {_exc}", RuntimeWarning, stacklevel=2)

AUDIT_KINDS = ("softmax", "stablemax")
AUDIT_METHODS = ("auto", "mpmath")


# --- input checking -----------------------------------------------------------------------
#
# Every public function reads its array arguments with ``_array`` (NumPy arrays in native byte
# order; torch tensors in their own format; a bad entry of a list named with its index) and
# takes its format from ``_format`` (an explicit one) or ``_own_format`` (the array's own).

_FLOAT32 = get_format("float32")


def _show(value, limit: int = 60) -> str:
    """A one-line ``repr`` of at most ``limit`` characters, for error messages."""
    return _line(repr(value), limit)


def _own_format(arrays, name: str, weak=()):
    """The format the arrays carry: their own floating format (float16, bfloat16, float32,
    float64, longdouble); float32 for integers and bools, which carry none.

    ``arrays`` are ``(argument name, array)`` pairs; those named in ``weak`` came from Python
    scalars, which take the others' format (as in NumPy's promotion) and count only when no
    other operand has one (a Python float is float64). Two different formats are refused:
    the caller must say which one it means (``name`` is that argument).
    """
    owned = []
    for arg, a in arrays:
        try:
            f = format_of(a)
        except ValueError as exc:
            raise ValueError(f"{name}: {arg} has dtype {a.dtype}, and {exc}") from None
        if f is not None:
            owned.append((arg, f))
    if any(arg not in weak for arg, _ in owned):
        owned = [(arg, f) for arg, f in owned if arg not in weak]
    names = {f.name for _, f in owned}
    if len(names) > 1:
        which = " and ".join(f"{arg} is {f.name}" for arg, f in owned)
        raise ValueError(f"{name}: {which}; pass {name} to say which format to use")
    if owned:
        return owned[0][1]
    return _FLOAT32


def _python_scalar(x) -> bool:
    """Python ints and floats (not bools): "weak" operands without a format of their own."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_number(v) -> bool:
    """A real number: Python / NumPy ints, floats and bools, ml_dtypes floats, mpf."""
    if isinstance(v, (numbers.Real, np.bool_)) or hasattr(v, "_mpf_"):
        return True
    return isinstance(v, np.generic) and _is_real(v.dtype)


def _array(x, name: str) -> np.ndarray:
    """``x`` as a NumPy array in native byte order (values unchanged).

    Raises ValueError for nested sequences that do not form an array, and TypeError naming
    the first entry that is not a real number (``logits[1, 2]: None is not a real number``)
    in an object array or in a list that NumPy turned into strings or complex numbers.
    Arrays of other dtypes are returned for the caller to check.
    """
    a, _ = as_numpy(x, name)  # any framework's array, on the host, in native byte order
    from_python = type(x).__module__ == "builtins"  # a list or a scalar: its entries matter
    if a.dtype == object or (from_python and a.dtype.kind in "USc"):
        objs = a if a.dtype == object else np.asarray(x, dtype=object)
        for idx in np.ndindex(objs.shape):
            v = objs[idx]
            if not _is_number(v):
                where = f"[{', '.join(map(str, idx))}]" if idx else ""
                raise TypeError(
                    f"{name}{where}: {_show(v)} is not a real number ({type(v).__name__})"
                )
    return a


def _is_real(dt) -> bool:
    """Real numbers: the float formats, integers and bools (not complex, object, strings)."""
    return dt.kind in "fiub" or (dt.kind == "V" and format_of(dt) is not None)


def _broadcast(x, y, xname, yname):
    try:
        return np.broadcast_shapes(x.shape, y.shape)
    except ValueError:
        raise ValueError(
            f"{xname} (shape {x.shape}) and {yname} (shape {y.shape}) do not broadcast together"
        ) from None


def _choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {_show(value)}; valid: {', '.join(map(str, allowed))}")
    return value


def _eps(eps):
    """:func:`numstab.functional._check_eps`, its message on one line (an array's repr spans
    several)."""
    try:
        return _check_eps(eps)
    except (TypeError, ValueError) as exc:
        raise type(exc)(_line(str(exc), 200)) from None


def _widen16(a: np.ndarray) -> np.ndarray:
    """bfloat16 and the narrow formats (NumPy 'V'-kind dtypes) to float32, exactly; anything
    else unchanged."""
    return a.astype(np.float32) if a.dtype.kind == "V" and format_of(a.dtype) else a


def _round(x: np.ndarray, fmt) -> np.ndarray:
    """:func:`~numstab.precision.quantize`, and for longdouble input to float16 / bfloat16
    (which it refuses: x87 values have no exact bit view, and going through float64 would
    round twice) the exact rounding of :func:`numstab.exact.round_exact` (mpmath, per element)."""
    if x.dtype == np.longdouble and fmt.is_emulated:
        return exact.round_exact(x, fmt).astype(np.float32)  # exact: the values are in fmt
    return quantize(x, fmt)


def _logits_and_format(logits, dtype):
    """The entry of the logit audits: the logits as rows ``(N, C)`` in their own dtype (a
    view where the layout allows; :func:`_rows` widens them block by block), their format
    (``dtype``, or the array's own) and their leading shape ``(...)``."""
    z = _array(logits, "logits")
    if not (z.dtype.kind in "fiu" or (z.dtype.kind == "V" and format_of(z.dtype))):
        raise TypeError(
            f"logits must be a real floating array (float16, bfloat16, float32, float64, "
            f"longdouble or a narrow format's), got dtype {z.dtype}"
        )
    if z.ndim == 0:
        raise ValueError(
            "logits must have a class axis: shape (..., C), e.g. 2-D (samples, classes); got "
            "shape ()"
        )
    if z.shape[-1] == 0:
        raise ValueError(f"logits need at least one class, got shape {z.shape}")
    fmt = format_arg(dtype) if dtype is not None else _own_format([("logits", z)], "dtype")
    return z.reshape(-1, z.shape[-1]), fmt, z.shape[:-1]


def _rows(z: np.ndarray, start: int, stop: int, fmt) -> np.ndarray:
    """Rows ``start:stop`` of checked logits, widened exactly: bfloat16 to float32, integers
    to float64; longdouble audited in float16 / bfloat16 comes rounded to it."""
    zb = z[start:stop]
    if zb.dtype.kind in "iu":
        return zb.astype(np.float64)
    zb = _widen16(zb)
    if zb.dtype == np.longdouble and fmt.is_emulated:
        zb = _round(zb, fmt)
    return zb


#: Logit entries per block of the streaming audits (``block_rows=None``): see
#: docs/interop.md for the measurement that chose it and the memory bound it gives.
BLOCK_ELEMENTS = 2**21


def _blocks(n: int, c: int, block_rows):
    """``(start, stop)`` row ranges of at most ``block_rows`` rows (None: ``BLOCK_ELEMENTS //
    c``, at least 1) covering ``n`` rows; one empty range for ``n = 0``."""
    if block_rows is None:
        step = max(1, BLOCK_ELEMENTS // c)
    elif (
        isinstance(block_rows, bool)
        or not isinstance(block_rows, (int, np.integer))
        or (block_rows < 1)
    ):
        raise ValueError(f"block_rows must be a positive integer or None, got {_show(block_rows)}")
    else:
        step = int(block_rows)
    return [(i, min(i + step, n)) for i in range(0, n, step)] or [(0, 0)]


def _labels(labels, lead: tuple, c: int) -> np.ndarray:
    """Checked labels of shape ``lead`` (the logits' leading shape), flattened to int64."""
    y = _array(labels, "labels")
    if y.size == 0 and type(labels).__module__ == "builtins":
        y = y.astype(np.int64)  # an empty list: NumPy makes it float64
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array, got dtype {y.dtype}")
    if y.shape != tuple(lead):
        shape = (*lead, c)
        raise ValueError(
            f"labels must have shape {tuple(lead)} to match the logits of shape {shape}, got "
            f"{y.shape}"
        )
    if y.size and (y.min() < 0 or y.max() >= c):
        i = np.unravel_index(int(np.flatnonzero((y < 0) | (y >= c))[0]), y.shape)
        raise ValueError(
            f"labels[{', '.join(map(str, i))}]: {y[i]} is out of range for logits of {c} "
            f"classes; labels must lie in [0, {c})"
        )
    return y.reshape(-1).astype(np.int64)


# --- elementwise utilities ----------------------------------------------------------------


def ulp_error(computed, exact_values, fmt=None) -> np.ndarray:
    """Absolute error in units in the last place of ``fmt``, per element.

    ``|computed - exact| / ulp(exact)``, where ``ulp(x) = 2**(max(e, emin) - p + 1)`` for
    ``2**e <= |x| < 2**(e+1)`` (the spacing of the format in the exact value's binade;
    subnormals use the fixed quantum).

    Parameters
    ----------
    computed : array_like
        Values in (or rounded to) ``fmt``: an array of a float format, a torch tensor, a
        (nested) list of numbers, or a scalar.
    exact_values : array_like of float, or of mpf (object array or list)
        The reference. mpf values, ints and floats are used exactly (rationals to 256 bits);
        float64 is adequate for formats up to float32 (error ≤ 2**-29 ulp).
    fmt : str, dtype, Format or None
        The format whose ulps count. None (default): the format of ``computed``'s own dtype
        (float16, bfloat16, float32, float64, longdouble; any byte order); float64 for Python
        floats; float32 for integers and bools, which carry no format. numstab's float16 and
        bfloat16 results come in float32 carriers: pass ``fmt`` for them.

    Returns
    -------
    ndarray of float64, shape of the broadcast inputs
        0 where both agree (equal infinities of one sign, or both NaN); ``inf`` where exactly
        one side is non-finite or the infinities differ.

    Raises
    ------
    TypeError
        Complex, string or other non-real dtypes; an entry that is not a real number (the
        message names it: ``exact_values[3]: None is not a real number``).
    ValueError
        Shapes that do not broadcast, ragged nested lists, unknown ``fmt``.

    Examples
    --------
    >>> float(ulp_error(np.float16(1 + 2**-10), 1.0))  # one float16 ulp (the array's format)
    1.0
    """
    c = _array(computed, "computed")
    e = _array(exact_values, "exact_values")
    if not _is_real(c.dtype):
        raise TypeError(f"computed must be an array of real numbers, got dtype {c.dtype}")
    if not (_is_real(e.dtype) or e.dtype == object):
        raise TypeError(
            f"exact_values must be an array of real numbers or an object array of mpf, got "
            f"dtype {e.dtype}"
        )
    fmt = format_arg(fmt, "fmt") if fmt is not None else _own_format([("computed", c)], "fmt")
    _broadcast(c, e, "computed", "exact_values")
    return _ulp_error(_widen16(c), e, fmt)


def _ulp_error(c: np.ndarray, e: np.ndarray, fmt: Format) -> np.ndarray:
    """:func:`ulp_error` of checked arrays (``c`` real and not bfloat16, ``e`` real or an
    object array of mpf, broadcastable), in ulps of ``fmt``."""
    if e.dtype == object:
        out = np.empty(np.broadcast_shapes(c.shape, e.shape), dtype=np.float64)
        cb, eb = np.broadcast_arrays(c, e)
        for i in np.ndindex(out.shape):
            out[i] = _ulp_error_mpf(cb[i], eb[i], fmt)
        return out
    work = (
        np.longdouble
        if (fmt.precision > 53 or c.dtype == np.longdouble or e.dtype == np.longdouble)
        else np.float64
    )
    cw = np.asarray(c, dtype=work)
    ew = np.asarray(e, dtype=work)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        _, ex = np.frexp(np.abs(ew))
        ex = np.where(ew == 0, fmt.emin + 1, ex)  # ulp(0) is the smallest subnormal
        ulp = np.ldexp(np.ones_like(ew), np.maximum(ex - 1, fmt.emin) - fmt.precision + 1)
        err = np.abs(cw - ew) / ulp
        # Opposite huge values: the difference overflows although the ulp count does not.
        over = np.isinf(err) & np.isfinite(cw) & np.isfinite(ew)
        if over.any():
            cb, eb, ub = (np.broadcast_to(v, err.shape)[over] for v in (cw, ew, ulp))
            err = np.array(err)
            err[over] = np.abs(cb * 0.5 - eb * 0.5) / ub * 2  # halving is exact up there
        same = (cw == ew) | (np.isnan(cw) & np.isnan(ew))
        err = np.where(same, 0.0, err)
        err = np.where(~same & ~(np.isfinite(cw) & np.isfinite(ew)), np.inf, err)
    return err.astype(np.float64)


def _exact_scalar(v):
    """The mpf of a real number (checked by :func:`_is_number`): exact for floats of every
    format and for ints; a rational to 256 bits."""
    if hasattr(v, "_mpf_"):
        return v
    if isinstance(v, (bool, np.bool_, numbers.Integral)):
        return exact.to_exact(int(v))
    if isinstance(v, numbers.Rational):
        ctx = exact.context()
        return ctx.mpf(v.numerator) / v.denominator
    if isinstance(v, (float, np.generic)):
        return exact.to_exact(v)
    return exact.context().mpf(float(v))


def _ulp_error_mpf(c, e, fmt) -> float:
    ctx = exact.context()
    ce, e = _exact_scalar(c), _exact_scalar(e)
    if ctx.isnan(ce) and ctx.isnan(e):
        return 0.0
    if ctx.isnan(ce) or ctx.isnan(e) or ctx.isinf(ce) or ctx.isinf(e):
        return 0.0 if ce == e else math.inf
    if ce == e:
        return 0.0
    ex = ctx.floor(ctx.log(abs(e), 2)) if e != 0 else fmt.emin
    ex = int(ex)
    # log2 can be off by one at binade edges: fix it exactly.
    while e != 0 and abs(e) < ctx.ldexp(1, ex):
        ex -= 1
    while e != 0 and abs(e) >= ctx.ldexp(1, ex + 1):
        ex += 1
    q = ctx.ldexp(1, max(ex, fmt.emin) - fmt.precision + 1)
    return float(abs(ce - e) / q)


def absorbed(a, b, fmt=None) -> np.ndarray:
    """Elementwise mask of ``fl(a + b) == a`` with ``b != 0``: ``b`` is lost when added to ``a``.

    Both operands are first rounded to ``fmt`` (so pass values already in the format to ask
    about exactly those values); the sum is correctly rounded in ``fmt``. NaN operands are
    never absorbed (NaN compares unequal); ``a = ±inf`` absorbs every finite ``b``.

    Parameters
    ----------
    a, b : array_like of real numbers (arrays of any format, torch tensors, lists, scalars)
        Broadcast together.
    fmt : str, dtype, Format or None
        None (default): the operands' own format. A Python int or float takes the other
        operand's format (as in NumPy's promotion); two Python floats, or lists of floats,
        are float64; integers and bools alone are float32. Operands of two different
        formats are refused (ValueError): pass ``fmt``.

    Examples
    --------
    >>> absorbed(1.0, 2.0**-24, "float32"), absorbed(1.0, 2.0**-23, "float32")
    (np.True_, np.False_)
    >>> absorbed(np.float16(1), 2.0**-11), absorbed(1.0, 2.0**-11)  # float16, float64
    (np.True_, np.False_)
    """
    weak = [_python_scalar(a), _python_scalar(b)]
    a, b = _array(a, "a"), _array(b, "b")
    for name, v in (("a", a), ("b", b)):
        if not _is_real(v.dtype):
            raise TypeError(f"{name} must be a real numeric array, got dtype {v.dtype}")
    if fmt is not None:
        fmt = format_arg(fmt, "fmt")
    else:
        scalars = [n for n, w in zip("ab", weak, strict=True) if w]
        fmt = _own_format([("a", a), ("b", b)], "fmt", weak=scalars)
    a, b = _widen16(a), _widen16(b)
    _broadcast(a, b, "a", "b")
    with np.errstate(invalid="ignore", over="ignore"):
        aq = _round(np.asarray(a, dtype=np.result_type(a.dtype, np.float32)), fmt)
        bq = _round(np.asarray(b, dtype=np.result_type(b.dtype, np.float32)), fmt)
        s = quantize(aq + bq, fmt)
    out = (s == aq) & (bq != 0)
    return out[()] if out.ndim == 0 else out


def sc_fraction(
    logits,
    *,
    dtype=None,
    kind: str = "softmax",
    order: str = "pairwise",
    eps: float = 0.0,
    block_rows: int | None = None,
) -> float:
    """Fraction of rows in Softmax Collapse in a format and summation order.

    A row collapses when its max-shifted normaliser, ``Σ_k exp(z_k - max z)`` for softmax or
    ``Σ_k s(z_k) / s(max z)`` for StableMax, computed in ``dtype`` (logits rounded to it, every
    term and partial sum rounded) in ``order``, is exactly 1.

    Parameters
    ----------
    logits : array_like, shape (..., C)
        Each row along the last axis is one sample. An array of a float format or of
        integers of any framework (:mod:`numstab.interop`), or nested lists.
    dtype : str, dtype, Format or None
        The format. None (default): the logits' own format (float16, bfloat16, float32,
        float64 or longdouble, in any byte order; a torch or JAX array's dtype); float64
        for lists of Python floats; float32 for integer logits, which carry no format.
        numstab's float16 / bfloat16 logits come in float32 carriers: pass ``dtype`` for them.
        A framework's dtype object (``torch.bfloat16``) names a format too.
    kind : {"softmax", "stablemax"}
    order : {"pairwise", "sequential", "wide", "sorted", "torch"}
        Summation order (:mod:`numstab.summation`); ``"torch"`` is PyTorch CPU's own
        (docs/interop.md).
    eps : float
        StableMax denominator epsilon (the authors' code: 1e-30); finite and ``>= 0``.
    block_rows : int or None
        Rows per block: the logits are widened and measured one block at a time, so memory
        stays bounded by the block (docs/interop.md). None: ``BLOCK_ELEMENTS // C`` rows.
        The result does not depend on it.

    Returns
    -------
    float
        In [0, 1]; NaN for zero rows. Rows containing NaN never count as collapsed.

    Examples
    --------
    >>> z16 = np.array([[0.0, -10.0], [0.0, -2.0]], dtype=np.float16)
    >>> sc_fraction(z16), sc_fraction(z16, dtype="float32")  # e^-10 is absorbed in float16
    (0.5, 0.0)
    """
    _choice("kind", kind, AUDIT_KINDS)
    _choice("order", order, REDUCTION_ORDERS)
    _eps(eps)
    require_gradual_underflow()
    z, fmt, _ = _logits_and_format(logits, dtype)
    n, c = z.shape
    count = 0
    for start, stop in _blocks(n, c, block_rows):
        mask = collapse_mask(_rows(z, start, stop, fmt), fmt, kind=kind, order=order, eps=eps)
        count += int(np.count_nonzero(mask))
    return count / n if n else float("nan")


def sc_gap_window(dtype, n_classes: int) -> tuple[float, float]:
    """Logit-gap interval in which collapse depends on the summation order.

    For a row with its maximum at 0 and the other ``n - 1`` logits at ``-g``:

    - below ``never_below`` no order collapses: even added one at a time to 1, a term
      ``fl(e^{-g}) > u`` survives. ``fl(e^{-g}) <= u`` iff ``e^{-g} <= u(1 + 2**-p)`` (the
      rounding boundary above the power of two ``u``), so ``never_below = p ln 2 - ln(1 + u)``;
      the ``wide`` order rounds ``1 + t`` to the wider format first (unit roundoff ``u_w``), and
      its sum is 1 for ``t <= u + u_w``, which lowers the bound to ``-ln((u + u_w)(1 + u))``.
    - from ``always_above`` on, every order collapses: any order's computed tail sum is at
      most ``(n-1)·t·(1+u)^(n-2)`` with ``t <= e^{-g}(1+u)``, and it is absorbed once it is
      ``<= u``, so ``always_above = ln(n-1) + p ln 2 + (n-1) ln(1+u)``.

    These are bounds from a model of correctly rounded ``exp``; the measured thresholds of
    each order lie inside them (float32, 113 classes: about 16.64 and 21.36). To decide a real
    row, compute the sum in the format (:func:`sc_fraction`), never from a gap formula.

    Parameters
    ----------
    dtype : str, dtype or Format
        Required: there is no array to take a format from.
    n_classes : int, >= 2
    """
    fmt = format_arg(dtype)
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {_show(n_classes)}")
    try:
        float(n_classes - 1)
    except OverflowError:
        raise ValueError(
            f"n_classes must be an integer >= 2 below 2**1024, got {n_classes!r}"
        ) from None
    u = fmt.unit_roundoff
    p = fmt.precision
    try:  # the wide order rounds 1 + t to the wider format first: t <= u + u_wide collapses
        u_wide = wide_format(fmt).unit_roundoff
    except ValueError:
        u_wide = 0.0
    never_below = -math.log(u + u_wide) - math.log1p(u)
    always_above = math.log(n_classes - 1) + p * math.log(2) + (n_classes - 1) * math.log1p(u)
    return never_below, always_above


def nlm_cosine(params: dict, grads: dict) -> dict:
    """Naive-loss-minimisation alignment ``cos(θ, -∇L)``, per tensor and ``"global"``.

    Parameters
    ----------
    params, grads : dict of name -> ndarray
        The same keys and shapes; arrays (or lists) of real numbers. Computed in float64
        (longdouble for longdouble tensors), after scaling each side by a power of two (exact)
        so that neither tiny (subnormal) nor huge (1e300) tensors under- or overflow.

    Returns
    -------
    dict of name -> float, plus ``"global"``
        In [-1, 1] (up to rounding); NaN where a tensor (or every tensor, for ``"global"``)
        is zero or holds NaN / inf.

    Raises
    ------
    TypeError
        ``params`` / ``grads`` not mappings, or a tensor of a non-real dtype (complex, object,
        string).
    ValueError
        Different keys or shapes (the message names them).
    """
    if not isinstance(params, Mapping) or not isinstance(grads, Mapping):
        raise TypeError(
            f"params and grads must be dicts of name -> array, got {type(params).__name__} "
            f"and {type(grads).__name__}"
        )
    missing = set(params) ^ set(grads)
    if missing:
        differing = sorted(missing, key=repr)
        raise ValueError(f"params and grads must have the same keys; differing: {differing}")
    wide_p, wide_g = {}, {}
    for k in params:
        wide_p[k] = _wide_tensor(params[k], f"params[{k!r}]")
        wide_g[k] = _wide_tensor(grads[k], f"grads[{k!r}]")
        if wide_p[k].shape != wide_g[k].shape:
            raise ValueError(
                f"shape mismatch for {k!r}: params {wide_p[k].shape}, grads {wide_g[k].shape}"
            )
    with np.errstate(all="ignore"):  # NaN / inf tensors give NaN, as documented
        ep, eg = _pow2_exponent(wide_p.values()), _pow2_exponent(wide_g.values())
        out = param_cosines(
            {k: np.ldexp(v, -_pow2_exponent([v])) for k, v in wide_p.items()},
            {k: np.ldexp(v, -_pow2_exponent([v])) for k, v in wide_g.items()},
            sign=-1.0,
        )
        glob = param_cosines(
            {k: np.ldexp(v, -ep) for k, v in wide_p.items()},
            {k: np.ldexp(v, -eg) for k, v in wide_g.items()},
            sign=-1.0,
        )
    out["global"] = glob["global"]
    return out


def _wide_tensor(v, name) -> np.ndarray:
    """``v`` exactly widened to float64 (longdouble stays longdouble)."""
    a = _array(v, name)
    if not _is_real(a.dtype) or a.dtype.kind == "b":
        raise TypeError(f"{name} must be an array of real numbers, got dtype {a.dtype}")
    return a.astype(np.longdouble if a.dtype == np.longdouble else np.float64)


def _pow2_exponent(arrays) -> int:
    """``e`` with ``2**(e-1) <= max |x| < 2**e`` over the finite entries (0 if all are 0)."""
    e = None
    for v in arrays:
        fin = np.abs(v[np.isfinite(v)])
        m = fin.max() if fin.size else 0
        if m > 0:
            ex = int(np.frexp(m)[1])
            e = ex if e is None else max(e, ex)
    return 0 if e is None else e


# --- the cross-entropy audit --------------------------------------------------------------


@dataclass(frozen=True)
class CrossEntropyAudit:
    """Per-sample audit of a cross-entropy computed in a format against exact arithmetic.

    Attributes (arrays of the logits' leading shape ``(...)``, ``(N,)`` for 2-D logits)
    -----------------------------------------------------------------------------------
    loss : float64
        The loss as computed in ``dtype`` and ``order`` (the framework formula of ``kind``).
    loss_exact : float64 (longdouble when auditing float64/longdouble)
        The exact loss ``-log p_y`` (relative error at most ``exact_rel_bound``).
    loss_ulp_error : float64
        ``|loss - loss_exact|`` in ulps of ``dtype``.
    collapsed : bool
        Measured Softmax Collapse: the computed normaliser is exactly 1.
    collapsed_exact : bool
        The exact verdict: the exact tail ``s`` (``Σ_{k≠k*} e^{z_k - max}``, or its StableMax
        analogue) is at most the unit roundoff, so the correctly rounded normaliser is 1.
    zero_loss : bool
        The computed loss is exactly 0.
    zero_target_grad : bool
        The computed target-class logit gradient ``p_y - 1`` (unscaled) is exactly 0.
    target_grad, target_grad_exact : float64
        Computed and exact ``∂L/∂z_y``.
    target_grad_rel_error : float64
        ``|computed - exact| / |exact|`` (1.0 for a computed 0: "100 % wrong").
    off_target_mass : float64
        ``Σ_{k≠y} ∂L/∂z_k`` of the computed gradient (exactly ``-target_grad_exact`` in exact
        arithmetic).
    used_mpmath : bool
        Rows that fell back to mpmath.
    stochastic : StochasticAudit or None
        For a format in stochastic rounding (``float16@stochastic``): per row, the probability
        that the normaliser is exactly 1 (exact or a Monte Carlo estimate with its Wilson
        interval) and the bias of the loss and target gradient against the exact ones
        (:mod:`numstab.audit_stochastic`); the fields above are then one SR draw. None
        otherwise.

    Other attributes: ``dtype``, ``kind``, ``order``, ``method``, ``exact_rel_bound`` (relative
    error bound of the fast exact values; 0 for mpmath rows), ``seconds``.
    """

    dtype: str
    kind: str
    order: str
    method: str
    loss: np.ndarray
    loss_exact: np.ndarray
    loss_ulp_error: np.ndarray
    collapsed: np.ndarray
    collapsed_exact: np.ndarray
    zero_loss: np.ndarray
    zero_target_grad: np.ndarray
    target_grad: np.ndarray
    target_grad_exact: np.ndarray
    target_grad_rel_error: np.ndarray
    off_target_mass: np.ndarray
    used_mpmath: np.ndarray
    exact_rel_bound: np.ndarray
    seconds: float = 0.0
    notes: tuple = field(default=())
    stochastic: StochasticAudit | None = None

    def __len__(self) -> int:
        return int(self.loss.size)

    def summary(self) -> dict:
        """Fractions and medians over samples, as plain floats (JSON-ready)."""
        n = len(self)

        def frac(mask):
            return int(np.count_nonzero(mask)) / n if n else float("nan")

        finite = np.isfinite(self.target_grad_rel_error)
        rel = self.target_grad_rel_error[finite]
        ulp = self.loss_ulp_error[np.isfinite(self.loss_ulp_error)]
        return {
            "n_samples": n,
            "dtype": self.dtype,
            "kind": self.kind,
            "order": self.order,
            "method": self.method,
            "sc_fraction_measured": frac(self.collapsed),
            "sc_fraction_exact": frac(self.collapsed_exact),
            "agreement": frac(self.collapsed == self.collapsed_exact),
            "zero_loss_fraction": frac(self.zero_loss),
            "zero_target_grad_fraction": frac(self.zero_target_grad),
            "target_grad_rel_error_median": float(np.median(rel)) if rel.size else None,
            "target_grad_100pct_wrong_fraction": frac(self.target_grad_rel_error >= 1.0),
            "loss_max_ulp_error": float(np.max(ulp)) if ulp.size else None,
            "loss_median_ulp_error": float(np.median(ulp)) if ulp.size else None,
            "mpmath_rows": int(np.count_nonzero(self.used_mpmath)),
            "exact_rel_bound_max": float(np.max(self.exact_rel_bound)) if n else 0.0,
            "seconds": self.seconds,
            **(self.stochastic.summary() if self.stochastic is not None else {}),
        }


def audit_cross_entropy(
    logits,
    labels,
    *,
    dtype=None,
    kind: str = "softmax",
    order: str = "pairwise",
    eps: float = 0.0,
    method: str = "auto",
    block_rows: int | None = None,
    sr_samples: int = 64,
    sr_seed: int = 0,
    sr_confidence: float = 0.95,
) -> CrossEntropyAudit:
    """Audit a cross-entropy computed in a format against exact arithmetic, per sample.

    Parameters
    ----------
    logits : array_like, shape (..., C)
        Rounded to ``dtype`` first; the exact reference uses the same rounded values, so the
        audit measures the loss computation, not the rounding of its input. An array of a
        float format or of integers of any framework (:mod:`numstab.interop`), or nested
        lists; each row along the last axis is one sample.
    labels : int array_like, shape (...)
    dtype : str, dtype, Format or None
        Format of the loss computation. None (default): the logits' own format (float16,
        ml_dtypes bfloat16, float32, float64 or longdouble, in any byte order; a torch
        tensor's dtype); float64 for lists of Python floats; float32 for integer logits, which
        carry no format. numstab's float16 / bfloat16 logits come in float32 carriers: pass
        ``dtype`` for them.
    kind : {"softmax", "stablemax"}
        Softmax cross-entropy as frameworks compute it, or StableMax cross-entropy.
    order : {"pairwise", "sequential", "wide", "sorted", "torch"}
        Summation order of the computed normaliser (``"torch"``: PyTorch CPU's own).
    eps : float
        StableMax denominator epsilon, used identically by the computed and exact sides.
    method : {"auto", "mpmath"}
        ``auto``: certified float64/longdouble evaluation, mpmath only where its error bound
        cannot decide a verdict (and for non-finite rows, and throughout when auditing
        longdouble); ``mpmath``: every row in mpmath.
    block_rows : int or None
        Rows audited at a time (memory bound in docs/interop.md); None: ``BLOCK_ELEMENTS //
        C``. The result does not depend on it (but for the random streams of stochastic
        rounding: each block draws its own).
    sr_samples, sr_seed, sr_confidence
        Stochastic rounding only (``dtype`` such as ``float16@stochastic``): independent SR
        streams of the Monte Carlo estimates (an integer >= 2), the seed of their random bits,
        and the confidence level of the Wilson interval in (0, 1). The computed fields are one
        draw of the enclosing :func:`numstab.rounding_modes.stochastic_scope` (or of
        ``stochastic_scope(sr_seed, 0, "audit")`` outside one).

    Returns
    -------
    CrossEntropyAudit
        Per-sample fields of the logits' leading shape (``stochastic``: the SR figures).

    Raises
    ------
    ValueError, TypeError
        Logits not 2-D, no classes, non-real dtype, an entry that is not a number; labels of
        the wrong dtype, length or range; unknown dtype, kind, order or method; ``eps``
        negative, not finite or not a real number (each message names the argument and the
        bad value).

    Notes
    -----
    Rows with NaN or ±inf logits are audited too: the computed side does what IEEE arithmetic
    does, the exact side follows mpmath's inf/NaN rules, and such rows always use mpmath.
    """
    _choice("kind", kind, AUDIT_KINDS)
    _choice("order", order, REDUCTION_ORDERS)
    _choice("method", method, AUDIT_METHODS)
    require_gradual_underflow()
    _eps(eps)
    z, fmt, lead = _logits_and_format(logits, dtype)
    y = _labels(labels, lead, z.shape[1])
    sr = None
    if fmt.rounding == "stochastic":
        sr = _sr_options(sr_samples, sr_seed, sr_confidence)
    t0 = time.perf_counter()
    scoped = sr is not None and not in_stochastic_scope()
    with stochastic_scope(sr_seed, 0, "audit") if scoped else contextlib.nullcontext():
        parts = [
            _audit_rows(
                _rows(z, i, j, fmt), y[i:j], kind, fmt, order, eps, method,
                None if sr is None else {**sr, "first_row": i},
            )
            for i, j in _blocks(z.shape[0], z.shape[1], block_rows)
        ]
    fields = {k: np.concatenate([p[k] for p in parts]).reshape(lead) for k in parts[0]}
    stochastic = None
    if sr is not None:
        rows = {k[3:]: fields.pop(k) for k in list(fields) if k.startswith("sr_")}
        stochastic = StochasticAudit(**rows, **sr, interval="wilson")
    return CrossEntropyAudit(
        dtype=fmt.name,
        kind=kind,
        order=order,
        method=method,
        seconds=time.perf_counter() - t0,
        stochastic=stochastic,
        **fields,
    )


def _sr_options(samples, seed, confidence) -> dict:
    """The checked Monte Carlo options of a stochastic-rounding audit."""
    if not _is_int(samples) or samples < 2:
        raise ValueError(f"sr_samples must be an integer >= 2, got {_show(samples)}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"sr_seed must be an integer >= 0, got {_show(seed)}")
    if not _is_number(confidence) or not 0 < float(confidence) < 1:
        raise ValueError(f"sr_confidence must be a number in (0, 1), got {_show(confidence)}")
    return {"samples": int(samples), "seed": int(seed), "confidence": float(confidence)}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _audit_rows(z, y, kind, fmt, order, eps, method, sr=None) -> dict:
    """The per-sample fields of :class:`CrossEntropyAudit` for checked 2-D logits ``z``
    (widened) and labels ``y``; with ``sr`` (stochastic rounding) also the rows of
    :class:`StochasticAudit`, keys prefixed ``sr_``."""
    with np.errstate(over="ignore"):  # beyond the format's range: ±inf, as rounding says
        zq = quantize(z, fmt)
    n, _c = zq.shape
    rows = np.arange(n)

    # Computed side: exactly what training does in this format and order.
    loss, cache = loss_forward(zq, y, kind=kind, fmt=fmt, order=order, eps=eps)
    grad = loss_backward(cache, 1.0)
    if kind == "softmax":
        collapsed = cache.normaliser == 1
    else:
        collapsed = collapse_mask(zq, fmt, kind="stablemax", order=order, eps=eps)
    wide = (
        np.longdouble if fmt.precision > 24 and "longdouble" in available_formats() else np.float64
    )
    target = grad[rows, y].astype(wide)
    with np.errstate(invalid="ignore", over="ignore"):
        off_mass = grad.astype(wide).sum(axis=1) - target

    # Exact side.
    if method == "mpmath" or fmt.name == "longdouble" or fmt.precision > 53:
        ex = _exact_mpmath(zq, y, kind, fmt, eps, np.ones(n, dtype=bool))
        loss_x, tgt_x, coll_x, bound = ex["loss"], ex["tgt"], ex["coll"], np.zeros(n)
        used = np.ones(n, dtype=bool)
    else:
        loss_x, tgt_x, coll_x, bound, undecided = _exact_fast(zq, y, kind, fmt, eps)
        used = undecided
        if undecided.any():
            ex = _exact_mpmath(zq, y, kind, fmt, eps, undecided)
            loss_x[undecided] = ex["loss"][undecided]
            tgt_x[undecided] = ex["tgt"][undecided]
            coll_x[undecided] = ex["coll"][undecided]
            bound[undecided] = 0.0

    loss_c = loss.astype(wide)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(target - tgt_x) / np.abs(tgt_x)
    rel = np.where((target == tgt_x) | (np.isnan(target) & np.isnan(tgt_x)), 0.0, rel)
    extra = {}
    if sr is not None:
        got = stochastic_rows(zq, y, kind, fmt, order, eps, loss_x, tgt_x, **sr)
        extra = {"sr_" + k: v for k, v in got.items()}
    return dict(
        **extra,
        loss=loss_c,
        loss_exact=loss_x,
        loss_ulp_error=_ulp_error(loss_c, loss_x, fmt),
        collapsed=np.asarray(collapsed, dtype=bool),
        collapsed_exact=coll_x,
        zero_loss=loss_c == 0,
        zero_target_grad=target == 0,
        target_grad=target,
        target_grad_exact=tgt_x,
        target_grad_rel_error=rel.astype(np.float64),
        off_target_mass=off_mass,
        used_mpmath=used,
        exact_rel_bound=bound,
    )


def _exact_fast(zq, y, kind, fmt, eps):
    """Exact values in float64 (longdouble for float64 audits) with a per-row error bound.

    Returns loss, target gradient, the collapse verdict, the relative bound, and the rows the
    bound cannot decide (or whose logits are not finite).
    """
    n, c = zq.shape
    rows = np.arange(n)
    work = np.longdouble if fmt.precision > 24 else np.float64
    uw = math.ldexp(1.0, -np.finfo(work).nmant - 1)
    zw = zq.astype(work)
    finite = np.isfinite(zw).all(axis=1)
    zw = np.where(finite[:, None], zw, 0)
    top = np.argmax(zw, axis=1)
    m = zw[rows, top]
    u = fmt.unit_roundoff
    with np.errstate(under="ignore", over="ignore", invalid="ignore", divide="ignore"):
        if kind == "softmax":
            d = zw - m[:, None]
            terms = np.exp(d)
            terms[rows, top] = 0
            s = terms.sum(axis=1)
            dmax = np.max(np.abs(d), axis=1)
            eps_row = (dmax + c + 2.0**12 + 8) * uw
            # Terms below the working format's normal range carry an absolute error of up to
            # one subnormal quantum each (and exp underflows to 0 below it).
            tiny_abs = c * float(np.finfo(work).smallest_subnormal)
            # Target gradient: -t_y / (1 + t_y) with t_y = Σ_{k≠y} e^{z_k - z_y}.
            at_top = top == y
            py = np.exp(zw[rows, y] - m) / (1 + s)
            tgt = np.where(at_top, -s / (1 + s), py - 1)
            loss = (m - zw[rows, y]) + np.log1p(s)
        else:
            sv = stablemax_s(zw, format_of(zw), eps=eps)[0]  # exact ops in float64/x87
            smax = sv[rows, top]
            ratio = sv / smax[:, None]
            ratio[rows, top] = 0
            s = ratio.sum(axis=1)
            eps_row = np.full(n, (c + 8.0) * 4 * uw, dtype=work)
            tiny_abs = c * float(np.finfo(work).smallest_subnormal)
            total = sv.sum(axis=1)
            sy = sv[rows, y]
            # others = Σ_{k≠y} s_k: recompute as a sum of positives to avoid cancellation.
            masked = sv.copy()
            masked[rows, y] = 0
            others = masked.sum(axis=1)
            deriv = np.where(zw[rows, y] >= 0, 1, sv[rows, y] ** 2)
            tgt = -deriv * others / (total * sy)
            loss = np.log1p(others / sy)
        eps_row = eps_row.astype(work)  # 1 ± eps must not round to 1 (float64 audits)
        lo = s * (1 - eps_row) - tiny_abs
        hi = s * (1 + eps_row) + tiny_abs
        coll = hi <= u
        undecided = ~finite | ~((hi <= u) | (lo > u))
        # A tail near the working format's subnormal range has lost relative accuracy: such
        # rows get their values from mpmath (their verdict is "collapsed" anyway).
        undecided |= s < tiny_abs * 2.0**40
    bound = (eps_row + 4 * uw).astype(np.float64)
    return loss, tgt, coll, bound, undecided


def _exact_mpmath(zq, y, kind, fmt, eps, rows_mask):
    """mpmath loss, target gradient and collapse verdict for the selected rows."""
    n = zq.shape[0]
    work = (
        np.longdouble if fmt.precision > 24 and "longdouble" in available_formats() else np.float64
    )
    loss = np.full(n, np.nan, dtype=work)
    tgt = np.full(n, np.nan, dtype=work)
    coll = np.zeros(n, dtype=bool)
    idx = np.flatnonzero(rows_mask)
    if idx.size == 0:
        return {"loss": loss, "tgt": tgt, "coll": coll}
    sub, ys = zq[idx], y[idx]
    target_fmt = "float64" if work == np.float64 else "longdouble"
    if kind == "softmax":
        lx = exact.cross_entropy(sub, ys)
        gx = exact.cross_entropy_grad(sub, ys)
    else:
        lx = exact.stablemax_cross_entropy(sub, ys, eps=eps)
        gx = exact.stablemax_cross_entropy_grad(sub, ys, eps=eps)
    loss[idx] = exact.round_exact(lx, target_fmt)
    tgt[idx] = exact.round_exact(gx[np.arange(idx.size), ys], target_fmt)
    coll[idx] = _exact_collapse(sub, kind, fmt, eps)
    return {"loss": loss, "tgt": tgt, "coll": coll}


def _exact_collapse(z, kind, fmt, eps) -> np.ndarray:
    """Exact verdict ``tail <= u`` per row (mpmath with growing precision; Fractions for
    StableMax, whose tail is rational and may equal ``u`` exactly)."""
    u = Fraction(1, 2**fmt.precision)
    out = np.zeros(z.shape[0], dtype=bool)
    if kind == "stablemax":
        for i, row in enumerate(z):
            if np.isnan(row).any() or np.isposinf(row).any() or np.isneginf(row).all():
                continue  # the exact tail is undefined (NaN, inf/inf): never "collapsed"
            # s(-inf) = 0 exactly: such entries add nothing to the tail.
            sv = [
                Fraction(0) if np.isneginf(v) else _stablemax_fraction(_fraction(v), eps)
                for v in row
            ]
            k = int(np.argmax(row))
            tail = sum(sv[j] for j in range(len(sv)) if j != k) / sv[k]
            out[i] = tail <= u
        return out
    for prec in (256, 1024, 4096):
        s = exact.tail_sum(z, prec=prec)
        ctx = exact.context(prec)
        uu = ctx.ldexp(1, -fmt.precision)
        margin = ctx.ldexp(uu, 16 - prec)
        decided = True
        for i, v in enumerate(s):
            if ctx.isnan(v):
                out[i] = False
            elif abs(v - uu) <= margin:
                decided = False
            else:
                out[i] = v <= uu
        if decided:
            return out
    return out


def _fraction(v) -> Fraction:
    """The exact rational value of a finite float (x87 longdouble included)."""
    if isinstance(v, np.longdouble):
        m, e = np.frexp(v)
        return Fraction(int(np.ldexp(m, 64))) * Fraction(2) ** (int(e) - 64)
    return Fraction(float(v))


def _stablemax_fraction(x: Fraction, eps: float) -> Fraction:
    """StableMax's ``s(x)`` in exact rational arithmetic (the float twin is
    :func:`numstab.functional.stablemax_s`)."""
    if x >= 0:
        return x + 1
    return 1 / (1 - x + Fraction(eps))


def exact_logit_gradient(
    logits,
    labels,
    *,
    dtype=None,
    kind: str = "softmax",
    eps: float = 0.0,
    block_rows: int | None = None,
) -> np.ndarray:
    """The exact per-sample logit gradient ``∂L_i/∂z_i`` of the logits as rounded to ``dtype``.

    Softmax: ``p_k`` off target and ``-t_y / (1 + t_y)`` on target (``t_y = Σ_{k≠y}
    e^{z_k - z_y}``); StableMax: ``s'(z_k)/S`` off target and ``-s'(z_y)(S - s_y)/(S s_y)`` on
    target. Evaluated in float64 from sums of positive terms only, so every entry has a
    relative error below ``(C + max|z_k - max z| + 2**12)·2**-52`` (the bound of
    :func:`audit_cross_entropy`'s fast path); rows with non-finite logits (or longdouble logits
    beyond float64's range) go through mpmath.

    Parameters
    ----------
    logits : array_like, shape (..., C)
        Any framework's array (:mod:`numstab.interop`), or nested lists.
    labels : int array_like, shape (...)
    dtype : str, dtype, Format or None
        The format the logits are rounded to first. None (default): the logits' own format
        (float16, ml_dtypes bfloat16, float32, float64 or longdouble, in any byte order; a
        torch tensor's dtype); float64 for lists of Python floats; float32 for integer
        logits, which carry no format. numstab's float16 / bfloat16 logits come in float32
        carriers: pass ``dtype`` for them.
    kind : {"softmax", "stablemax"}
    eps : float
        StableMax denominator epsilon.
    block_rows : int or None
        Rows computed at a time (None: ``BLOCK_ELEMENTS // C``); the result does not depend
        on it.

    Returns
    -------
    ndarray, float64, shape (..., C)
    """
    _choice("kind", kind, AUDIT_KINDS)
    _eps(eps)
    z, fmt, lead = _logits_and_format(logits, dtype)
    n, c = z.shape
    y = _labels(labels, lead, c)
    out = np.empty((n, c), dtype=np.float64)
    for i, j in _blocks(n, c, block_rows):
        out[i:j] = _exact_gradient_rows(_rows(z, i, j, fmt), y[i:j], kind, fmt, eps)
    return out.reshape(*lead, c)


def _exact_gradient_rows(z, y, kind, fmt, eps) -> np.ndarray:
    """:func:`exact_logit_gradient` of checked 2-D logits ``z`` (widened) and labels ``y``."""
    with np.errstate(over="ignore"):  # beyond the format's range: ±inf, as rounding says
        zq = quantize(z, fmt)
        z = zq.astype(np.float64)  # longdouble beyond float64's range: inf, so mpmath below
    n = z.shape[0]
    rows = np.arange(n)
    finite = np.isfinite(z).all(axis=1)
    # C order whatever the caller's layout: the row sums below then add in one order
    zf = np.ascontiguousarray(np.where(finite[:, None], z, 0.0))
    with np.errstate(under="ignore", over="ignore", invalid="ignore", divide="ignore"):
        if kind == "softmax":
            top = np.argmax(zf, axis=1)
            m = zf[rows, top]
            e = np.exp(zf - m[:, None])
            e[rows, top] = 0
            s = e.sum(axis=1)
            e[rows, top] = 1
            g = e / (1 + s)[:, None]
            at_top = top == y
            g[rows, y] = np.where(at_top, -s / (1 + s), g[rows, y] - 1)
        else:
            sv = stablemax_s(zf, "float64", eps=eps)[0]
            # Sums of s scaled by 2**-e (exact), so that neither S = Σ s (logits near
            # 1e308) nor products such as S·s_y overflow, and s_y**2 / S never forms 0 / 0.
            e = np.frexp(sv.max(axis=1))[1]
            scaled = np.ldexp(sv, -e[:, None])
            total = scaled.sum(axis=1)  # S·2**-e
            share = scaled / total[:, None]  # s_k / S
            # s'(z_k) / S: 1/S for z_k >= 0, s_k**2 / S = s_k·(s_k / S) for z_k < 0.
            g = np.where(zf >= 0, np.ldexp(1.0 / total, -e)[:, None], sv * share)
            masked = scaled.copy()
            masked[rows, y] = 0
            others = masked.sum(axis=1)  # (S - s_y)·2**-e, summed directly
            sy = sv[rows, y]
            ratio = np.where(zf[rows, y] >= 0, 1.0 / sy, sy)  # s'(z_y) / s_y
            g[rows, y] = -ratio * (others / total)
    if not finite.all():
        idx = np.flatnonzero(~finite)
        fn = (
            exact.cross_entropy_grad
            if kind == "softmax"
            else (lambda a, b: exact.stablemax_cross_entropy_grad(a, b, eps=eps))
        )
        g[idx] = exact.round_exact(fn(zq[idx], y[idx]), "float64")  # the exact logits
    return g
