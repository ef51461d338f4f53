"""Is a function correctly rounded on these inputs? (audits users can call)

:func:`rounding_fidelity` runs a function on inputs of one format and compares every result
with the correctly rounded value of the exact function: exact rational arithmetic for
``add``/``sub``/``mul``/``div``, mpmath with a Ziv loop for ``exp``/``log``/``log1p``/
``expm1``, ``softmax`` and callables (the exact value is evaluated at growing precision until
its rounding to the format is certain). It reports the fraction of results that are correctly
rounded and the worst error in ulps of the format.

:func:`op_fidelity` does the same for the operations a training step recorded
(:func:`numstab.losses.rounding.recording`): every elementwise result of the engine's losses,
judged against the exact operation on its own rounded operands.

Example: NumPy's float32 ``exp`` on a grid near 0::

    >>> import numpy as np
    >>> r = rounding_fidelity(np.exp, np.linspace(-1e-6, 0, 200, dtype=np.float32), "exp")
    >>> r.n, 0.0 <= r.fraction_correct <= 1.0
    (200, True)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from numstab import exact
from numstab.backend import to_numpy
from numstab.elementary import FUNCTIONS, exact_round
from numstab.losses.rounding import Op
from numstab.precision import Format, get_format

__all__ = ["BASIC_OPERATIONS", "FidelityReport", "op_fidelity", "rounding_fidelity"]

#: Exact operations judged with rational arithmetic: name -> (arity, exact value on Fractions).
BASIC_OPERATIONS = {
    "add": (2, lambda a, b: a + b),
    "sub": (2, lambda a, b: a - b),
    "mul": (2, lambda a, b: a * b),
    "div": (2, lambda a, b: a / b),
    # the one-rounding target entry of the losses' backward: dl * (p - 1), operands (p, dl)
    "dl_p_minus_one": (2, lambda p, dl: dl * (p - 1)),
    # the losses' fused p·dl - c (label smoothing's backward), operands (p, dl, c)
    "mul_sub": (3, lambda p, dl, c: p * dl - c),
}
#: Functions of a whole row (last axis), judged element by element.
ROW_FUNCTIONS = ("softmax",)


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
    worst_input : float, tuple of floats or None
        An input (a tuple of operands for a function of several) with the largest error
        (None when every result is correct).
    """

    function: str
    format: str
    n: int
    n_correct: int
    fraction_correct: float
    max_ulp_error: float
    worst_input: float | tuple | None


def rounding_fidelity(fn: Callable, inputs, exact_fn="exp", *, dtype=None) -> FidelityReport:
    """Measure how often ``fn`` is correctly rounded on ``inputs``.

    Parameters
    ----------
    fn : callable
        ``fn(x) -> array`` elementwise (``fn(*xs)`` for a tuple of operands; ``fn(z)`` row-wise
        for ``"softmax"``), given NumPy arrays of the format's dtype (e.g. ``numpy.exp``,
        ``numstab.elementary.exp``, a wrapper around a framework's function). Its results are
        judged by value: they must equal the correctly rounded value in ``dtype`` (a wider
        result that is not representable in it is not correct).
    inputs : array_like of real numbers, or a tuple of them
        Converted to ``dtype`` (rounded to nearest if not representable). A tuple gives the
        operands of a function of several arguments (broadcast together). For ``"softmax"``
        a 2-D array ``(N, C)``: each row is one input.
    exact_fn : str or callable
        ``"exp"``, ``"log"``, ``"log1p"``, ``"expm1"``; ``"add"``, ``"sub"``, ``"mul"``,
        ``"div"`` (two operands, exact rational arithmetic); ``"softmax"`` (``exp(z_k) / Σ_j
        exp(z_j)`` of each row); or ``g(ctx, *xs) -> mpf`` evaluated in the mpmath context
        ``ctx`` (whose precision the Ziv loop raises; e.g. ``lambda ctx, x: ctx.tanh(x)``).
        Callables are evaluated on finite inputs only (results of non-finite inputs are
        expected NaN), and must not have exact results at rounding midpoints (the Ziv loop
        cannot settle those; the named functions handle them).
    dtype : str, numpy dtype or Format, optional
        The format (float16, bfloat16, float32, float64, longdouble); default: the inputs'.

    Returns
    -------
    FidelityReport

    Raises
    ------
    ValueError
        Unknown function name or format, inputs that are not real numbers, the wrong number
        of operands, or a result array of another size.
    TypeError
        ``fn`` or a callable ``exact_fn`` not callable.

    Examples
    --------
    >>> import numpy as np
    >>> def softmax(z):
    ...     e = np.exp(z - z.max(axis=1, keepdims=True))
    ...     return e / e.sum(axis=1, keepdims=True)
    >>> z = np.float32([[0.0, -16.0, -17.5], [1.0, 2.0, 3.0]])
    >>> rounding_fidelity(softmax, z, "softmax").n
    6
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    name = _function_name(exact_fn)
    operands = inputs if isinstance(inputs, tuple) else (inputs,)
    arity = BASIC_OPERATIONS[name][0] if name in BASIC_OPERATIONS else None
    if arity is not None and len(operands) != arity:
        raise ValueError(f"{name} takes {arity} operands, got {len(operands)}")
    if arity is None and isinstance(exact_fn, str) and len(operands) != 1:
        raise ValueError(f"{name} takes one operand, got {len(operands)}")
    arrs = [np.asarray(v) for v in operands]
    for arr in arrs:
        if not (_floating(arr) or arr.dtype.kind in "iu"):
            raise ValueError(f"inputs must be real numbers, got dtype {arr.dtype}")
    if dtype is None:
        dtype = next((a.dtype for a in arrs if _floating(a)), "float64")
    f = get_format(dtype)
    xs = [a.astype(f.dtype) for a in np.broadcast_arrays(*arrs)]
    if name in ROW_FUNCTIONS and xs[0].ndim != 2:
        raise ValueError(f"{name} judges rows: inputs must be 2-D (N, C), got {xs[0].shape}")
    got = np.asarray(fn(*xs))
    if got.size != xs[0].size:
        raise ValueError(f"fn returned {got.size} values for {xs[0].size} inputs")
    return _judge(exact_fn, name, xs, got.reshape(xs[0].shape), f)


def op_fidelity(ops: Sequence[Op], *, samples: int | None = 256, seed: int = 0) -> dict:
    """Judge recorded engine operations against the exact operation on their own operands.

    Parameters
    ----------
    ops : sequence of :class:`~numstab.losses.rounding.Op`
        From ``with numstab.losses.rounding.recording() as ops: ...`` around any engine code
        (a loss forward/backward, a training step).
    samples : int or None
        Elements judged per recorded operation, drawn without replacement (``None``: all;
        mpmath costs tens of µs per element).
    seed : int
        Seed of the draw.

    Returns
    -------
    dict[str, FidelityReport]
        One report per operation name (``exp``, ``sub``, ``dl_p_minus_one``, ...) over all its
        recorded calls; ``worst_input`` holds the operands of a worst element.

    Examples
    --------
    >>> import numpy as np
    >>> from numstab.functional import loss_backward, loss_forward
    >>> from numstab.losses.rounding import recording
    >>> z = np.float32([[0.0, -16.0, -17.5], [3.0, 2.5, -1.0]])
    >>> with recording() as ops:
    ...     loss, cache = loss_forward(z, np.array([0, 1]), fmt="float32")
    ...     g = loss_backward(cache, 0.5)
    >>> all(r.n_correct == r.n for r in op_fidelity(ops).values())
    True
    """
    if samples is not None and (isinstance(samples, bool) or int(samples) < 1):
        raise ValueError(f"samples must be an integer >= 1 or None, got {samples!r}")
    rng = np.random.default_rng(seed)
    groups: dict[str, list] = {}
    for op in ops:
        if not isinstance(op, Op):
            raise TypeError(f"ops must hold recorded Op objects, got {type(op).__name__}")
        res = np.asarray(to_numpy(op.result))  # CuPy / array-API results come to the host
        xs = [
            np.broadcast_to(np.asarray(v if isinstance(v, float) else to_numpy(v), res.dtype),
                            res.shape)
            for v in op.operands
        ]  # fmt: skip
        idx = np.arange(res.size)
        if samples is not None and res.size > samples:
            idx = rng.choice(res.size, size=int(samples), replace=False)
        flat = [np.ascontiguousarray(x).reshape(-1)[idx] for x in xs]
        groups.setdefault((op.name, op.fmt), []).append((flat, res.reshape(-1)[idx]))
    reports = {}
    for (name, f), parts in groups.items():
        columns = zip(*(p[0] for p in parts), strict=True)
        xs = [np.concatenate(cols).astype(f.dtype) for cols in columns]
        got = np.concatenate([p[1] for p in parts])
        key = name if name not in reports else f"{name} ({f.name})"
        reports[key] = _judge(name, name, xs, got, f)
    return reports


# --- judging ------------------------------------------------------------------------------


def _floating(arr) -> bool:
    return arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16"


def _function_name(exact_fn) -> str:
    if isinstance(exact_fn, str):
        known = (*FUNCTIONS, *BASIC_OPERATIONS, *ROW_FUNCTIONS)
        if exact_fn not in known:
            raise ValueError(f"unknown exact function {exact_fn!r}; valid: {', '.join(known)}")
        return exact_fn
    if callable(exact_fn):
        return getattr(exact_fn, "__name__", "callable")
    raise TypeError(f"exact_fn must be a function name or callable, got {exact_fn!r}")


def _judge(exact_fn, name: str, xs: list, got, f: Format) -> FidelityReport:
    """Compare ``got`` (shape of ``xs[0]``) with the correctly rounded exact values."""
    wide = np.longdouble if f.dtype == np.longdouble else np.float64
    if name in BASIC_OPERATIONS:
        want, errs_of = _basic(name, xs, f)
    elif name in ROW_FUNCTIONS:
        want, errs_of = _rows(xs[0], f)
    elif isinstance(exact_fn, str):
        want, errs_of = exact_round(name, xs[0], f), _ulps_by_mpmath(name, xs, f)
    else:
        want, errs_of = _ziv(exact_fn, xs, f), _ulps_by_mpmath(exact_fn, xs, f)
    got_w = np.asarray(got).astype(wide).reshape(-1)
    want_w = np.asarray(want).astype(wide).reshape(-1)
    both_nan = np.isnan(got_w) & np.isnan(want_w)
    correct = both_nan | ((got_w == want_w) & (np.signbit(got_w) == np.signbit(want_w)))
    errs = np.zeros(got_w.size)
    finite = np.isfinite(got_w) & np.isfinite(want_w)
    errs[~finite & ~correct] = np.inf
    for i in np.flatnonzero(finite & ~correct):
        errs[i] = errs_of(i, got_w[i])
    worst = int(np.argmax(errs)) if errs.size and not correct.all() else None
    if worst is not None and errs[worst] == 0:  # e.g. only a wrong-signed zero
        worst = int(np.flatnonzero(~correct)[0])
    n = int(got_w.size)
    flat = [x.reshape(-1) for x in xs]
    if worst is None or name in ROW_FUNCTIONS:
        where = None if worst is None else float(flat[0][worst])
    else:
        where = tuple(float(x[worst]) for x in flat) if len(flat) > 1 else float(flat[0][worst])
    return FidelityReport(
        function=name,
        format=f.name,
        n=n,
        n_correct=int(np.count_nonzero(correct)),
        fraction_correct=float(np.count_nonzero(correct) / n) if n else float("nan"),
        max_ulp_error=float(errs.max()) if errs.size else 0.0,
        worst_input=where,
    )


def _fraction(v) -> Fraction:
    """The exact value of a finite float of any of the formats."""
    sign, man, e, _ = exact.to_exact(v)._mpf_
    return (-1) ** sign * Fraction(int(man)) * Fraction(2) ** int(e)


def _ulp(y: Fraction, f: Format) -> Fraction:
    """The format's spacing at ``|y| > 0`` (the subnormal quantum below the normal range)."""
    a = abs(y)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    e -= Fraction(2) ** e > a  # floor(log2 |y|)
    return Fraction(2) ** (max(e, f.emin) - f.precision + 1)


def _basic(name: str, xs: list, f: Format):
    """Exact rational results: the rounded value, and the ulp error of a result."""
    op = BASIC_OPERATIONS[name][1]
    flat = [x.reshape(-1) for x in xs]
    n = flat[0].size
    want = np.empty(n, dtype=f.dtype)
    exact_of: dict[int, Fraction] = {}
    wide = np.longdouble if f.dtype == np.longdouble else np.float64
    for i in range(n):
        vals = [x[i] for x in flat]
        if all(np.isfinite(v) for v in vals) and not (name == "div" and vals[1] == 0):
            y = op(*[_fraction(v) for v in vals])
            if y != 0:
                exact_of[i] = y
                want[i] = exact.round_exact(y, f)
                continue
        # Special values and exact zeros: IEEE's result in a wider format is exact (its sign
        # rules decide the zero's sign; mpf and Fraction have no signed zero).
        with np.errstate(all="ignore"):  # the same formula, on wide IEEE scalars
            w = op(*[np.asarray(v).astype(wide)[()] for v in vals])
        want[i] = w  # a signed zero, an infinity or NaN: exact in every format

    def errs_of(i: int, g) -> float:
        y = exact_of.get(i)
        if y is None:
            return 0.0 if g == want[i] else np.inf
        return float(abs(_fraction(g) - y) / _ulp(y, f))

    return want, errs_of


def _ulps_by_mpmath(exact_fn, xs: list, f: Format):
    """The ulp error of a result of a one-operand function (or callable), by mpmath."""
    prec = f.precision + 64
    flat = [x.reshape(-1) for x in xs]

    def errs_of(i: int, g) -> float:
        return _ulps_from(_exact_value(exact_fn, [x[i] for x in flat], prec), g, f, prec)

    return errs_of


def _ulps_from(y, g, f: Format, prec: int) -> float:
    """``|g - y| / ulp_f(y)`` for an mpf ``y`` evaluated at ``prec`` bits."""
    if y == 0:
        return 0.0 if g == 0 else np.inf  # an exact zero is representable
    ctx = exact.context(prec)
    e = int(ctx.floor(ctx.log(abs(y), 2)))
    ulp = ctx.mpf(2) ** (max(e, f.emin) - f.precision + 1)
    return float(abs(exact.to_exact(g, prec=prec) - y) / ulp)


def _exact_value(exact_fn, vs: list, prec: int):
    ctx = exact.context(prec)
    ts = [exact.to_exact(v, prec=prec) for v in vs]
    if isinstance(exact_fn, str):
        return getattr(ctx, exact_fn)(*ts)
    y = exact_fn(ctx, *ts)
    if not isinstance(y, numbers.Real) and not hasattr(y, "_mpf_"):
        raise TypeError(f"exact_fn must return a real mpf, got {type(y).__name__}")
    return ctx.mpf(y)


def _settle(evaluate, f: Format):
    """Ziv loop: ``evaluate(prec) -> list of mpf`` at growing precision until each value's
    rounding to ``f`` is certain; returns the rounded values."""
    prec = f.precision + 40
    while True:
        ys = evaluate(prec)
        wide = exact.context(2 * prec + 8)
        tol = wide.mpf(2) ** (3 - prec)
        lo = exact.round_exact(np.array([wide.mpf(y) * (1 - tol) for y in ys], dtype=object), f)
        hi = exact.round_exact(np.array([wide.mpf(y) * (1 + tol) for y in ys], dtype=object), f)
        if np.array_equal(lo, hi, equal_nan=True) or prec > 1 << 14:
            return lo
        prec *= 2


def _ziv(exact_fn, xs: list, f: Format) -> np.ndarray:
    """Correctly rounded values of a callable exact function (finite inputs; NaN elsewhere)."""
    flat = [x.reshape(-1) for x in xs]
    out = np.full(flat[0].size, np.nan, dtype=f.dtype)
    for i in range(out.size):
        vs = [x[i] for x in flat]
        if all(np.isfinite(v) for v in vs):
            out[i] = _settle(lambda prec, vs=vs: [_exact_value(exact_fn, vs, prec)], f)[0]
    return out


def _softmax_row(row, prec: int) -> list:
    ctx = exact.context(prec)
    t = [exact.to_exact(v, prec=prec) for v in row]
    m = max(t)
    e = [ctx.exp(v - m) for v in t]
    total = ctx.fsum(e)
    return [v / total for v in e]


def _rows(z, f: Format):
    """Correctly rounded softmax of each row; NaN expected for a row with a NaN or ``+inf``
    logit or with every logit ``-inf`` (a ``-inf`` logit otherwise has probability 0)."""
    want = np.full(z.shape, np.nan, dtype=f.dtype)
    for i, row in enumerate(z):
        if not (np.any(np.isnan(row)) or np.any(row == np.inf) or np.all(row == -np.inf)):
            want[i] = _settle(lambda prec, row=row: _softmax_row(row, prec), f)
    prec = f.precision + 64
    c = z.shape[1]

    def errs_of(i: int, g) -> float:
        return _ulps_from(_softmax_row(z[i // c], prec)[i % c], g, f, prec)

    return want.reshape(-1), errs_of
