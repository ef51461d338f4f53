"""Hypothesis strategies for testing softmax / cross-entropy code against :mod:`numstab.exact`.

The strategies generate logits that are hard on a loss implementation: rows whose exact
softmax tail lies right at the unit roundoff of a format (where Softmax Collapse is decided),
rows whose gap lies in the order-dependent window of :func:`numstab.audit.sc_gap_window`, ties,
huge gaps, tails in the subnormal range, one class, and non-finite rows. Every value is exactly
representable in the requested format (it is rounded with :func:`numstab.precision.quantize`
or built on the format's grid), and arrays come in the format's carrier dtype (float32 for
float16 and bfloat16, as everywhere in numstab) unless ``native=True`` asks for the format's
own dtype.

hypothesis is a test extra: ``pip install 'numstab[test]'``.

Example
-------
A test of your own loss against the exact reference (``my_cross_entropy`` is yours)::

    import numpy as np
    from hypothesis import given
    from numstab import exact
    from numstab.testing import logits_and_labels, logits_near_collapse

    @given(logits_and_labels(logits_near_collapse("float32", 113, n_rows=4)))
    def test_my_loss(zy):
        z, y = zy
        got = my_cross_entropy(z, y)                                     # float32
        want = exact.round_exact(exact.cross_entropy(z, y), "float32")  # correctly rounded
        np.testing.assert_allclose(got, want, rtol=2**-20, atol=2**-126)

Notes
-----
The *exact tail* of a row is ``s = Σ_{k≠k*} exp(z_k - max z)`` (``k*`` the first argmax;
:func:`numstab.exact.tail_sum`); for StableMax it is ``Σ_{k≠k*} s(z_k) / s(max z)``. The
correctly rounded normaliser ``1 + s`` is 1 exactly when ``s <= u = 2**-p``.

longdouble rows are drawn on the float64 grid (every float64 is an x87 longdouble), because
numstab rounds to longdouble only from float64.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import NamedTuple

try:
    from hypothesis import reject
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as _exc:  # pragma: no cover - exercised by a test that hides hypothesis
    raise ImportError(
        "numstab.testing needs hypothesis, which is a test extra: pip install 'numstab[test]' "
        f"(import failed: {_exc})"
    ) from _exc

import numpy as np

from numstab import exact
from numstab.audit import sc_gap_window
from numstab.checks import check_choice
from numstab.precision import available_formats, get_format, quantize, round_to

__all__ = [
    "VJPCheck",
    "adversarial_logits",
    "check_vjp",
    "formats",
    "labels_for",
    "logits",
    "logits_and_labels",
    "logits_huge_gap",
    "logits_in_gap_window",
    "logits_near_collapse",
    "logits_subnormal_tail",
    "logits_with_ties",
    "nonfinite_logits",
    "one_class_logits",
]

_SIDES = ("below", "above", "either")
_KINDS = ("softmax", "stablemax")
_TARGETS = ("any", "argmax", "mixed")
_PREC = 320  # bits for the exact bookkeeping of constructed rows (tails to ~1e-90 relative)



# --- helpers ------------------------------------------------------------------------------


def _count(value, name: str, minimum: int):
    """An int or an integer strategy, validated; returns a strategy."""
    if isinstance(value, st.SearchStrategy):
        return value.filter(lambda k: k >= minimum)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} or a strategy, got {value!r}")
    return st.just(int(value))



def _finite_max(fmt) -> float:
    """Largest finite value of the format's grid, as a float."""
    return float(np.finfo(np.float64).max) if fmt.name == "longdouble" else float(fmt.max)


def _q(x: float, fmt) -> float:
    """``x`` rounded to nearest (even) on the format's grid, as a float64 value."""
    if fmt.name in ("float64", "longdouble"):
        return float(x)
    return float(quantize(np.array([x], dtype=np.float64), fmt)[0])


def _step(v: float, fmt, up: bool) -> float:
    """The grid neighbour of the representable ``v`` above (``up``) or below it."""
    # the grid the rows are drawn on, all exactly float64: the format's own, float64 for longdouble
    g = np.float64 if fmt.name == "longdouble" else fmt.dtype.type
    return float(np.nextafter(g(v), g(np.inf if up else -np.inf)))


def _to_array(rows, fmt, native: bool):
    """float64 rows (all representable) -> carrier array (or the format's dtype)."""
    a = np.asarray(rows, dtype=np.float64)
    out = quantize(a, fmt)  # exact: a no-op on representable values, fixes the dtype
    return round_to(out, fmt) if native and fmt.is_emulated else out


def _rows_of(fmt, n_classes, n_rows, native, draw_row, *, min_classes: int = 2):
    """The skeleton of every logit strategy: validate, draw ``C`` and ``N``, draw the rows.

    ``draw_row(draw, C)`` returns one row of ``C`` float64 values, each representable in
    ``fmt``; the result is the ``(N, C)`` carrier array (or the format's dtype, ``native``).
    """
    f = get_format(fmt)
    cols = _count(n_classes, "n_classes", min_classes)
    rows = _count(n_rows, "n_rows", 0)

    @st.composite
    def build(draw):
        n, k = draw(cols), draw(rows)
        out = np.empty((k, n))
        for i in range(k):
            out[i] = draw_row(draw, n)
        return _to_array(out, f, native)

    return build()


def _with_max(draw, vals, m):
    """``vals`` with the maximum ``m`` inserted at a random position."""
    pos = draw(st.integers(0, len(vals)))
    return [*vals[:pos], m, *vals[pos:]]


def _float_in(draw, lo: float, hi: float) -> float:
    return draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))


class _SoftmaxTail:
    """Exact softmax tail terms ``exp(v - m)`` (mpmath at :data:`_PREC` bits)."""

    def __init__(self, m: float, fmt, eps: float = 0.0):
        self.ctx = ctx = exact.context(_PREC)
        self.m = ctx.mpf(m)
        self.u = ctx.ldexp(ctx.mpf(1), -fmt.precision)

    def exact(self, v: float):
        return self.ctx.mpf(v)

    def term(self, v: float):
        return self.ctx.exp(self.ctx.mpf(v) - self.m)

    def threshold(self, r):
        """The real ``t`` with ``term(v) <= r`` iff ``v <= t`` (None: no such ``v``)."""
        return self.m + self.ctx.log(r) if r > 0 else None

    def scale(self, r, factor: float):
        return r * self.ctx.mpf(factor)

    def zero(self):
        return self.ctx.mpf(0)


class _StableTail:
    """Exact StableMax tail terms ``s(v) / s(m)`` (Fractions: they are rational)."""

    def __init__(self, m: float, fmt, eps: float = 0.0):
        self.eps = Fraction(eps)
        self.m = Fraction(m)
        self.sm = self._s(self.m)
        self.u = Fraction(1, 2**fmt.precision)

    def _s(self, x: Fraction) -> Fraction:
        return x + 1 if x >= 0 else 1 / (1 - x + self.eps)

    def exact(self, v: float):
        return Fraction(v)

    def term(self, v: float):
        return self._s(Fraction(v)) / self.sm

    def threshold(self, r):
        big_r = r * self.sm
        if big_r <= 0:
            return None
        if big_r >= 1:
            return big_r - 1
        return min(1 + self.eps - 1 / big_r, Fraction(0))

    def scale(self, r, factor: float):
        return r * Fraction(factor)

    def zero(self):
        return Fraction(0)


def _largest_at_most(t, fmt, tail):
    """Largest grid value ``v`` with ``v <= t`` (``t`` exact), or None if out of range."""
    if t is None:
        return None
    try:
        x = float(t)
    except OverflowError:
        return None
    top = _finite_max(fmt)
    if not math.isfinite(x) or abs(x) > top:
        return None
    v = _q(x, fmt)
    while math.isfinite(v) and tail.exact(v) > t:
        v = _step(v, fmt, up=False)
    while True:
        w = _step(v, fmt, up=True)
        if not math.isfinite(w) or tail.exact(w) > t:
            break
        v = w
    if not math.isfinite(v) or abs(v) > top:
        return None
    return v


def _smallest_at_least(t, fmt, tail):
    """Smallest grid value ``v`` with ``v >= t``, or None if out of range."""
    v = _largest_at_most(t, fmt, tail)
    if v is None:
        return None
    if tail.exact(v) < t:
        v = _step(v, fmt, up=True)
    return v if math.isfinite(v) and abs(v) <= _finite_max(fmt) else None


def _shift(draw, fmt, max_shift: float) -> float:
    return _q(_float_in(draw, -max_shift, max_shift), fmt)


# --- formats and general logits -----------------------------------------------------------


def formats(*, include_longdouble: bool = True, include_emulated: bool = True):
    """Names of the floating-point formats usable on this platform.

    Parameters
    ----------
    include_longdouble : bool
        Include ``"longdouble"`` where NumPy's long double is x87 extended precision (it is
        absent elsewhere whatever this says).
    include_emulated : bool
        Include ``"float16"`` and ``"bfloat16"`` (carried in float32, rounded per operation).

    Returns
    -------
    SearchStrategy[str]

    Examples
    --------
    ::

        @given(formats(include_longdouble=False), st.data())
        def test_rounding(fmt, data):
            z = data.draw(logits(dtype=fmt))
            assert (quantize(z, fmt) == z).all()
    """
    names = [
        n
        for n in available_formats()
        if (include_longdouble or n != "longdouble")
        and (include_emulated or not get_format(n).is_emulated)
    ]
    if not names:
        raise ValueError("no format left: include_emulated=False and no native format selected")
    return st.sampled_from(names)


def logits(
    *,
    n_rows=st.integers(1, 8),  # noqa: B008 - strategies are immutable
    n_classes=st.integers(1, 16),  # noqa: B008
    dtype="float32",
    min_value: float | None = None,
    max_value: float | None = None,
    allow_nonfinite: bool = False,
    native: bool = False,
):
    """General logit arrays of shape ``(n_rows, n_classes)``, every value representable.

    Parameters
    ----------
    n_rows, n_classes : int or SearchStrategy[int]
        Shape (``n_rows >= 0``, ``n_classes >= 1``).
    dtype : str or Format
        The format the values are rounded to (``quantize``).
    min_value, max_value : float, optional
        Range before rounding (default: the format's finite range; the float64 range for
        longdouble).
    allow_nonfinite : bool
        Also draw NaN and ±inf.
    native : bool
        Return the format's own dtype (``numpy.float16``, ml_dtypes ``bfloat16``) instead of
        the float32 carrier numstab computes with.

    Returns
    -------
    SearchStrategy[numpy.ndarray]
        Shape ``(n_rows, n_classes)``, dtype ``carrier_dtype(dtype)`` (or the format's dtype).

    Examples
    --------
    ::

        @given(logits(n_classes=st.integers(2, 20), dtype="bfloat16"))
        def test_softmax_sums_to_one(z):
            p = my_softmax(z)
            np.testing.assert_allclose(p.sum(axis=1), 1, rtol=2**-6)
    """
    fmt = get_format(dtype)
    top = _finite_max(fmt)
    lo = -top if min_value is None else float(min_value)
    hi = top if max_value is None else float(max_value)
    if not lo <= hi:
        raise ValueError(f"min_value {lo!r} must not exceed max_value {hi!r}")
    elements = st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=64)
    if allow_nonfinite:
        elements = st.one_of(elements, st.sampled_from([np.nan, np.inf, -np.inf]))

    def draw_row(draw, n):
        return draw(hnp.arrays(np.float64, (n,), elements=elements))

    return _rows_of(fmt, n_classes, n_rows, native, draw_row, min_classes=1)


# --- rows at the collapse boundary --------------------------------------------------------


def logits_near_collapse(
    fmt,
    n_classes,
    *,
    n_rows=1,
    rel_band: float = 0.25,
    side: str = "either",
    kind: str = "softmax",
    eps: float = 0.0,
    max_shift: float = 8.0,
    native: bool = False,
):
    """Rows whose exact tail lies within ``rel_band`` (relative) of the unit roundoff.

    With ``u = 2**-p`` of ``fmt`` and ``s`` the exact tail of a row (softmax:
    ``Σ_{k≠k*} exp(z_k - max z)``; StableMax: ``Σ_{k≠k*} s(z_k) / s(max z)`` with the given
    ``eps``), every row satisfies

    - ``side="below"``: ``u (1 - rel_band) <= s < u`` (the exact verdict is "collapsed"),
    - ``side="above"``: ``u < s <= u (1 + rel_band)`` (not collapsed),
    - ``side="either"``: one of the two, drawn per row.

    For a uniform row this is a gap near the upper end of
    :func:`numstab.audit.sc_gap_window`. A row is built from a random number of negligible
    "filler" terms, a random "bulk" of terms adding up to a random fraction of ``u``, and a
    greedy refinement: each further class takes the largest representable logit whose term
    still fits under ``u`` (decided in exact arithmetic: mpmath at 320 bits for softmax,
    Fractions for StableMax), until the tail is within the band; for ``side="above"`` one last
    class steps just over ``u``. The maximum is shifted by up to ``max_shift`` and placed at a
    random position.

    Parameters
    ----------
    fmt : str or Format
    n_classes : int or SearchStrategy[int], >= 2
    n_rows : int or SearchStrategy[int]
    rel_band : float in (0, 1)
        Down to about ``1e-20``. Each greedy class gains roughly ``p`` bits in float32/float64
        but only 3-5 in the 16-bit formats (their logit grid is coarse), so a band of
        ``2**-53`` needs about 20 classes in bfloat16; up to 30 classes are kept for the
        refinement. A row that cannot be completed with the classes at hand is rejected
        (``hypothesis.reject``).
    side : {"below", "above", "either"}
    kind : {"softmax", "stablemax"}
        Which tail is placed at ``u``. StableMax terms cannot be smaller than
        ``s(lowest) / s(max z)``, about ``1.5e-5 / s(max z)`` in float16, and its float16 grid
        near ``1 - 2**11`` is coarse: float16 StableMax rows need few classes (2-3) and bands
        of about ``1e-3`` or more, else they are rejected.
    eps : float
        StableMax denominator epsilon of the exact tail (ignored for softmax).
    max_shift : float
        The row maximum is drawn from ``[-max_shift, max_shift]``.
    native : bool
        Return the format's own dtype instead of the carrier.

    Returns
    -------
    SearchStrategy[numpy.ndarray], shape ``(n_rows, n_classes)``
        One maximum per row (no ties at the top), placed at a random position.

    Examples
    --------
    ::

        @given(logits_near_collapse("float16", 113, side="below", n_rows=3))
        def test_collapse_verdict(z):
            s = exact.tail_sum(z)                        # every s <= 2**-11
            assert all(v <= 2.0**-11 for v in s)
    """
    f = get_format(fmt)
    check_choice(side, _SIDES, "side")
    check_choice(kind, _KINDS, "kind")
    if not (isinstance(rel_band, (int, float)) and 0 < rel_band < 1):
        raise ValueError(f"rel_band must lie in (0, 1), got {rel_band!r}")
    if not (math.isfinite(max_shift) and max_shift >= 0):
        raise ValueError(f"max_shift must be finite and >= 0, got {max_shift!r}")
    tail_cls = _SoftmaxTail if kind == "softmax" else _StableTail
    band = float(rel_band)

    def draw_row(draw, n):
        m = _shift(draw, f, max_shift)
        tail = tail_cls(m, f, eps)
        u = tail.u
        below = draw(st.booleans()) if side == "either" else side == "below"
        b = tail.scale(u, band)  # absolute band
        n_tail = n - 1
        # Slots: small "filler" terms first, then a random bulk, then greedy refinement.
        reserve = min(n_tail, 30)
        k_bulk = draw(st.integers(0, n_tail - reserve))
        n_fill = n_tail - reserve - k_bulk
        vals, total = [], tail.zero()

        def add(v):
            nonlocal total
            vals.append(v)
            total += tail.term(v)

        for _ in range(n_fill):
            # Far below u; StableMax terms have a floor (the format's lowest value).
            w = _float_in(draw, 0.0, 30.0)
            t = tail.threshold(tail.scale(u, 2.0**-40 / n_tail * math.exp(-w)))
            v = _largest_at_most(t, f, tail)
            add(-_finite_max(f) if v is None else v)
        if total >= u / 2:
            reject()  # StableMax in a narrow format: too many classes to fit under u
        frac = _float_in(draw, 0.05, 0.9)
        for _ in range(k_bulk):
            w = _float_in(draw, 0.0, 8.0)
            r = tail.scale(u - total, frac / k_bulk * math.exp(-w))
            v = _largest_at_most(tail.threshold(r), f, tail)
            add(-_finite_max(f) if v is None else v)
        if total >= u:
            reject()
        # Greedy: the largest representable term that still fits under u, until close enough.
        theta = _float_in(draw, 2.0**-10, 1.0)
        tol = tail.scale(b, theta)
        last = n_tail if below else n_tail - 1  # "above" keeps a class for the step over u
        while len(vals) < last and u - total > tol:
            v = _largest_at_most(tail.threshold(u - total), f, tail)
            if v is not None and total + tail.term(v) >= u:  # StableMax can hit u exactly
                v = _step(v, f, up=False)
            if v is None:
                break
            add(v)
        if total >= u:
            reject()
        # Classes left over: terms far below what is left to u (or to u + band, above).
        n_left = last - len(vals)
        slack = u - total
        for _ in range(n_left):
            w = _float_in(draw, 0.0, 30.0)
            r = tail.scale(slack, 0.5 / n_left * math.exp(-w))
            v = _largest_at_most(tail.threshold(r), f, tail)
            add(-_finite_max(f) if v is None else v)  # StableMax's floor; checked below
        if total >= u:
            reject()
        if not below:
            v = _smallest_at_least(tail.threshold(u - total), f, tail)
            if v is None:
                reject()
            if total + tail.term(v) == u:  # possible for StableMax: step over u
                v = _step(v, f, up=True)
            add(v)
        ok = (u - b <= total < u) if below else (u < total <= u + b)
        if not ok or any(v >= m for v in vals):
            reject()
        return _with_max(draw, draw(st.permutations(vals)), m)

    return _rows_of(f, n_classes, n_rows, native, draw_row)


def logits_in_gap_window(
    fmt, n_classes, *, n_rows=1, jitter: float = 0.5, max_shift=8.0, native: bool = False
):
    """Rows whose gaps lie in (or just around) the order-dependent window of
    :func:`numstab.audit.sc_gap_window`.

    Each row has its maximum ``m`` and the other logits at ``m - g - j_k``, with ``g`` drawn
    from the window widened by 10 % of its width on each side and ``j_k`` from
    ``[0, jitter]`` (``jitter = 0``: uniform-gap rows). In this window whether a row collapses
    depends on the summation order, so these rows separate the orders of
    :mod:`numstab.summation`.

    Parameters
    ----------
    fmt : str or Format
    n_classes : int or SearchStrategy[int], >= 2
    n_rows : int or SearchStrategy[int]
    jitter : float >= 0
    max_shift : float
    native : bool

    Returns
    -------
    SearchStrategy[numpy.ndarray], shape ``(n_rows, n_classes)``

    Examples
    --------
    ::

        @given(logits_in_gap_window("float32", 113, n_rows=8))
        def test_my_collapse_detector(z):
            assert (my_detector(z) == collapse_mask(z, "float32", order="pairwise")).all()
    """
    f = get_format(fmt)
    if not (math.isfinite(jitter) and jitter >= 0):
        raise ValueError(f"jitter must be finite and >= 0, got {jitter!r}")
    window = functools.lru_cache(maxsize=None)(lambda n: sc_gap_window(f.name, n))

    def draw_row(draw, n):
        lo, hi = window(n)
        pad = 0.1 * (hi - lo) + 1e-3
        m = _shift(draw, f, max_shift)
        g = _float_in(draw, lo - pad, hi + pad)
        j = draw(st.lists(st.floats(0.0, jitter), min_size=n, max_size=n))
        r = np.array([_q(m - g - jj, f) for jj in j])
        r[draw(st.integers(0, n - 1))] = m
        return r

    return _rows_of(f, n_classes, n_rows, native, draw_row)


# --- other adversarial rows ---------------------------------------------------------------


def logits_with_ties(fmt, n_classes, *, n_rows=1, max_abs: float = 100.0, native: bool = False):
    """Rows whose maximum occurs at least twice, other entries drawn from a few tied values.

    The tail of such a row is at least 1 (each extra copy of the maximum contributes
    ``exp(0) = 1``), so it never collapses; ``argmax`` conventions (first maximum) and the
    label of a tied maximum are what these rows test.

    Parameters
    ----------
    fmt : str or Format
    n_classes : int or SearchStrategy[int], >= 2
    n_rows : int or SearchStrategy[int]
    max_abs : float
        Values are drawn from ``[-max_abs, max_abs]`` before rounding.
    native : bool

    Returns
    -------
    SearchStrategy[numpy.ndarray], shape ``(n_rows, n_classes)``
    """
    f = get_format(fmt)
    val = st.floats(-max_abs, max_abs, allow_nan=False).map(lambda x: _q(x, f))

    def draw_row(draw, n):
        pool = draw(st.lists(val, min_size=1, max_size=3, unique=True))
        m = max(pool)
        n_top = draw(st.integers(2, n))
        rest = draw(st.lists(st.sampled_from(pool), min_size=n - n_top, max_size=n - n_top))
        return draw(st.permutations([m] * n_top + rest))

    return _rows_of(f, n_classes, n_rows, native, draw_row)


def logits_huge_gap(
    fmt,
    n_classes,
    *,
    n_rows=1,
    min_gap: float = 1e4,
    max_gap=None,
    max_shift: float = 100.0,
    native: bool = False,
):
    """Rows whose maximum exceeds every other logit by at least ``min_gap``.

    Every other term ``exp(z_k - max)`` is far below the smallest subnormal of any format for
    the default gap, so the computed tail is exactly 0 while the exact one is not.

    Parameters
    ----------
    fmt : str or Format
    n_classes : int or SearchStrategy[int], >= 2
    n_rows : int or SearchStrategy[int]
    min_gap : float > 0
        Smallest gap (after rounding to the format).
    max_gap : float, optional
        Largest gap drawn (default ``4 * min_gap``, capped by the format's range).
    max_shift : float
        The maximum is drawn from ``[-max_shift, max_shift]`` (at most ``min_gap``).
    native : bool

    Returns
    -------
    SearchStrategy[numpy.ndarray], shape ``(n_rows, n_classes)``
    """
    f = get_format(fmt)
    top = _finite_max(f)
    if not (0 < min_gap and min_gap + max_shift < top):
        raise ValueError(
            f"min_gap must be > 0 and min_gap + max_shift below {f.name}'s largest value "
            f"{top:g}, got min_gap={min_gap!r}, max_shift={max_shift!r}"
        )
    if max_shift > min_gap:
        raise ValueError(f"max_shift {max_shift!r} must not exceed min_gap {min_gap!r}")
    hi_gap = min(4 * min_gap if max_gap is None else float(max_gap), top - max_shift)
    if hi_gap < min_gap:
        raise ValueError(f"max_gap {max_gap!r} is below min_gap {min_gap!r}")
    # Rounding z = m - g moves it by at most 2**-p |z| <= 2**-p (|m| + g) <= 2**(1-p) g, so
    # drawing g >= min_gap (1 + 2**(2-p)) keeps the rounded gap >= min_gap.
    lo_gap = min_gap * (1 + 2.0 ** (2 - min(f.precision, 53)))  # longdouble: float64 grid

    gap = st.floats(lo_gap, max(lo_gap, hi_gap))

    def draw_row(draw, n):
        m = _shift(draw, f, max_shift)
        gaps = draw(st.lists(gap, min_size=n - 1, max_size=n - 1))
        return _with_max(draw, [_q(m - g, f) for g in gaps], m)

    return _rows_of(f, n_classes, n_rows, native, draw_row)


def logits_subnormal_tail(
    fmt, n_classes, *, n_rows=1, max_shift: float = 8.0, native: bool = False
):
    """Rows whose every tail term ``exp(z_k - max z)`` lies in the format's subnormal range.

    For ``k`` other than the (unique) maximum, the exact ``exp(z_k - max z)`` lies in
    ``[smallest_subnormal, tiny - smallest_subnormal]`` of ``fmt``, so its correctly rounded
    value is a non-zero subnormal: the regime where a float32 -> float16 cast is slow and where
    the wrong-class gradients of a collapsed row live.

    Parameters
    ----------
    fmt : str or Format
    n_classes : int or SearchStrategy[int], >= 2
    n_rows : int or SearchStrategy[int]
    max_shift : float
    native : bool

    Returns
    -------
    SearchStrategy[numpy.ndarray], shape ``(n_rows, n_classes)``
    """
    f = get_format(fmt)
    ctx = exact.context(_PREC)
    lo_term = ctx.ldexp(ctx.mpf(1), f.emin - f.precision + 1)
    hi_term = ctx.ldexp(ctx.mpf(1), f.emin) - lo_term
    lo_d, hi_d = float(ctx.log(lo_term)), float(ctx.log(hi_term))

    def draw_row(draw, n):
        m = _shift(draw, f, max_shift)
        mm = ctx.mpf(m)
        vals = []
        for _ in range(n - 1):
            v = _q(m + _float_in(draw, lo_d, hi_d), f)
            # Rounding may step just outside: walk back inside on the grid.
            while ctx.exp(ctx.mpf(v) - mm) < lo_term:
                v = _step(v, f, up=True)
            while ctx.exp(ctx.mpf(v) - mm) > hi_term:
                v = _step(v, f, up=False)
            if not lo_term <= ctx.exp(ctx.mpf(v) - mm) <= hi_term:
                reject()  # the grid is too coarse here (only with a large shift)
            vals.append(v)
        return _with_max(draw, vals, m)

    return _rows_of(f, n_classes, n_rows, native, draw_row)


def one_class_logits(fmt, *, n_rows=st.integers(0, 8), native: bool = False):  # noqa: B008
    """Logits of shape ``(n_rows, 1)``: one class, so the loss is exactly 0 and the row is
    always collapsed (its tail is empty).

    Parameters
    ----------
    fmt : str or Format
    n_rows : int or SearchStrategy[int]
    native : bool

    Returns
    -------
    SearchStrategy[numpy.ndarray], shape ``(n_rows, 1)``
    """
    return logits(n_rows=n_rows, n_classes=1, dtype=fmt, native=native)


def nonfinite_logits(fmt, n_classes, *, n_rows=1, native: bool = False):
    """Rows each holding at least one NaN, ``+inf`` or ``-inf`` among finite logits.

    Parameters
    ----------
    fmt : str or Format
    n_classes : int or SearchStrategy[int], >= 1
    n_rows : int or SearchStrategy[int]
    native : bool

    Returns
    -------
    SearchStrategy[numpy.ndarray], shape ``(n_rows, n_classes)``
    """
    f = get_format(fmt)
    special = st.sampled_from([np.nan, np.inf, -np.inf])
    finite = st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False)

    def draw_row(draw, n):
        row = [_q(draw(finite), f) for _ in range(n)]
        for j in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True)):
            row[j] = draw(special)
        return row

    return _rows_of(f, n_classes, n_rows, native, draw_row, min_classes=1)


def adversarial_logits(fmt, n_classes, *, n_rows=1, native: bool = False):
    """One of the adversarial families above, drawn per example.

    Near-collapse rows (both sides, bands from 0.5 down to 1e-9), gap-window rows, ties, huge
    gaps, subnormal tails and non-finite rows, for ``n_classes >= 2``.

    Returns
    -------
    SearchStrategy[numpy.ndarray], shape ``(n_rows, n_classes)``
    """
    return st.one_of(
        logits_near_collapse(fmt, n_classes, n_rows=n_rows, native=native),
        logits_near_collapse(fmt, n_classes, n_rows=n_rows, rel_band=1e-9, native=native),
        logits_in_gap_window(fmt, n_classes, n_rows=n_rows, native=native),
        logits_with_ties(fmt, n_classes, n_rows=n_rows, native=native),
        logits_huge_gap(fmt, n_classes, n_rows=n_rows, native=native),
        logits_subnormal_tail(fmt, n_classes, n_rows=n_rows, native=native),
        nonfinite_logits(fmt, n_classes, n_rows=n_rows, native=native),
    )


# --- labels -------------------------------------------------------------------------------


def labels_for(logits, *, target: str = "mixed"):
    """Integer labels for a drawn logit array.

    Parameters
    ----------
    logits : ndarray, shape (N, C)
        A concrete array (draw it first, e.g. with ``data.draw``).
    target : {"any", "argmax", "mixed"}
        ``argmax``: each label is the row's first maximum (the collapsing case: the loss is the
        tail); ``any``: uniform over the classes; ``mixed``: one of the two per row.

    Returns
    -------
    SearchStrategy[numpy.ndarray of int64], shape (N,)

    Examples
    --------
    ::

        @given(st.data())
        def test_loss(data):
            z = data.draw(logits_near_collapse("float32", 10, n_rows=5))
            y = data.draw(labels_for(z, target="argmax"))
    """
    check_choice(target, _TARGETS, "target")
    z = np.asarray(logits)
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(f"logits must be 2-D with at least one class, got shape {z.shape}")
    n, c = z.shape
    first_max = np.argmax(z.astype(np.float64) if z.dtype != np.longdouble else z, axis=1)

    def one(i):
        top, anywhere = st.just(int(first_max[i])), st.integers(0, c - 1)
        return {"argmax": top, "any": anywhere, "mixed": st.one_of(top, anywhere)}[target]

    return st.tuples(*(one(i) for i in range(n))).map(lambda t: np.array(t, dtype=np.int64))


def logits_and_labels(logits_strategy=None, *, target: str = "mixed"):
    """``(logits, labels)`` pairs: a logit strategy followed by :func:`labels_for`.

    Parameters
    ----------
    logits_strategy : SearchStrategy[ndarray], optional
        Default: :func:`logits` with at least one class.
    target : {"any", "argmax", "mixed"}

    Returns
    -------
    SearchStrategy[tuple[ndarray, ndarray]]

    Examples
    --------
    ::

        @given(logits_and_labels(logits_subnormal_tail("float16", 8, n_rows=4)))
        def test_grad(zy):
            z, y = zy
            ...
    """
    check_choice(target, _TARGETS, "target")
    strat = logits() if logits_strategy is None else logits_strategy

    @st.composite
    def build(draw):
        z = draw(strat)
        return z, draw(labels_for(z, target=target))

    return build()


# --- gradient checks ----------------------------------------------------------------------


class VJPCheck(NamedTuple):
    """What :func:`check_vjp` compared: ``|fd - vjp| <= tol`` held, and ``tol`` was sharp."""

    fd: float  #: central difference of ``F(t) = <R, f(x + t v)>`` at 0
    vjp: float  #: ``<vjp(x, R), v>``
    tol: float  #: the derived bound on ``|fd - vjp|``
    scale: float  #: ``<|vjp(x, R)|, |v|>``, the size at which a wrong gradient shows


def _leaves(tree) -> dict:
    """An array, or a dict of arrays, as a dict of float64 arrays (key ``None`` for one)."""
    if isinstance(tree, dict):
        return {k: np.asarray(a, dtype=np.float64) for k, a in tree.items()}
    return {None: np.asarray(tree, dtype=np.float64)}


def _unleaves(leaves: dict, like):
    return leaves if isinstance(like, dict) else leaves[None]


def _fsum_dot(a, b) -> float:
    """``sum(a * b)``: each product rounded once (float64), the sum rounded once."""
    return math.fsum((np.asarray(a, np.float64) * np.asarray(b, np.float64)).ravel().tolist())


def _abs_dot(a, b) -> float:
    return _fsum_dot(np.abs(np.asarray(a, np.float64)), np.abs(np.asarray(b, np.float64)))


def _dyadic(rng, shape, bits: int) -> np.ndarray:
    """Standard normal draws rounded to multiples of ``2**-bits``."""
    return np.round(rng.standard_normal(shape) * 2.0**bits) / 2.0**bits


def _shifted(x, v, h, bits):
    """``x + h v`` and ``x - h v``, refused unless both are exact in float64."""
    q = 2.0**-bits
    if not (np.all(np.mod(x, q) == 0) and np.all(np.mod(v, q) == 0)):
        raise ValueError(
            f"check_vjp needs x and the direction on multiples of 2**-{bits} (so that x ± h v "
            f"is exact); round x first: np.round(x * 2**{bits}) / 2**{bits}"
        )
    if not np.all(np.abs(x) + h * np.abs(v) < 2.0 ** (53 - bits) * h):
        raise ValueError(f"x ± h v is not exact in float64 for h = {h!r}: use a larger h")
    return x + h * v, x - h * v


def _same_structure(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def check_vjp(
    f,
    vjp,
    x,
    *,
    direction=None,
    cotangent=None,
    rng=None,
    h=None,
    fmt="float64",
    rel_err=None,
    f_err=None,
    vjp_err=None,
    third=0.0,
    bits: int = 20,
    max_rel_tol=None,
    slack: float = 1.01,
) -> VJPCheck:
    """Check a hand-written vector-Jacobian product against central finite differences.

    The dot-product test of HIPS/autograd's ``check_grads`` with a tolerance derived from an
    error model instead of a fixed one: along a direction ``v``, with a cotangent ``R``,
    ``F(t) = <R, f(x + t v)>`` has ``F'(0) = <vjp(x, R), v>``. Both sides are evaluated in
    float64 and must agree within the bound of the Notes; the bound itself must be *sharp*
    (``tol <= max_rel_tol * scale``), so that a wrong gradient cannot hide inside it.

    Parameters
    ----------
    f : callable, ``f(x) -> array``
        The function (any output shape; its values are taken as float64).
    vjp : callable, ``vjp(x, R) -> like x``
        The gradient of ``<R, f(x)>`` with respect to ``x``.
    x : array or dict of arrays
        The point; entries must be multiples of ``2**-bits`` (so that ``x ± h v`` is exact).
    direction : like ``x``, optional
        ``v``; default standard normal draws rounded to multiples of ``2**-bits``. Pass one to
        stay where ``f`` is smooth (e.g. a fixed ReLU pattern on ``[x - h v, x + h v]``).
    cotangent : array shaped like ``f(x)``, optional
        ``R``; default drawn like ``direction``.
    rng : numpy.random.Generator, optional
        Draws ``v`` and ``R`` (default ``numpy.random.default_rng(0)``).
    h : float, optional
        Step, a power of two in ``(0, 1]``; default ``2**round(log2(u) / 3)``, ``u = 2**-p``
        of ``fmt`` (balances the truncation ``h**2`` against the rounding ``u / h``).
    fmt : str or Format
        The format ``f`` and ``vjp`` compute in; sets ``u`` of the default error model.
    rel_err : float, optional
        Default error model: each output of ``f`` and each entry of ``vjp`` is within
        ``rel_err * |value|`` of the exact one (default ``4u``: a few correctly rounded
        operations without cancellation). Sums that can cancel need ``f_err`` / ``vjp_err``.
    f_err : callable, ``f_err(p) -> array like f(p)``, optional
        Bound on the absolute error of each output of ``f`` at the point ``p`` (``x ± h v``).
    vjp_err : callable, ``vjp_err(R) -> like x``, optional
        Bound on the absolute error of each entry of ``vjp(x, R)``.
    third : float or callable ``third(v, R) -> float``
        Bound on ``|F'''(t)|`` for ``|t| <= h`` (0: ``f`` is at most quadratic along lines).
    bits : int
        Grid of ``x`` and of the drawn ``v`` and ``R``.
    max_rel_tol : float, optional
        Largest ``tol / scale`` accepted (default ``100 sqrt(u)``, about ``1e-6`` in float64).
    slack : float
        Factor on the first-order bound, for second-order terms (default 1.01).

    Returns
    -------
    VJPCheck
        ``(fd, vjp, tol, scale)`` with ``scale = <|vjp(x, R)|, |v|>``.

    Raises
    ------
    AssertionError
        ``|fd - vjp| > tol`` (the gradient is wrong), or ``tol > max_rel_tol * scale`` (the
        error model is too loose to tell), or ``vjp`` returned other shapes than ``x``'s.
    ValueError
        ``x ± h v`` would not be exact, or ``h`` is not a power of two.

    Notes
    -----
    With ``u64 = 2**-53``: ``F(p) = fsum(R * f(p))`` (each product rounded once, the sum
    once) is within ``e(p) = <|R|, f_err(p)> + u64 <|R|, |f(p)|> + u64 |F(p)|`` of its exact
    value. ``fd = (F(x + h v) - F(x - h v)) / (2h)`` (exact points; division by a power of
    two is exact) is within ``h**2 / 6 * third + (e(x + h v) + e(x - h v)) / (2h) + u64 |fd|``
    of ``F'(0)``. ``vjp = fsum(g * v)`` over all entries is within
    ``<vjp_err(R), |v|> + u64 <|g|, |v|> + u64 |vjp|`` of ``<exact g, v>``. ``tol`` is
    ``slack`` times the sum of the two bounds.

    Examples
    --------
    A linear map is free of truncation error, so a large step makes the check sharp:

    >>> import numpy as np
    >>> W = np.array([[1.0, -2.0], [0.5, 3.0], [-1.25, 0.75]])
    >>> x = np.array([[1.0, 2.0, -0.5]])
    >>> rep = check_vjp(lambda x: x @ W, lambda x, R: R @ W.T, x, h=0.25)
    >>> bool(abs(rep.fd - rep.vjp) <= rep.tol < 1e-12 * rep.scale)
    True
    >>> check_vjp(lambda x: x @ W, lambda x, R: 1.001 * (R @ W.T), x, h=0.25)
    Traceback (most recent call last):
    ...
    AssertionError: vjp disagrees with central differences: ...
    """
    u = 2.0 ** -get_format(fmt).precision
    u64 = 2.0**-53
    rng = np.random.default_rng(0) if rng is None else rng
    h = 2.0 ** round(math.log2(u) / 3) if h is None else float(h)
    if not (0 < h <= 1 and h == 2.0 ** round(math.log2(h))):
        raise ValueError(f"h must be a power of two in (0, 1], got {h!r}")
    rel = 4 * u if rel_err is None else float(rel_err)
    max_rel = 100 * math.sqrt(u) if max_rel_tol is None else float(max_rel_tol)
    xs = _leaves(x)
    if direction is None:
        vs = {k: _dyadic(rng, a.shape, bits) for k, a in xs.items()}
    else:
        vs = _leaves(direction)
        if not _same_structure(vs, xs):
            raise ValueError("direction must have the structure and shapes of x")
    plus, minus = {}, {}
    for k in xs:
        plus[k], minus[k] = _shifted(xs[k], vs[k], h, bits)
    if cotangent is None:
        R = _dyadic(rng, np.shape(f(x)), bits)
    else:
        R = np.asarray(cotangent, dtype=np.float64)

    def value_and_err(p):
        p = _unleaves(p, x)
        y = np.asarray(f(p), dtype=np.float64)
        value = _fsum_dot(R, y)
        err_y = rel * np.abs(y) if f_err is None else f_err(p)
        return value, _abs_dot(R, err_y) + u64 * _abs_dot(R, y) + u64 * abs(value)

    (Fp, ep), (Fm, em) = value_and_err(plus), value_and_err(minus)
    fd = (Fp - Fm) / (2 * h)
    g = _leaves(vjp(x, R))
    assert _same_structure(g, xs), "vjp(x, R) must have the structure and shapes of x"
    flat_g = np.concatenate([g[k].ravel() for k in xs])
    flat_v = np.concatenate([vs[k].ravel() for k in xs])
    analytic = _fsum_dot(flat_g, flat_v)
    scale = _abs_dot(flat_g, flat_v)
    if vjp_err is None:
        g_err = rel * np.abs(flat_g)
    else:
        errs = _leaves(vjp_err(R))
        g_err = np.concatenate([np.broadcast_to(errs[k], xs[k].shape).ravel() for k in xs])
    analytic_err = _abs_dot(g_err, flat_v) + u64 * scale + u64 * abs(analytic)
    trunc = h**2 / 6 * (third(_unleaves(vs, x), R) if callable(third) else float(third))
    tol = slack * (trunc + (ep + em) / (2 * h) + u64 * abs(fd) + analytic_err)
    assert abs(fd - analytic) <= tol, (
        f"vjp disagrees with central differences: <vjp, v> = {analytic!r}, fd = {fd!r}, "
        f"|difference| {abs(fd - analytic):.3e} > tol {tol:.3e}"
    )
    assert tol <= max_rel * scale, (
        f"tolerance {tol:.3e} is not sharp: above {max_rel:.1e} x scale {scale:.3e}; "
        "tighten f_err / vjp_err / third or change h"
    )
    return VJPCheck(fd, analytic, tol, scale)
