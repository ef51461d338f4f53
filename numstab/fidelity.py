"""Is an elementwise function correctly rounded on these inputs? (an audit users can call)

:func:`rounding_fidelity` runs a function on inputs of one format and compares every result
with the correctly rounded value of the exact function (mpmath, a Ziv loop: the exact value is
evaluated at growing precision until its rounding to the format is certain). It reports the
fraction of results that are correctly rounded and the worst error in ulps of the format.

Example: NumPy's float32 ``exp`` on a grid near 0::

    >>> import numpy as np
    >>> r = rounding_fidelity(np.exp, np.linspace(-1e-6, 0, 200, dtype=np.float32), "exp")
    >>> r.n, 0.0 <= r.fraction_correct <= 1.0
    (200, True)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from numstab import exact
from numstab.elementary import FUNCTIONS, exact_round
from numstab.precision import Format, get_format

__all__ = ["FidelityReport", "rounding_fidelity"]


@dataclass(frozen=True)
class FidelityReport:
    """Result of :func:`rounding_fidelity`.

    Attributes
    ----------
    function : str
        The exact function's name (or the callable's ``__name__``).
    format : str
        The format results are judged in.
    n : int
        Number of inputs.
    n_correct : int
        Results bit-identical to the correctly rounded value (a zero of the right sign; NaN
        where the exact result is NaN).
    fraction_correct : float
        ``n_correct / n`` (NaN for no inputs).
    max_ulp_error : float
        Largest ``|result - exact| / ulp(exact)`` over inputs with a finite exact value and a
        finite result (``ulp``: the format's spacing at the exact value, the subnormal
        quantum below the normal range); ``inf`` when some result is non-finite where the
        exact value is finite or the other way round, or NaN where it should not be. A
        correctly rounded result has at most 0.5.
    worst_input : float or None
        An input with the largest error (None when every result is correct).
    """

    function: str
    format: str
    n: int
    n_correct: int
    fraction_correct: float
    max_ulp_error: float
    worst_input: float | None


def rounding_fidelity(fn: Callable, inputs, exact_fn="exp", *, dtype=None) -> FidelityReport:
    """Measure how often ``fn`` is correctly rounded on ``inputs``.

    Parameters
    ----------
    fn : callable
        ``fn(x) -> array`` elementwise, given ``x`` as a NumPy array of the format's dtype
        (e.g. ``numpy.exp``, ``numstab.elementary.exp``, a wrapper around a framework's
        function). Its results are judged by value: they must equal the correctly rounded
        value in ``dtype`` (a wider result that is not representable in it is not correct).
    inputs : array_like of real numbers
        Converted to ``dtype`` (rounded to nearest if not representable).
    exact_fn : {"exp", "log", "log1p", "expm1"} or callable
        The exact function: a name, or ``g(ctx, x) -> mpf`` evaluated in the mpmath context
        ``ctx`` (whose precision the Ziv loop raises; e.g. ``lambda ctx, x: ctx.tanh(x)``).
        Callables are evaluated on finite inputs only; results of non-finite inputs are
        compared with ``fn``'s own IEEE value of the named functions' rules, so for callables
        pass finite inputs.
    dtype : str, numpy dtype or Format, optional
        The format (float16, bfloat16, float32, float64, longdouble); default: the inputs'.

    Returns
    -------
    FidelityReport

    Raises
    ------
    ValueError
        Unknown function name or format, ``inputs`` not 1-D-convertible real numbers, or a
        result array of another shape.
    TypeError
        ``fn`` or a callable ``exact_fn`` not callable.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(exact_fn, str):
        if exact_fn not in FUNCTIONS:
            raise ValueError(f"unknown exact function {exact_fn!r}; valid: {', '.join(FUNCTIONS)}")
        name = exact_fn
    elif callable(exact_fn):
        name = getattr(exact_fn, "__name__", "callable")
    else:
        raise TypeError(f"exact_fn must be a function name or callable, got {exact_fn!r}")
    arr = np.asarray(inputs)
    floating = arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16"
    if not (floating or arr.dtype.kind in "iu"):
        raise ValueError(f"inputs must be real numbers, got dtype {arr.dtype}")
    if dtype is None:
        dtype = arr.dtype if floating else "float64"
    f = get_format(dtype)
    x = arr.astype(f.dtype).reshape(-1)
    got = np.asarray(fn(x))
    if got.size != x.size:
        raise ValueError(f"fn returned {got.size} values for {x.size} inputs")
    got = got.reshape(-1)
    if isinstance(exact_fn, str):
        want = exact_round(name, x, f)
    else:
        want = _ziv(exact_fn, x, f)
    got_w = got.astype(np.longdouble if f.dtype == np.longdouble else np.float64)
    want_w = want.astype(got_w.dtype)
    both_nan = np.isnan(got_w) & np.isnan(want_w)
    correct = both_nan | ((got_w == want_w) & (np.signbit(got_w) == np.signbit(want_w)))
    errs = _ulp_errors(exact_fn, x, got_w, want_w, f, correct)
    worst = int(np.argmax(errs)) if errs.size and not correct.all() else None
    if worst is not None and errs[worst] == 0:  # e.g. only a wrong-signed zero
        worst = int(np.flatnonzero(~correct)[0])
    n = int(x.size)
    return FidelityReport(
        function=name,
        format=f.name,
        n=n,
        n_correct=int(np.count_nonzero(correct)),
        fraction_correct=float(np.count_nonzero(correct) / n) if n else float("nan"),
        max_ulp_error=float(errs.max()) if errs.size else 0.0,
        worst_input=None if worst is None else float(x[worst]),
    )


def _exact_value(exact_fn, v, prec: int):
    ctx = exact.context(prec)
    t = exact.to_exact(v, prec=prec)
    if isinstance(exact_fn, str):
        return getattr(ctx, exact_fn)(t)
    y = exact_fn(ctx, t)
    if not isinstance(y, numbers.Real) and not hasattr(y, "_mpf_"):
        raise TypeError(f"exact_fn must return a real mpf, got {type(y).__name__}")
    return ctx.mpf(y)


def _ziv(exact_fn, x, f: Format) -> np.ndarray:
    """Correctly rounded values of a callable exact function (finite inputs)."""
    out = np.full(x.size, np.nan, dtype=f.dtype)
    for i, v in enumerate(x):
        if not np.isfinite(v):
            continue
        prec = f.precision + 40
        while True:
            y = _exact_value(exact_fn, v, prec)
            wide = exact.context(2 * prec + 8)
            tol = wide.mpf(2) ** (3 - prec)
            ends = exact.round_exact(
                np.array([wide.mpf(y) * (1 - tol), wide.mpf(y) * (1 + tol)], dtype=object), f
            )
            if ends[0] == ends[1] or prec > 1 << 14:
                out[i] = ends[0]
                break
            prec *= 2
    return out


def _ulp_errors(exact_fn, x, got, want, f: Format, correct) -> np.ndarray:
    """``|got - exact| / ulp(exact)`` per input: measured with mpmath wherever both the result
    and the correctly rounded value are finite; 0 for a correct non-finite result; inf for a
    finite / non-finite (or NaN) disagreement."""
    errs = np.zeros(x.size)
    prec = f.precision + 64
    ctx = exact.context(prec)
    finite = np.isfinite(got) & np.isfinite(want)
    errs[~finite & ~correct] = np.inf
    for i in np.flatnonzero(finite):
        y = _exact_value(exact_fn, x[i], prec)
        if y == 0:
            errs[i] = 0.0 if got[i] == 0 else np.inf  # an exact zero is representable
            continue
        e = int(ctx.floor(ctx.log(abs(y), 2)))
        ulp = ctx.mpf(2) ** (max(e, f.emin) - f.precision + 1)
        errs[i] = float(abs(exact.to_exact(got[i], prec=prec) - y) / ulp)
    return errs
