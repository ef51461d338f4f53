"""Hostile-input fuzzing of the public API (the "Reliability" issue).

Every public function of :mod:`numstab.audit`, :mod:`numstab.functional` and :mod:`numstab.data`
is driven with hostile inputs: empty arrays, one class, NaN, ±inf, subnormals, huge magnitudes
(1e38, 1e308), wrong dtypes (int, complex, object, bool, strings), non-contiguous views
(strided, Fortran-ordered / transposed, negative strides), read-only arrays, shape mismatches,
wrong ndim, Python lists and scalars. The contract checked for each input:

1. **A correct result**, checked against an independent reference: exact rational arithmetic
   (:class:`fractions.Fraction`), :mod:`numstab.exact` (mpmath), ``method="mpmath"`` for the
   audit, Python integers (integer-valued inputs make the linear and gather layers exact), a
   brute-force loop for the data generators, or an IEEE classification for non-finite input.
2. **Or a ValueError / TypeError whose message names the problem** (a regex on the message).
   Never another exception type: every call runs under warnings-as-errors and
   ``np.errstate(over/invalid/divide="raise")``, so an IndexError, AttributeError,
   FloatingPointError or RuntimeWarning escaping a function fails the test.
3. **No silent NaN** where a number is promised. Where NaN *is* the documented answer it is
   asserted as such: NaN / ``+inf`` logits give NaN losses and never collapse, the mean of no
   losses and ``sc_fraction`` of no rows are NaN, a zero or non-finite tensor has NaN cosine,
   ``relu_backward`` gives ``inf · 0 = NaN`` where an infinite gradient meets a dead unit.
4. **The caller's arrays are never modified**, and read-only, strided, Fortran-ordered and
   negative-stride inputs give the result of a C-contiguous copy bit for bit. The one
   documented exception: ``gemm`` (and so the linear layer) hands views to BLAS, which may
   pick another kernel for them (a strided row vector goes to gemv with its stride, a
   transposed operand to the transposed gemm) and so another accumulation order: every layout
   is within the GEMM error bound of the exact product, not bit for bit.

By design, and documented in ``docs/reliability.md``: the training hot path
(``loss_forward``, ``gather_forward``) checks index dtypes and shapes but does not scan index
*values*: an index >= the axis length raises ValueError, a negative one counts from the end as
in NumPy (pinned below by ``test_negative_indices_wrap_on_the_hot_path``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import warnings
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from helpers import frac, gamma
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from numstab import data as D
from numstab import exact
from numstab.audit import (
    absorbed,
    audit_cross_entropy,
    exact_logit_gradient,
    nlm_cosine,
    sc_fraction,
    sc_gap_window,
    ulp_error,
)
from numstab.functional import (
    GatherPlan,
    LossCache,
    collapse_mask,
    gather_backward,
    gather_forward,
    gemm,
    linear_backward,
    linear_forward,
    loss_backward,
    loss_forward,
    reduce_loss,
    relu_backward,
    relu_forward,
    stablemax_s,
)
from numstab.precision import PrecisionPolicy, available_formats, get_format, quantize

# --- settings ---------------------------------------------------------------------------------

_BASE = settings().max_examples  # 60 in the "ci" profile, 600 in "thorough"
_HC = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
MANY = settings(max_examples=_BASE, deadline=None, suppress_health_check=_HC)
SOME = settings(max_examples=max(10, _BASE // 2), deadline=None, suppress_health_check=_HC)
FEW = settings(max_examples=max(6, _BASE // 4), deadline=None, suppress_health_check=_HC)

HAS_LD = "longdouble" in available_formats()
FORMATS = ["float16", "bfloat16", "float32", "float64"] + (["longdouble"] if HAS_LD else [])
AUDIT_FORMATS = ["float16", "bfloat16", "float32", "float64"]
ORDERS = ["pairwise", "sequential", "wide", "sorted"]
BF16 = np.dtype(ml_dtypes.bfloat16)
NATIVE = {
    "float16": np.dtype(np.float16),
    "bfloat16": BF16,
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "longdouble": np.dtype(np.longdouble),
}
WIDTH = {"float16": 16, "bfloat16": 32, "float32": 32, "float64": 64, "longdouble": 64}
P32 = PrecisionPolicy.uniform("float32")


# --- the contract: strict calls, rejections, purity, layouts -----------------------------------


@contextlib.contextmanager
def strict():
    """Warnings are errors and IEEE events raise: a function must handle its own specials."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise", under="ignore"):
            yield


def call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under :func:`strict`, checking that no array argument changed."""
    before = [(a, a.copy()) for a in _arrays_in(args, kwargs)]
    with strict():
        out = fn(*args, **kwargs)
    for a, copy in before:
        same(a, copy, "an input array")
    return out


def rejects(fn, *args, match: str, **kwargs):
    """``fn`` raises ValueError or TypeError (nothing else) whose message matches ``match``."""
    before = [(a, a.copy()) for a in _arrays_in(args, kwargs)]
    with pytest.raises((ValueError, TypeError)) as info, strict():
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "read-only" not in msg, msg
    assert re.search(match, msg, flags=re.IGNORECASE | re.DOTALL), f"{match!r} not in {msg!r}"
    for a, copy in before:
        same(a, copy, "an input array")
    return info.value


def _arrays_in(args, kwargs):
    out = []
    for v in [*args, *kwargs.values()]:
        if isinstance(v, np.ndarray):
            out.append(v)
        elif isinstance(v, dict):
            out += [w for w in v.values() if isinstance(w, np.ndarray)]
        elif isinstance(v, tuple):
            out += [w for w in v if isinstance(w, np.ndarray)]
    return out


def same(x, y, path="result"):
    """Bit-for-bit equality of results (arrays by their bytes, floats with their sign)."""
    if isinstance(x, dict):
        assert list(x) == list(y), path
        for k in x:
            same(x[k], y[k], f"{path}[{k!r}]")
    elif isinstance(x, (tuple, list)):
        assert len(x) == len(y), path
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            same(a, b, f"{path}[{i}]")
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            if f.name != "seconds":
                same(getattr(x, f.name), getattr(y, f.name), f"{path}.{f.name}")
    elif hasattr(x, "toarray"):  # scipy.sparse
        same(x.toarray(), y.toarray(), path)
    elif isinstance(x, (np.ndarray, np.generic)):
        xa, ya = np.asarray(x), np.asarray(y)
        assert xa.dtype == ya.dtype and xa.shape == ya.shape, (path, xa.dtype, ya.dtype)
        if xa.dtype == object:
            assert repr(xa.tolist()) == repr(ya.tolist()), path
            return
        if xa.dtype.kind == "f" or xa.dtype == BF16:
            # NaN payloads and signs carry no meaning (and SIMD and strided loops propagate
            # different ones): NaN must be where NaN is, every other value bit for bit.
            nx, ny = np.isnan(xa), np.isnan(ya)
            assert (nx == ny).all(), (path, xa, ya)
            xa, ya = np.where(nx, 0, xa).astype(xa.dtype), np.where(ny, 0, ya).astype(ya.dtype)
        if xa.dtype == np.longdouble:  # x87: 10 bytes of value, 6 of padding
            assert np.array_equal(xa, ya), (path, xa, ya)
            assert (np.signbit(xa) == np.signbit(ya)).all(), (path, xa, ya)
        else:
            assert np.ascontiguousarray(xa).tobytes() == np.ascontiguousarray(ya).tobytes(), (
                path,
                xa,
                ya,
            )
    elif isinstance(x, float):
        assert (math.isnan(x) and math.isnan(y)) or (
            x == y and math.copysign(1, x) == math.copysign(1, y)
        ), (path, x, y)
    else:
        assert x == y, (path, x, y)


def read_only(a):
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def strided(a):
    """A view of ``a``'s values with every stride doubled (and offset by one element)."""
    big = np.zeros(tuple(2 * n + 1 for n in a.shape), dtype=a.dtype)
    sl = tuple(slice(1, None, 2) for _ in a.shape)
    big[sl] = a
    return big[sl]


def flipped(a):
    """A view of ``a``'s values with negative strides."""
    sl = tuple(slice(None, None, -1) for _ in a.shape)
    return np.ascontiguousarray(a[sl])[sl]


def layouts(a):
    """(name, view) pairs equal in value to ``a``, none C-contiguous and writable."""
    out = [("read-only", read_only(a))]
    if a.ndim:
        frozen = strided(a)
        frozen.setflags(write=False)
        out += [
            ("strided", strided(a)),
            ("negative strides", flipped(a)),
            ("strided read-only", frozen),
        ]
    if a.ndim >= 2:
        out += [("fortran", np.asfortranarray(a)), ("transposed view", np.ascontiguousarray(a.T).T)]
    return out


def check_layouts(fn, arrays, *, skip=(), **kwargs):
    """``fn(*views)`` equals ``fn(*contiguous copies)`` bit for bit for every layout."""
    base = call(fn, *[np.ascontiguousarray(a) for a in arrays], **kwargs)
    for i, (name, _) in enumerate(layouts(arrays[0])):
        if name in skip:
            continue
        views = [layouts(a)[i][1] if a.ndim == arrays[0].ndim else a for a in arrays]
        same(call(fn, *views, **kwargs), base, f"{fn.__name__} with {name} input")
    return base


# --- values -----------------------------------------------------------------------------------


def nasty(fmt, nonfinite=True):
    """Special values of a format: signed zeros, the extremes of the normal and subnormal
    ranges, ±1, plus NaN and ±inf."""
    f = get_format(fmt)
    vals = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        float(f.tiny),
        -float(f.tiny),
        float(f.smallest_subnormal),
        -float(f.smallest_subnormal),
        float(min(f.max, np.finfo(np.float64).max)),
        -float(min(f.max, np.finfo(np.float64).max)),
    ]
    if f.name in ("float64", "longdouble"):
        vals = [v for v in vals if math.isfinite(v) and (v == 0 or abs(v) >= 5e-324)]
    return vals + ([math.nan, math.inf, -math.inf] if nonfinite else [])


def values(fmt, *, nonfinite=True, lo=None, hi=None):
    """Floats representable in ``fmt`` (before bfloat16 rounding), nasty ones included."""
    if lo is not None:
        base = st.floats(lo, hi, width=64)
        return st.one_of(base, st.sampled_from([v for v in nasty(fmt, False) if lo <= v <= hi]))
    base = st.floats(width=WIDTH[fmt], allow_nan=nonfinite, allow_infinity=nonfinite)
    return st.one_of(base, st.sampled_from(nasty(fmt, nonfinite)))


def in_format(a, fmt):
    """Round float64 values to ``fmt`` and return them in the format's own dtype."""
    with np.errstate(over="ignore"):
        return quantize(np.asarray(a, dtype=np.float64), fmt).astype(NATIVE[fmt])


@st.composite
def arrays_of(draw, fmt, shape, **kw):
    a = draw(hnp.arrays(np.float64, shape, elements=values(fmt, **kw)))
    return in_format(a, fmt)


@st.composite
def wild(draw, shape):
    """float64 arrays of anything: 1e308, 5e-324, NaN, ±inf (passed to narrower formats)."""
    el = st.one_of(
        st.floats(width=64), st.sampled_from([1e308, -1e308, 1e38, -1e38, 5e-324, 1e-45, 0.0])
    )
    return draw(hnp.arrays(np.float64, shape, elements=el))


def u_of(fmt) -> float:
    return get_format(fmt).unit_roundoff


def carrier64(z):
    """Values of a format array as float64 (longdouble kept): exact."""
    z = np.asarray(z)
    return z if z.dtype == np.longdouble else z.astype(np.float64)


# =============================================================================================
# numstab.audit
# =============================================================================================


def ulp_reference(c, e, fmt) -> float:
    """|c - e| / ulp(e) with exact rationals (finite values)."""
    f = get_format(fmt)
    ce, ee = frac(c), frac(e)
    ex = math.floor(math.log2(abs(ee))) if ee else f.emin  # ulp(0): the smallest subnormal
    while ee and abs(ee) < Fraction(2) ** ex:
        ex -= 1
    while ee and abs(ee) >= Fraction(2) ** (ex + 1):
        ex += 1
    q = Fraction(2) ** (max(ex, f.emin) - f.precision + 1)
    try:
        return float(abs(ce - ee) / q)  # correctly rounded; OverflowError beyond the range
    except OverflowError:
        return math.inf


@pytest.mark.parametrize("fmt", AUDIT_FORMATS)
@MANY
@given(data=st.data())
@example(data=None)
def test_ulp_error_against_exact_rationals(fmt, data):
    if data is None:  # pinned: subnormals, the extremes, infinities, NaN
        f = get_format(fmt)
        c = np.array([float(f.smallest_subnormal), float(f.max), np.inf, np.nan, 1.0, np.inf])
        e = np.array([2 * float(f.smallest_subnormal), -float(f.max), np.inf, np.nan, np.nan, 1.0])
    else:
        n = data.draw(st.integers(0, 6))
        c = data.draw(arrays_of(fmt, (n,))).astype(np.float64)
        e = data.draw(arrays_of(fmt, (n,))).astype(np.float64)
    got = call(ulp_error, c, e, fmt)
    assert got.dtype == np.float64 and got.shape == c.shape
    for gi, ci, ei in zip(got, c, e, strict=True):
        if np.isnan(ci) and np.isnan(ei):
            assert gi == 0.0  # documented: both NaN agree
        elif not (np.isfinite(ci) and np.isfinite(ei)):
            assert gi == (0.0 if ci == ei else math.inf)  # documented inf / NaN rules
        else:
            want = ulp_reference(ci, ei, fmt)
            assert gi == pytest.approx(want, rel=2.0**-50), (ci, ei)
    # Layouts, read-only input, and ints/bools, which are real numbers too.
    if c.size:
        check_layouts(ulp_error, [c, e], fmt=fmt)
    k = np.arange(4)
    same(call(ulp_error, k, k[::-1], fmt), call(ulp_error, k * 1.0, k[::-1] * 1.0, fmt))


def test_ulp_error_rejects_non_real_and_mismatched_input():
    one = np.ones(3)
    rejects(ulp_error, one.astype(complex), one, "float32", match="computed.*complex")
    rejects(ulp_error, one, one.astype(complex), "float32", match="exact_values.*complex")
    rejects(ulp_error, np.array(["a", "b", "c"]), one, "float32", match="computed.*<U1")
    rejects(ulp_error, one, np.array(["a", "b", "c"]), "float32", match="exact_values.*<U1")
    rejects(ulp_error, None, one, "float32", match="^computed: None is not a real number")
    rejects(ulp_error, one, [1.0, None, 2.0], "float32", match=r"^exact_values\[1\]: None")
    rejects(ulp_error, one, np.ones(4), "float32", match=r"\(3,\).*\(4,\).*broadcast")
    rejects(ulp_error, one, one, "float8", match="^fmt: .*'float8'")
    # fmt=None is the format of computed (float64 here): 1 + 2**-52 is one float64 ulp.
    assert call(ulp_error, one + 2.0**-52, one, None).tolist() == [1.0] * 3
    # Object arrays of mpf are exact references, used as such.
    mp = np.array([exact.context().mpf(1)] * 3, dtype=object)
    assert call(ulp_error, one, mp, "float32").tolist() == [0.0, 0.0, 0.0]


def absorbed_reference(a, b, fmt):
    """``fl(a + b) == a and b != 0`` with NumPy / ml_dtypes scalars of the format (whose
    arithmetic is correctly rounded), operands rounded to the format first."""
    dt = NATIVE[fmt].type
    with np.errstate(all="ignore"):
        aa, bb = dt(a), dt(b)
        return bool(dt(aa + bb) == aa and bb != 0)


@pytest.mark.parametrize("fmt", FORMATS)
@MANY
@given(data=st.data())
@example(data=[(1.0, 2.0**-24), (1.0, 2.0**-23), (1e308, 1.0), (np.nan, 1.0)])
def test_absorbed_against_scalar_arithmetic(fmt, data):
    if isinstance(data, list):
        a, b = np.array([p[0] for p in data]), np.array([p[1] for p in data])
    else:
        n = data.draw(st.integers(0, 5))
        el = st.one_of(values(fmt), st.sampled_from([1.0, 2.0**-24, 2.0**-53, 2.0**-11, 1e308]))
        a = data.draw(hnp.arrays(np.float64, (n,), elements=el))
        b = data.draw(hnp.arrays(np.float64, (n,), elements=el))
        if fmt == "longdouble":  # longdouble rounding is from float64 only
            a, b = a.astype(np.longdouble), b.astype(np.longdouble)
    got = call(absorbed, a, b, fmt)
    assert got.dtype == bool and got.shape == a.shape
    want = [absorbed_reference(x, y, fmt) for x, y in zip(a, b, strict=True)]
    np.testing.assert_array_equal(got, want, err_msg=f"{a} + {b}")
    if a.size:
        check_layouts(absorbed, [a, b], fmt=fmt)


def test_absorbed_rejects_non_real_and_mismatched_input():
    rejects(absorbed, 1j, 1.0, "float32", match="a.*complex")
    rejects(absorbed, 1.0, "x", "float32", match="^b: 'x' is not a real number")
    rejects(absorbed, 1.0, np.array(["x"]), "float32", match="^b must.*<U1")
    rejects(absorbed, None, 1.0, "float32", match="^a: None is not a real number")
    rejects(absorbed, np.ones(2), np.ones(3), "float32", match="broadcast")
    rejects(absorbed, 1.0, 1.0, "int8", match="^fmt: .*'int8'")
    # bfloat16 arrays are accepted (widened exactly to float32).
    assert call(absorbed, np.ones(1, BF16), np.full(1, 2.0**-8, BF16), "bfloat16").tolist() == [
        True
    ]
    assert call(absorbed, np.array([1, 1]), np.array([0, 1]), "float16").tolist() == [0, 0]


# --- collapse: an oracle that needs no summation order -----------------------------------------


def collapse_oracle(zq, kind, eps, u):
    """The collapse verdict per row where every summation order must agree, else None.

    ``zq``: the logits as rounded to the format (float64 / longdouble). A row with NaN or
    ``+inf``, or with every logit ``-inf``, has a NaN sum: never collapsed. Other ``-inf``
    logits contribute exactly 0. For the finite rest, with ``M`` the largest term after the
    max term (softmax ``e^{z_k - m}``, StableMax ``s(z_k) / s(m)``) and ``n`` the number of
    such terms: ``n·M <= u/4`` means every partial sum involving 1 rounds back to 1 (collapsed
    in any order); ``M >= 4u`` means that one term alone survives the addition to 1 (sums are
    monotone under rounding), so no order collapses. The factor 4 dominates every rounding of
    the terms themselves (a few u, or a subnormal quantum).
    """
    out = []
    with np.errstate(all="ignore"):
        for row in np.asarray(zq, dtype=np.float64):
            if np.isnan(row).any() or np.isposinf(row).any() or np.isneginf(row).all():
                out.append(False)
                continue
            fin = row[np.isfinite(row)]
            k = int(np.argmax(fin))
            m, others = fin[k], np.delete(fin, k)
            if others.size == 0:
                out.append(True)
                continue
            if kind == "softmax":
                terms = np.exp(others - m)
            else:

                def s(x):
                    return np.where(x >= 0, x + 1.0, 1.0 / (1.0 - np.minimum(x, 0) + eps))

                terms = s(others) / s(np.float64(m))
            big = terms.max()
            out.append(True if others.size * big <= u / 4 else (False if big >= 4 * u else None))
    return out


@st.composite
def logits_any(draw, fmt, max_rows=4, max_cols=6, min_cols=1):
    """Hostile logits for ``fmt``: in the format (any values) or float64 (any values, to be
    rounded), with structure: rows near a collapse (one dominant logit), ties, huge gaps."""
    n = draw(st.integers(0, max_rows))
    c = draw(st.integers(min_cols, max_cols))
    how = draw(st.sampled_from(["format", "wild", "dominant"]))
    if how == "format":
        return draw(arrays_of(fmt, (n, c)))
    if how == "wild":
        return draw(wild((n, c)))
    # One dominant logit at a gap of g (log-uniform-ish from 1 to 1e5) above the others.
    z = np.zeros((n, c))
    for i in range(n):
        g = draw(st.floats(0.0, 5.0)) ** 10 * 1e-2 + draw(st.floats(0, 40))
        z[i] = -g + draw(hnp.arrays(np.float64, c, elements=st.floats(-1, 1)))
        z[i, draw(st.integers(0, c - 1))] = draw(st.floats(-3, 3))
    return in_format(z, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("kind", "eps"), [("softmax", 0.0), ("stablemax", 0.0), ("stablemax", 1e-30)]
)
@SOME
@given(data=st.data())
@example(data=np.array([[0.0, -30.0, -30.0]]))
@example(data=np.array([[1e308, -1e308], [5e-324, 0]]))
@example(data=np.array([[np.inf], [-np.inf], [7.0]]))
@example(data=np.zeros((0, 3)))
def test_collapse_mask_and_sc_fraction_against_the_oracle(fmt, kind, eps, data):
    z = data if isinstance(data, np.ndarray) else data.draw(logits_any(fmt))
    order = "pairwise" if isinstance(data, np.ndarray) else data.draw(st.sampled_from(ORDERS))
    if order == "wide" and fmt == "longdouble":
        rejects(collapse_mask, z, fmt, kind=kind, order=order, match="wide.*longdouble")
        return
    mask = call(collapse_mask, z, fmt, kind=kind, order=order, eps=eps)
    assert mask.dtype == bool and mask.shape == (z.shape[0],)
    with np.errstate(over="ignore"):
        zq = quantize(z if z.dtype != BF16 else z.astype(np.float32), fmt)
    for i, want in enumerate(collapse_oracle(carrier64(zq), kind, eps, u_of(fmt))):
        if want is not None:
            assert mask[i] == want, (z[i], order)
    if fmt in AUDIT_FORMATS:  # bfloat16 input included: the audit widens it exactly
        frac_ = call(sc_fraction, z, dtype=fmt, kind=kind, order=order, eps=eps)
        if z.shape[0] == 0:
            assert math.isnan(frac_)  # documented: NaN for zero rows
        else:
            assert frac_ == np.count_nonzero(mask) / z.shape[0]
    if z.size:
        check_layouts(collapse_mask, [z], fmt=fmt, kind=kind, order=order, eps=eps)


HOSTILE_LOGITS = {
    "1-D": (np.zeros(3), ValueError, "2-D"),
    "3-D": (np.zeros((1, 2, 3)), ValueError, "2-D"),
    "scalar": (1.0, ValueError, "2-D"),
    "no classes": (np.zeros((2, 0)), ValueError, "class"),
    "empty 0x0": (np.zeros((0, 0)), ValueError, "class"),
    "complex": (np.zeros((1, 2), complex), TypeError, "complex"),
    "object": (np.zeros((1, 2), object), TypeError, "object"),
    "bool": (np.zeros((1, 2), bool), TypeError, "bool"),
    "strings": (np.array([["a", "b"]]), TypeError, "<U1"),
    "ragged list": ([[0.0, 1.0], [2.0]], ValueError, "inhomogeneous|sequence"),
}


@pytest.mark.parametrize("case", HOSTILE_LOGITS, ids=list(HOSTILE_LOGITS))
def test_audit_and_loss_entry_points_reject_hostile_logits(case):
    z, exc, pattern = HOSTILE_LOGITS[case]
    n = 2 if case == "ragged list" else (np.shape(z)[0] if np.ndim(z) else 1)
    y = np.zeros(n, dtype=np.int64)
    for fn, args, kw in [
        (sc_fraction, (z,), {}),
        (audit_cross_entropy, (z, y), {}),
        (exact_logit_gradient, (z, y), {}),
        (collapse_mask, (z, "float32"), {}),
        (loss_forward, (z, y), {}),
    ]:
        # (The functional layer names a bad dtype through precision.quantize: "cannot round
        # an array of dtype complex128: ...".)
        if case in ("1-D", "3-D") and fn in (
            sc_fraction,
            audit_cross_entropy,
            exact_logit_gradient,
        ):
            continue  # the audit takes logits of shape (..., C): tests/test_interop.py
        err = rejects(fn, *args, match=pattern, **kw)
        assert isinstance(err, exc), (fn, err)


def test_integer_logits_are_real_numbers_to_the_audit():
    # Integers carry no format: the audit's default for them is float32 (documented).
    z = np.array([[3, -40, 0], [0, 0, 0]])
    y = np.array([0, 2])
    zf = z.astype(np.float64)
    f32 = {"dtype": "float32"}
    assert call(sc_fraction, z) == call(sc_fraction, zf, **f32)
    same(call(audit_cross_entropy, z, y), call(audit_cross_entropy, zf, y, **f32))
    same(call(exact_logit_gradient, z, y), call(exact_logit_gradient, zf, y, **f32))
    # The functional layer never converts silently: integers must be rounded explicitly.
    rejects(loss_forward, z, y, match="int64.*convert")


@pytest.mark.parametrize("fmt", ["float16", "float32", "float64", "longdouble"])
@MANY
@given(n=st.one_of(st.integers(2, 10**6), st.integers(2, 2**1023), st.just(2**1024)))
@example(n=113)
@example(n=2)
def test_sc_gap_window_is_the_formula_and_brackets_two_class_collapse(fmt, n):
    if fmt == "longdouble" and not HAS_LD:
        rejects(sc_gap_window, fmt, n, match="longdouble")
        return
    if n >= 2**1024:
        rejects(sc_gap_window, fmt, n, match=r"n_classes.*2\*\*1024")
        return
    lo, hi = call(sc_gap_window, fmt, n)
    f = get_format(fmt)
    u, p = f.unit_roundoff, f.precision
    # The wide order rounds 1 + t to the wider format first: t <= u + u_wide still collapses.
    wide = {
        "float16": 2.0**-24,
        "bfloat16": 2.0**-24,
        "float32": 2.0**-53,
        "float64": 2.0**-64 if HAS_LD else 0.0,
        "longdouble": 0.0,
    }[fmt]
    assert lo == -math.log(u + wide) - math.log1p(u)
    assert hi == pytest.approx(math.log(n - 1) + p * math.log(2) + (n - 1) * math.log1p(u))
    assert lo <= hi  # (equal in float64 for n = 2 in float64: the window is 2 ln(1 + u) wide)
    if n == 2 and fmt != "longdouble":
        # The window brackets the two-class collapse threshold, for every order.
        for order in ORDERS:
            if fmt == "float64" and order == "wide" and not HAS_LD:
                continue
            below = call(sc_fraction, np.array([[0.0, -(lo - 0.01)]]), dtype=fmt, order=order)
            above = call(sc_fraction, np.array([[0.0, -(hi + 0.01)]]), dtype=fmt, order=order)
            assert (below, above) == (0.0, 1.0), (order, lo, hi)


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (("float32", 1), "n_classes.*1"),
        (("float32", 0), "n_classes.*0"),
        (("float32", -5), "n_classes.*-5"),
        (("float32", 2.0), r"n_classes.*2\.0"),
        (("float32", True), "n_classes.*True"),
        (("float32", "3"), "n_classes.*'3'"),
        (("float32", None), "n_classes.*None"),
        (("float32", np.array([3])), "n_classes"),
        (("int8", 3), "'int8'"),
        ((None, 3), "None"),
        ((3, 3), "unknown format 3"),
    ],
)
def test_sc_gap_window_rejects(args, pattern):
    rejects(sc_gap_window, *args, match=pattern)


def exact_cosine(a, b):
    """cos(a, -b) of two lists of exact rationals: sign · sqrt(dot² / (|a|² |b|²)), rounded
    once to float64 before the square root (so within 1 ulp of the truth); NaN for a zero side."""
    dot = -sum(x * y for x, y in zip(a, b, strict=True))
    na, nb = sum(x * x for x in a), sum(y * y for y in b)
    if na == 0 or nb == 0:
        return math.nan
    return (1 if dot > 0 else -1 if dot < 0 else 0) * math.sqrt(float(dot * dot / (na * nb)))


@st.composite
def tensor_dicts(draw):
    keys = draw(
        st.lists(st.sampled_from(["W1", "b1", "W2", "scale"]), min_size=0, max_size=3, unique=True)
    )
    params, grads = {}, {}
    for k in keys:
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4))
        fmt = draw(st.sampled_from(["float16", "bfloat16", "float32", "float64"]))
        el = dict(nonfinite=False)
        params[k] = draw(arrays_of(fmt, shape, **el))
        grads[k] = draw(arrays_of(draw(st.sampled_from(["float32", "float64"])), shape, **el))
        if draw(st.booleans()):  # a common scale: all tiny (subnormal) or all huge
            s = draw(st.sampled_from([2.0**-1070, 2.0**-1000, 2.0**1000, 1e-300, 1e300]))
            with np.errstate(over="ignore"):  # may make inf: then the cosine is NaN
                params[k] = params[k].astype(np.float64) * s
                grads[k] = grads[k].astype(np.float64) * draw(st.sampled_from([s, 1.0]))
    return params, grads


@MANY
@given(pg=tensor_dicts())
@example(pg=({"a": np.array([5e-324, 0.0])}, {"a": np.array([-5e-324, 0.0])}))
@example(pg=({"a": np.array([1e300, 1e300])}, {"a": np.array([-1e300, 1e-300])}))
@example(
    pg=({"a": np.array([1e-300]), "b": np.array([1e300])}, {"a": np.ones(1), "b": -np.ones(1)})
)
@example(pg=({}, {}))
def test_nlm_cosine_against_exact_rationals(pg):
    params, grads = pg
    got = call(nlm_cosine, params, grads)
    assert list(got) == [*params, "global"]
    finite = {k: np.isfinite(params[k]).all() and np.isfinite(grads[k]).all() for k in params}
    finite["global"] = all(finite.values())
    flat_p = {k: [frac(v) for v in np.ravel(params[k])] if finite[k] else [] for k in params}
    flat_g = {k: [frac(v) for v in np.ravel(grads[k])] if finite[k] else [] for k in params}
    for k in [*params, "global"]:
        a = flat_p[k] if k != "global" else [v for t in flat_p.values() for v in t]
        b = flat_g[k] if k != "global" else [v for t in flat_g.values() for v in t]
        want = exact_cosine(a, b) if finite[k] else math.nan  # documented: NaN with inf
        if math.isnan(want):
            assert math.isnan(got[k]), (k, got[k])  # documented: a zero tensor has no direction
        else:
            # float64 dot products of n terms: |error| <= (n + 3)·u in the cosine.
            assert abs(got[k] - want) <= (len(a) + 8) * 2.0**-52, (k, got[k], want)
    for k in params:
        if np.ndim(params[k]) and np.size(params[k]):
            for name, view in layouts(np.asarray(params[k])):
                p2 = {**params, k: view}
                same(call(nlm_cosine, p2, grads), got, f"nlm_cosine with {name} params")


def test_nlm_cosine_special_values_and_rejections():
    theta = {"w": np.array([1.0, 2.0])}
    for bad in (np.nan, np.inf, -np.inf):
        out = call(nlm_cosine, theta, {"w": np.array([bad, 1.0])})
        assert math.isnan(out["w"]) and math.isnan(out["global"])  # documented NaN
    assert call(nlm_cosine, {"w": [1, 2]}, {"w": [-1.0, -2.0]})["w"] == pytest.approx(1.0)
    assert call(nlm_cosine, {"w": np.array([1, 2])}, {"w": np.array([-2, -4])})["w"] == 1.0
    rejects(nlm_cosine, [1.0], [1.0], match="dicts.*list")
    rejects(nlm_cosine, None, {}, match="dicts.*NoneType")
    rejects(nlm_cosine, theta, {"v": np.ones(2)}, match="same keys.*'v'.*'w'")
    rejects(nlm_cosine, theta, {"w": np.ones(3)}, match=r"'w'.*\(2,\).*\(3,\)")
    rejects(nlm_cosine, theta, {"w": np.ones(2, complex)}, match=r"grads\['w'\].*complex")
    rejects(nlm_cosine, {"w": np.array(["a", "b"])}, theta, match=r"params\['w'\].*<U1")
    rejects(nlm_cosine, {"w": np.ones(2, bool)}, theta, match=r"params\['w'\].*bool")
    rejects(nlm_cosine, {"w": np.array([None, None])}, theta, match=r"params\['w'\]\[0\]: None")
    obj = {"w": np.array([1, 2], dtype=object)}  # numbers, but not an array of a real dtype
    rejects(nlm_cosine, obj, theta, match=r"params\['w'\].*object")


# --- the cross-entropy audit and the exact gradient --------------------------------------------


def work_dtype(fmt):
    """The fast path's working format: longdouble for float64 audits, else float64."""
    return np.longdouble if get_format(fmt).precision > 24 and HAS_LD else np.float64


def within_bound(fast, mp, bound, n_classes, dtype):
    """Fast value within ``exact_rel_bound`` of the mpmath value, plus half an ulp of the
    working format and the documented absolute term for underflowing tail terms."""
    fast = np.asarray(fast, dtype=dtype)
    mp = np.asarray(mp, dtype=dtype)
    same_ = (fast == mp) | (np.isnan(fast) & np.isnan(mp))
    fi = np.finfo(dtype)
    under = n_classes * (2.0**-1074 if dtype == np.float64 else np.ldexp(np.longdouble(1), -16445))
    with np.errstate(all="ignore"):
        _, e = np.frexp(np.abs(mp))
        ulp = np.ldexp(np.ones_like(mp), np.maximum(e - 1, fi.minexp) - fi.nmant)
        tol = bound.astype(dtype) * np.abs(mp) * (1 + bound.astype(dtype)) + ulp
        return same_ | (np.abs(fast - mp) <= tol + under)


def _case(data, fmt):
    """``(logits, labels)``: a pinned ``@example`` tuple, or drawn from ``data`` (few rows)."""
    if isinstance(data, tuple):
        return data[0], np.array(data[1], dtype=np.int64)
    z = data.draw(logits_any(fmt, max_rows=3, max_cols=5))
    return z, data.draw(hnp.arrays(np.int64, z.shape[0], elements=st.integers(0, z.shape[1] - 1)))


@pytest.mark.parametrize("fmt", AUDIT_FORMATS)
@pytest.mark.parametrize(("kind", "eps"), [("softmax", 0.0), ("stablemax", 1e-30)])
@FEW
@given(data=st.data())
@example(data=(np.array([[1e308, -1e308, 0.0]]), [1]))
@example(data=(np.array([[1e-45, -1e-45, 0.0]]), [2]))
@example(data=(np.array([[np.nan, 0], [0, -np.inf]]), [1, 0]))
@example(data=(np.zeros((0, 4)), []))
# float64 StableMax: an exact tail a relative ~2**-106 above u (not collapsed), which the fast
# path must hand to mpmath (tests/test_audit.py::test_float64_stablemax_margin).
@example(data=(np.array([[0.0, -(2.0**53), -(2.0**106)]]), [0]))
def test_audit_cross_entropy_hostile_logits_match_pure_mpmath(fmt, kind, eps, data):
    z, y = _case(data, fmt)
    fast = call(audit_cross_entropy, z, y, dtype=fmt, kind=kind, eps=eps)
    pure = call(audit_cross_entropy, z, y, dtype=fmt, kind=kind, eps=eps, method="mpmath")
    assert len(fast) == z.shape[0]
    with np.errstate(over="ignore"):
        zq = quantize(z, fmt)
    np.testing.assert_array_equal(fast.collapsed_exact, pure.collapsed_exact)
    for name in ("loss", "collapsed", "zero_loss", "zero_target_grad", "target_grad"):
        same(getattr(fast, name), getattr(pure, name), name)
    dt = work_dtype(fmt)
    for name in ("loss_exact", "target_grad_exact"):
        a, b = getattr(fast, name), getattr(pure, name)
        good = within_bound(a, b, fast.exact_rel_bound, z.shape[1], dt)
        assert good.all(), (name, z[~good], a[~good], b[~good])
    # No silent NaN: finite rows have numbers, exact and computed.
    fin = np.isfinite(zq).all(axis=1)
    assert (
        not np.isnan(pure.loss_exact[fin]).any() and not np.isnan(pure.target_grad_exact[fin]).any()
    )
    assert not np.isnan(fast.loss[fin]).any()
    summary = fast.summary()
    assert summary["n_samples"] == z.shape[0]
    if z.size:
        for name, view in layouts(z):
            same(call(audit_cross_entropy, view, y, dtype=fmt, kind=kind, eps=eps), fast, name)


_RNG7 = np.random.default_rng(7)
_LAYOUT_ROWS = (
    (_RNG7.standard_normal((6, 9)) * 8).astype(np.float32).astype(np.float64),
    _RNG7.integers(0, 9, 6).tolist(),
)


@pytest.mark.parametrize("fmt", AUDIT_FORMATS)
@pytest.mark.parametrize(
    ("kind", "eps"), [("softmax", 0.0), ("stablemax", 0.0), ("stablemax", 1e-30)]
)
@FEW
@given(data=st.data())
@example(data=(np.array([[0.0, -200.0, np.inf]]), [0]))
@example(data=(np.array([[1e308, -1e308]]), [1]))
# A Fortran-ordered copy of these rows once summed in another order (1 ulp apart at [3, 7]).
@example(data=_LAYOUT_ROWS)
def test_exact_logit_gradient_against_mpmath(fmt, kind, eps, data):
    z, y = _case(data, fmt)
    g = call(exact_logit_gradient, z, y, dtype=fmt, kind=kind, eps=eps)
    assert g.dtype == np.float64 and g.shape == z.shape
    with np.errstate(over="ignore"):
        zq = carrier64(quantize(z, fmt)).astype(np.float64)
    if not z.size:
        return
    fn = exact.cross_entropy_grad if kind == "softmax" else exact.stablemax_cross_entropy_grad
    kw = {} if kind == "softmax" else {"eps": eps}
    ref = exact.round_exact(fn(zq, y, **kw), "float64")
    fin = np.isfinite(zq).all(axis=1)
    if fin.any():
        with np.errstate(over="ignore"):
            d = np.abs(zq[fin] - zq[fin].max(axis=1, keepdims=True)).max()
        bound = min((z.shape[1] + d + 2**12) * 2.0**-52, 1.0)  # the documented bound
        under = z.shape[1] * 2.0**-1074  # terms below float64's range
        np.testing.assert_allclose(g[fin], ref[fin], rtol=bound, atol=under)
        assert not np.isnan(g[fin]).any()
    same(g[~fin], ref[~fin], "non-finite rows: mpmath")
    for name, view in layouts(z):
        same(call(exact_logit_gradient, view, y, dtype=fmt, kind=kind, eps=eps), g, name)


@pytest.mark.skipif(not HAS_LD, reason="longdouble is not x87 80-bit here")
@pytest.mark.parametrize("kind", ["softmax", "stablemax"])
def test_exact_logit_gradient_of_longdouble_logits_beyond_float64(kind):
    """Longdouble logits outside float64's range go to mpmath with their exact values (they
    used to be rounded to inf first: NaN rows)."""
    big = np.array(
        [[np.longdouble("1e4000"), np.longdouble("1e3999")], [np.longdouble("-1e4000"), 0]]
    )
    y = np.array([0, 0])
    g = call(exact_logit_gradient, big, y, dtype="longdouble", kind=kind)
    fn = exact.cross_entropy_grad if kind == "softmax" else exact.stablemax_cross_entropy_grad
    same(g, exact.round_exact(fn(big, y), "float64"))
    assert not np.isnan(g).any()


LABEL_CASES = {
    "float": (np.array([0.0, 1.0]), TypeError, "labels.*float64"),
    "bool": (np.array([True, False]), TypeError, "labels.*bool"),
    "object": (np.array([0, 1], dtype=object), TypeError, "labels.*object"),
    "strings": (np.array(["0", "1"]), TypeError, "labels.*<U1"),
    "too short": (np.array([0]), ValueError, r"labels.*\(2,\).*\(1,\)"),
    "2-D": (np.array([[0, 1]]), ValueError, r"labels.*\(2,\).*\(1, 2\)"),
    "scalar": (0, ValueError, r"labels.*\(2,\).*\(\)"),
    "too large": (np.array([0, 3]), ValueError, r"\[0, 3\).*3|3.*\[0, 3\)"),
    "huge": (np.array([0, 2**40]), ValueError, r"1099511627776.*\[0, 3\)|\[0, 3\).*1099511627776"),
}


@pytest.mark.parametrize("case", LABEL_CASES, ids=list(LABEL_CASES))
def test_bad_labels_are_named(case):
    y, exc, pattern = LABEL_CASES[case]
    z = np.array([[0.0, -1.0, -2.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    for fn in (audit_cross_entropy, exact_logit_gradient, loss_forward):
        err = rejects(fn, z, y, match=pattern)
        assert isinstance(err, exc), (fn, err)
    # Negative labels: the audit checks them; the training hot path does not (module header).
    rejects(audit_cross_entropy, z, np.array([0, -1]), match=r"-1.*\[0, 3\)")
    rejects(exact_logit_gradient, z, np.array([0, -1]), match=r"-1.*\[0, 3\)")


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"dtype": "float8"}, "dtype.*'float8'"),
        ({"dtype": "int8"}, "^dtype: .*'int8'"),
        ({"dtype": np.zeros((2, 2))}, r"^dtype: unknown format array\(\[\[0\., 0\.\], \[0"),
        ({"kind": "sparsemax"}, "kind.*'sparsemax'"),
        ({"order": "random"}, "order.*'random'"),
        ({"method": "exact"}, "method.*'exact'"),
        ({"kind": "stablemax", "eps": -1.0}, "eps.*-1.0"),
        ({"kind": "stablemax", "eps": math.nan}, "eps.*nan"),
        ({"kind": "stablemax", "eps": math.inf}, "eps.*inf"),
        ({"kind": "stablemax", "eps": None}, "eps.*None"),
        ({"kind": "stablemax", "eps": "1e-30"}, "eps.*'1e-30'"),
        ({"kind": "stablemax", "eps": True}, "eps.*True"),
        ({"kind": "stablemax", "eps": np.array([0.0, 1.0])}, "eps"),
    ],
)
def test_bad_options_are_named(kw, pattern):
    z = np.array([[0.0, -1.0]])
    y = np.array([0])
    rejects(audit_cross_entropy, z, y, match=pattern, **kw)
    kw_no_method = {k: v for k, v in kw.items() if k != "method"}
    if kw_no_method:
        if "order" not in kw:
            rejects(exact_logit_gradient, z, y, match=pattern, **kw_no_method)
        rejects(sc_fraction, z, match=pattern, **kw_no_method)


# =============================================================================================
# numstab.functional
# =============================================================================================


def quantum(fmt) -> Fraction:
    f = get_format(fmt)
    return Fraction(2) ** (f.emin - f.precision + 1)


def gemm_bounds(a, b, policy):
    """Per entry, exactly: the product and the error bound of gemm, i.e. the accumulation
    error ``γ_{k+1}(u_c)·Σ|a||b| + k·q_c`` (compute format; a subnormal product loses up to a
    quantum) plus the rounding to storage (``u_s`` relative, a storage quantum absolute)."""
    k = a.shape[1]
    uc = Fraction(1, 2**policy.compute.precision)
    us = Fraction(1, 2**policy.storage.precision)
    g = (k + 1) * uc / (1 - (k + 1) * uc)
    fa = [[abs(frac(v)) for v in row] for row in a]
    fb = [[abs(frac(v)) for v in col] for col in np.asarray(b).T]
    inner = [
        [
            g * sum(x * y for x, y in zip(r, c, strict=True)) + k * quantum(policy.compute.name)
            for c in fb
        ]
        for r in fa
    ]
    exact_ = exact_product(a, b)
    total = [
        [
            inner[i][j] + us * (abs(exact_[i][j]) + inner[i][j]) + quantum(policy.storage.name)
            for j in range(len(fb))
        ]
        for i in range(len(fa))
    ]
    return exact_, total


def exact_product(a, b):
    """Entries of a @ b as exact rationals."""
    fa = [[frac(v) for v in row] for row in a]
    fb = [[frac(v) for v in row] for row in np.asarray(b).T]
    return [[sum((x * y for x, y in zip(r, c, strict=True)), Fraction(0)) for c in fb] for r in fa]


def ieee_dot_class(row, col):
    """NaN / +inf / -inf / finite of an IEEE dot product, order-free (finite parts small)."""
    with np.errstate(all="ignore"):
        prods = [float(x) * float(y) for x, y in zip(row, col, strict=True)]
    if any(math.isnan(p) for p in prods):
        return "nan"
    pos, neg = any(p == math.inf for p in prods), any(p == -math.inf for p in prods)
    return "nan" if pos and neg else "+inf" if pos else "-inf" if neg else "finite"


def classify(v):
    return "nan" if np.isnan(v) else "+inf" if v == np.inf else "-inf" if v == -np.inf else "finite"


@pytest.mark.parametrize("fmt", FORMATS)
@MANY
@given(data=st.data())
@example(data=(np.zeros((0, 3)), np.ones((3, 2))))
@example(data=(np.ones((2, 0)), np.ones((0, 2))))
@example(data=(np.array([[1e-300, 1e-300]]), np.array([[1e-20], [1e-300]])))
def test_gemm_within_the_tensor_core_bound_of_the_exact_product(fmt, data):
    pol = PrecisionPolicy.uniform(fmt)
    if isinstance(data, tuple):
        a, b = (in_format(x, fmt) for x in data)
    else:
        m, k, n = (data.draw(st.integers(0, 5)) for _ in range(3))
        # Magnitudes that cannot overflow the storage format (finite-input bound check).
        top = math.sqrt(min(float(np.float64(get_format(fmt).max)), 1e300) / max(k, 1)) / 4
        el = dict(nonfinite=False, lo=-top, hi=top)
        a = data.draw(arrays_of(fmt, (m, k), **el))
        b = data.draw(arrays_of(fmt, (k, n), **el))
    r = call(gemm, a, b, pol)
    assert r.dtype == pol.storage.carrier and r.shape == (a.shape[0], b.shape[1])
    assert (quantize(r, fmt) == r).all()  # representable in the storage format
    exact_, total = gemm_bounds(a, b, pol)
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            assert abs(frac(r[i, j]) - exact_[i][j]) <= total[i][j], (a, b, r[i, j])
    # Layouts: a view may take another BLAS kernel (a strided vector goes to gemv with its
    # stride, a transposed operand to the transposed gemm), whose accumulation order differs:
    # every layout is within the same bound of the truth, none raises, none is modified.
    if a.size and b.size:
        for name, _ in layouts(a):
            got = call(gemm, dict(layouts(a))[name], dict(layouts(b))[name], pol)
            for i in range(r.shape[0]):
                for j in range(r.shape[1]):
                    assert abs(frac(got[i, j]) - exact_[i][j]) <= total[i][j], (name, a, b)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "float32", "float64"])
@SOME
@given(data=st.data())
@example(data=(np.array([[np.inf, 0.0]]), np.array([[0.0], [1.0]])))
@example(data=(np.array([[np.inf, -np.inf]]), np.array([[1.0], [1.0]])))
@example(data=(np.array([[np.nan, 1.0]]), np.array([[1.0], [1.0]])))
def test_gemm_non_finite_operands_follow_ieee(fmt, data):
    pol = PrecisionPolicy.uniform(fmt)
    if isinstance(data, tuple):
        a, b = (in_format(x, fmt) for x in data)
    else:
        m, k, n = (data.draw(st.integers(1, 4)) for _ in range(3))
        el = st.one_of(
            st.integers(-8, 8).map(float), st.sampled_from([np.nan, np.inf, -np.inf, 0.0])
        )
        a = in_format(data.draw(hnp.arrays(np.float64, (m, k), elements=el)), fmt)
        b = in_format(data.draw(hnp.arrays(np.float64, (k, n), elements=el)), fmt)
    r = call(gemm, a, b, pol)
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            assert classify(r[i, j]) == ieee_dot_class(a[i], b[:, j]), (a[i], b[:, j], r[i, j])


@pytest.mark.parametrize(
    ("args", "exc", "pattern"),
    [
        ((np.ones((2, 3)), np.ones((4, 2)), P32), ValueError, r"\(2, 3\).*\(4, 2\)"),
        ((np.ones(3), np.ones((3, 2)), P32), ValueError, r"a must be 2-D.*\(3,\)"),
        ((np.ones((2, 3)), np.ones((1, 3, 2)), P32), ValueError, r"b must be 2-D.*\(1, 3, 2\)"),
        ((np.ones((2, 3), int), np.ones((3, 2)), P32), TypeError, "a.*int64"),
        ((np.ones((2, 3)), np.ones((3, 2), bool), P32), TypeError, "b.*bool"),
        ((np.ones((2, 3), complex), np.ones((3, 2)), P32), TypeError, "a.*complex128"),
        ((np.ones((2, 3), object), np.ones((3, 2)), P32), TypeError, "a.*object"),
        ((np.full((2, 3), "x"), np.ones((3, 2)), P32), TypeError, "a.*<U1"),
        (([[1.0]], np.ones((1, 2)), P32), TypeError, "a must be a NumPy.*list"),
        ((1.0, np.ones((1, 2)), P32), TypeError, "a must be a NumPy.*float"),
        ((np.ones((2, 3)), np.ones((3, 2)), "float32"), TypeError, "PrecisionPolicy.*str"),
        ((np.ones((2, 3)), np.ones((3, 2)), None), TypeError, "PrecisionPolicy.*NoneType"),
    ],
)
def test_gemm_rejects(args, exc, pattern):
    assert isinstance(rejects(gemm, *args, match=pattern), exc)


def small_ints(shape, lo=-4, hi=4):
    return hnp.arrays(np.float64, shape, elements=st.integers(lo, hi).map(float))


@pytest.mark.parametrize("fmt", FORMATS)
@SOME
@given(data=st.data())
def test_linear_forward_backward_are_exact_on_small_integers(fmt, data):
    """Integer-valued inputs keep every product and sum exact in every format (|values| <= 4,
    at most 5 terms: below 2**8), so the layer must equal Python integer arithmetic."""
    pol = PrecisionPolicy.uniform(fmt)
    n, i, o = (data.draw(st.integers(0, 5)) for _ in range(3))
    x, w = (
        in_format(data.draw(small_ints((n, i))), fmt),
        in_format(data.draw(small_ints((i, o))), fmt),
    )
    b = in_format(data.draw(small_ints((o,))), fmt) if data.draw(st.booleans()) else None
    dy = in_format(data.draw(small_ints((n, o))), fmt)
    X, W, DY = (v.astype(np.float64).astype(int) for v in (x, w, dy))
    y, cache = call(linear_forward, x, w, b, pol)
    want = X @ W + (0 if b is None else b.astype(np.float64).astype(int))
    np.testing.assert_array_equal(y.astype(np.float64), want)
    dx, dw, db = call(linear_backward, dy, cache, pol)
    np.testing.assert_array_equal(dx.astype(np.float64), DY @ W.T)
    np.testing.assert_array_equal(dw.astype(np.float64), X.T @ DY)
    if b is None:
        assert db is None
    else:
        np.testing.assert_array_equal(db.astype(np.float64), DY.sum(axis=0))
    assert call(linear_backward, dy, cache, pol, need_dx=False)[0] is None
    for name, _ in layouts(x) if x.ndim == 2 and x.size and w.size and dy.size else []:
        if name in ("fortran", "transposed view"):
            continue  # BLAS's transposed kernel (exact here anyway, but not promised)
        vx, vw, vdy = dict(layouts(x))[name], dict(layouts(w))[name], dict(layouts(dy))[name]
        vb = None if b is None else dict(layouts(b))[name]
        y2, c2 = call(linear_forward, vx, vw, vb, pol)
        same(y2, y, name)
        same(call(linear_backward, vdy, c2, pol), (dx, dw, db), name)


def test_linear_rejects():
    x, w = np.ones((3, 4)), np.ones((4, 2))
    rejects(linear_forward, x, w, np.ones(3), P32, match=r"b.*\(2,\).*\(3,\)")
    rejects(linear_forward, x, w, np.ones((1, 2)), P32, match=r"b must be 1-D.*\(1, 2\)")
    rejects(linear_forward, x, w, 1.0, P32, match="b must be a NumPy.*float")
    rejects(linear_forward, x, w, np.ones(2, complex), P32, match="b.*complex")
    rejects(linear_forward, x, np.ones((5, 2)), None, P32, match=r"\(3, 4\).*\(5, 2\)")
    _, cache = linear_forward(x, w, None, P32)
    rejects(linear_backward, np.ones((3, 5)), cache, P32, match=r"dy.*\(3, 2\).*\(3, 5\)")
    rejects(linear_backward, np.ones((4, 2)), cache, P32, match=r"dy.*\(3, 2\).*\(4, 2\)")
    rejects(linear_backward, np.ones(2), cache, P32, match=r"dy must be 2-D")
    rejects(linear_backward, [[1.0, 1.0]] * 3, cache, P32, match="dy must be a NumPy.*list")
    rejects(linear_backward, np.ones((3, 2), complex), cache, P32, match="dy.*complex")
    rejects(linear_backward, np.ones((3, 2)), None, P32, match="cache.*linear_forward")
    rejects(linear_backward, np.ones((3, 2)), (x, w), P32, match="cache.*linear_forward")


@pytest.mark.parametrize("fmt", FORMATS)
@SOME
@given(data=st.data())
def test_gather_forward_backward_are_exact_on_small_integers(fmt, data):
    pol = PrecisionPolicy.uniform(fmt)
    n_rows = data.draw(st.integers(1, 6))
    n, k, o = (
        data.draw(st.integers(0, 5)),
        data.draw(st.integers(1, 3)),
        data.draw(st.integers(1, 4)),
    )
    idx = data.draw(
        hnp.arrays(
            data.draw(st.sampled_from([np.int64, np.int32, np.uint8])),
            (n, k),
            elements=st.integers(0, n_rows - 1),
        )
    )
    w = in_format(data.draw(small_ints((n_rows, o))), fmt)
    b = in_format(data.draw(small_ints((o,))), fmt) if data.draw(st.booleans()) else None
    dh = in_format(data.draw(small_ints((n, o))), fmt)
    W, DH = w.astype(np.float64).astype(int), dh.astype(np.float64).astype(int)
    h, cache = call(gather_forward, idx, w, b, pol)
    want = sum(W[idx[:, j]] for j in range(k)) + (
        0 if b is None else b.astype(np.float64).astype(int)
    )
    np.testing.assert_array_equal(h.astype(np.float64), want)
    plan = call(GatherPlan.build, idx, n_rows)
    assert (plan.n_rows, plan.n_samples) == (n_rows, n)
    dw, db = call(gather_backward, dh, cache, plan, pol)
    want_dw = np.zeros((n_rows, o), dtype=int)
    for i in range(n):
        for j in range(k):
            want_dw[idx[i, j]] += DH[i]
    np.testing.assert_array_equal(dw.astype(np.float64), want_dw)
    if b is not None:
        np.testing.assert_array_equal(db.astype(np.float64), DH.sum(axis=0))
    if n:
        for name, vidx in layouts(idx):
            vw = dict(layouts(w))[name]
            h2, c2 = call(gather_forward, vidx, vw, b, pol)
            same(h2, h, name)
            p2 = call(GatherPlan.build, vidx, n_rows)
            same(p2.matrix, plan.matrix, name)
            same(call(gather_backward, dict(layouts(dh))[name], c2, p2, pol), (dw, db), name)


def test_gather_non_finite_weights_propagate():
    w = np.array([[np.inf, 1.0], [-np.inf, np.nan], [1e38, 3e38]], dtype=np.float32)
    idx = np.array([[0, 1], [2, 2], [0, 0]])
    h, _ = call(gather_forward, idx, w, None, P32)
    # inf + -inf = NaN, NaN stays, 3e38 + 3e38 overflows to inf: IEEE, no warning.
    two = np.float32(1e38) * np.float32(2)
    np.testing.assert_array_equal(
        h, np.array([[np.nan, np.nan], [two, np.inf], [np.inf, 2.0]], np.float32)
    )


def test_gather_rejects():
    w = np.ones((4, 3))
    idx = np.array([[0, 1], [2, 3]])
    for bad, pattern in [
        (np.array([[0, 4]]), r"\[0, 4\).*\[0, 4\]"),
        (np.array([0, 1]), r"2-D integer.*\(2,\)"),
        (np.zeros((2, 0), int), r"at least one column.*\(2, 0\)"),
        (np.array([[0.0, 1.0]]), "2-D integer.*float64"),
        (np.array([[True, False]]), "2-D integer.*bool"),
        (np.array([[0, 1]], dtype=object), "2-D integer.*object"),
        ([[0, 1.5]], "2-D integer.*float64"),
    ]:
        rejects(gather_forward, bad, w, None, P32, match=pattern)
        rejects(GatherPlan.build, bad, 4, match=pattern if "[0, 4)" not in pattern else r"\[0, 4\)")
    rejects(gather_forward, idx, np.ones((4, 3), int), None, P32, match="w.*int64")
    rejects(gather_forward, idx, np.ones(4), None, P32, match=r"w must be 2-D")
    rejects(gather_forward, idx, w, np.ones(4), P32, match=r"b.*\(3,\).*\(4,\)")
    rejects(gather_forward, idx, w, None, None, match="PrecisionPolicy")
    for n_rows, pattern in [
        (0, r"\[1, 2\*\*63\).*0"),
        (-1, "-1"),
        (2**70, "1180591620717411303424"),
        (2.0, "integer.*2.0"),
        (True, "integer.*True"),
        ("4", "integer.*'4'"),
        (None, "integer.*None"),
    ]:
        rejects(GatherPlan.build, idx, n_rows, match=pattern)
    _, cache = gather_forward(idx, w, None, P32)
    plan = GatherPlan.build(idx, 4)
    rejects(gather_backward, np.ones((3, 3)), cache, plan, P32, match="2 samples.*3 samples")
    rejects(
        gather_backward,
        np.ones((2, 3)),
        cache,
        GatherPlan.build(idx, 5),
        P32,
        match="5 rows.*4 rows",
    )
    rejects(gather_backward, np.ones(2), cache, plan, P32, match="dh must be 2-D")
    rejects(gather_backward, [[1.0] * 3] * 2, cache, plan, P32, match="dh must be a NumPy.*list")
    rejects(gather_backward, np.ones((2, 3), complex), cache, plan, P32, match="dh.*complex")
    rejects(gather_backward, np.ones((2, 3)), cache, None, P32, match="GatherPlan.*NoneType")
    rejects(gather_backward, np.ones((2, 3)), None, plan, P32, match="cache.*gather_forward")


def test_negative_indices_wrap_on_the_hot_path():
    """Documented: the hot path does not scan index values (a scan per step is what the
    Dataset and GatherPlan.build do once); a negative index counts from the end, as in NumPy.
    The audit, GatherPlan.build and dense_inputs refuse negative indices."""
    w = np.arange(8.0).reshape(4, 2)
    h, _ = call(gather_forward, np.array([[0, -1]]), w, None, P32)
    same(h, call(gather_forward, np.array([[0, 3]]), w, None, P32)[0])
    rejects(GatherPlan.build, np.array([[0, -1]]), 4, match=r"\[0, 4\).*-1")
    z = np.array([[0.0, -1.0, -2.0]], dtype=np.float32)
    same(call(loss_forward, z, np.array([-1]))[0], call(loss_forward, z, np.array([2]))[0])
    rejects(D.dense_inputs, np.array([[0, -1]]), "onehot", 4, match="-1")


@pytest.mark.parametrize("fmt", FORMATS)
@MANY
@given(data=st.data())
@example(data=[0.0, -0.0, 5e-45, -5e-45, np.inf, -np.inf, np.nan, 1.0, -1.0])
def test_relu_forward_backward_semantics(fmt, data):
    """relu = max(x, 0) exactly (NaN stays NaN); backward passes dy where y > 0, else ±0."""
    if isinstance(data, list):  # pinned: signed zeros, float32 subnormals, specials
        x = in_format(data, fmt)
        dy = in_format(np.arange(1.0, x.size + 1) * (-1.0) ** np.arange(x.size), fmt)
    else:
        shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
        x, dy = data.draw(arrays_of(fmt, shape)), data.draw(arrays_of(fmt, shape))
    y, cache = call(relu_forward, x)
    assert y is cache and y.dtype == x.dtype and y.shape == x.shape
    xf, yf, dyf = (np.asarray(v, dtype=np.float64) for v in (x, y, dy))
    with np.errstate(invalid="ignore"):
        pos = xf > 0
        np.testing.assert_array_equal(yf[pos], xf[pos])
        assert (yf[~pos & ~np.isnan(xf)] == 0).all() and np.isnan(yf[np.isnan(xf)]).all()
        g = np.asarray(call(relu_backward, dy, y), dtype=np.float64)
        live = yf > 0
        np.testing.assert_array_equal(g[live], dyf[live])
        dead = ~live
        fin = np.isfinite(dyf)
        assert (g[dead & fin] == 0).all()  # ±0
        assert np.isnan(g[dead & ~fin]).all()  # documented: inf · 0 (and NaN · 0) = NaN
    if x.ndim:
        check_layouts(relu_forward, [x])
        check_layouts(relu_backward, [dy, y])


def test_relu_rejects():
    for bad, pattern in [
        (np.array([1, -1]), "int64"),
        (np.array([True]), "bool"),
        (np.array([1j]), "complex"),
        (np.array([1.0], dtype=object), "object"),
        (np.array(["a"]), "<U1"),
        ([1.0, -1.0], "NumPy.*list"),
        (1.0, "NumPy.*float"),
    ]:
        rejects(relu_forward, bad, match=pattern)
        rejects(relu_backward, bad, np.ones(2), match=pattern)
    rejects(relu_backward, np.ones(3), np.ones(2), match=r"same shape.*\(3,\).*\(2,\)")
    rejects(relu_backward, np.ones((2, 1)), np.ones(2), match=r"same shape.*\(2, 1\).*\(2,\)")


@pytest.mark.parametrize("fmt", FORMATS)
@MANY
@given(data=st.data())
@example(data=(np.array([-np.inf, np.inf, np.nan, -0.0, 3e38, -3e38, -1e-45]), 0.0))
@example(data=(np.array([-1e308, 1e308, -5e-324]), 1e-30))
def test_stablemax_s_against_exact(fmt, data):
    if isinstance(data, tuple):
        x, eps = in_format(data[0], fmt), data[1]
    else:
        shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=5))
        x = data.draw(st.one_of(arrays_of(fmt, shape), wild(shape)))
        eps = data.draw(st.sampled_from([0.0, 1e-30, 2.0**-30, 0.5]))
    s, d = call(stablemax_s, x, fmt, eps=eps)
    f = get_format(fmt)
    assert s.dtype == f.carrier and s.shape == np.shape(x) and d.shape == s.shape
    with np.errstate(over="ignore"):
        xq = carrier64(quantize(x, fmt))
    epsq = float(quantize(np.float64(eps), fmt if fmt != "longdouble" else "float64"))
    flat_s, flat_x = np.ravel(s), np.ravel(xq)
    for si, xi in zip(flat_s, flat_x, strict=True):
        if np.isnan(xi):
            assert np.isnan(si)
        elif np.isinf(xi):
            assert si == (np.inf if xi > 0 else 0.0)  # documented: s(inf) = inf, s(-inf) = 0
        else:
            want = exact.round_exact(exact.stablemax_s(xi, eps=epsq), "float64")
            want = float(want) if np.isfinite(want) else math.inf
            # x + 1 is one rounding; 1 / (1 - x + eps) at most three: 4u relative, plus a
            # subnormal quantum (and the overflow of max + 1 to the format's max).
            tol = 4 * f.unit_roundoff * abs(want) + float(
                f.smallest_subnormal if fmt != "longdouble" else 0
            )
            if fmt == "longdouble":
                # The comparison happens in float64 (float(si) and the float64-rounded want):
                # each side may round by half a float64 ulp.
                tol += 2.0**-52 * abs(want)
            assert abs(float(si) - want) <= tol or (math.isinf(want) and si == f.max), (
                xi,
                si,
                want,
            )
    if np.ndim(x):
        check_layouts(stablemax_s, [np.asarray(x)], fmt=fmt, eps=eps)


@pytest.mark.parametrize(
    ("eps", "exc", "pattern"),
    [
        (-1.0, ValueError, "eps.*-1.0"),
        (math.nan, ValueError, "eps.*nan"),
        (math.inf, ValueError, "eps.*inf"),
        (None, TypeError, "eps.*None"),
        ("0", TypeError, "eps.*'0'"),
        (1j, TypeError, "eps.*1j"),
        (True, TypeError, "eps.*True"),
        (np.array([0.0, 1.0]), TypeError, "eps"),
    ],
)
def test_stablemax_eps_is_validated(eps, exc, pattern):
    z = np.array([[0.0, -1.0]])
    for fn, args, kw in [
        (stablemax_s, (z, "float32"), {}),
        (collapse_mask, (z, "float32"), {"kind": "stablemax"}),
        (loss_forward, (z, np.array([0])), {"kind": "stablemax"}),
    ]:
        assert isinstance(rejects(fn, *args, eps=eps, match=pattern, **kw), exc)


def test_collapse_mask_and_stablemax_s_reject():
    z = np.zeros((2, 3))
    rejects(collapse_mask, z, "float32", kind="sparsemax", match="'sparsemax'")
    rejects(collapse_mask, z, "float32", order="backwards", match="'backwards'")
    rejects(collapse_mask, z, None, match="unknown format None")
    rejects(collapse_mask, z, "int8", match="'int8'")
    rejects(stablemax_s, z, None, match="unknown format None")
    rejects(stablemax_s, np.array([1, 2]), "float32", match="int64")
    rejects(stablemax_s, "x", "float32", match="<U1")
    same(
        call(stablemax_s, [[-1.0, 0.0]], "float64"),
        call(stablemax_s, np.array([[-1.0, 0.0]]), "float64"),
    )


# --- losses -----------------------------------------------------------------------------------


def exact_loss_and_grad(zq, y, kind, eps):
    z64 = np.asarray(zq, dtype=np.float64)
    if kind == "stablemax":
        lx = exact.stablemax_cross_entropy(z64, y, eps=eps)
        gx = exact.stablemax_cross_entropy_grad(z64, y, eps=eps)
    else:
        lx, gx = exact.cross_entropy(z64, y), exact.cross_entropy_grad(z64, y)
    with np.errstate(over="ignore"):
        return exact.round_exact(lx, "float64"), exact.round_exact(gx, "float64")


def stablemax_overflow(cache, y):
    """Rows whose StableMax normaliser S overflows the loss format, or whose backward needs
    1/S or 1/s_y beyond its range."""
    s, _ = cache.state
    rows = np.arange(len(y))
    with np.errstate(all="ignore"):
        inv = [quantize(1 / carrier64(v), cache.fmt) for v in (cache.normaliser, s[rows, y])]
    return np.isinf(cache.normaliser) | np.isinf(inv[0]) | np.isinf(inv[1])


def loss_tolerances(zq, y, kind, eps, fmt, L):
    """Absolute error allowed on the loss and on each logit-gradient entry, from the formula
    of each kind (see the module docstring of numstab.functional) with a factor 2 of slack:
    softmax: |d_y|u from z - m, (C + 4)u from the sum of exps, u|lse| and u|loss| roundings;
    StableMax: (C + 4)u relative on p_y = s_y / S. Gradients: the relative error of each
    probability, plus u absolute where ``p_y - 1`` or ``1/S - 1/s_y`` cancels."""
    f = get_format(fmt)
    u, q = f.unit_roundoff, float(f.smallest_subnormal) if fmt != "longdouble" else 0.0
    z = np.asarray(zq, dtype=np.float64)
    n, c = z.shape
    rows = np.arange(n)
    with np.errstate(all="ignore"):
        m = z.max(axis=1, keepdims=True)
        d = np.abs(z - m)
        lnc = math.log(c) + 1
        if kind == "stablemax":
            tl = 2 * u * (c + 8 + L)
            tg_rel = np.full(z.shape, 2 * u * (c + 12.0))
        else:
            tl = 2 * u * (2 * d[rows, y] + 3 * lnc + c + 8) + 2 * q
            tg_rel = 2 * u * (2 * d + 3 * lnc + c + 8)
    return tl, tg_rel, u, q


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("kind", "eps"),
    [("softmax", 0.0), ("softmax_stable", 0.0), ("stablemax", 0.0), ("stablemax", 1e-30)],
)
@SOME
@given(data=st.data())
@example(data=(np.array([[0.0, -30.0, -30.0]]), [0]))
@example(data=(np.array([[3e38, -3e38], [1e-45, 0.0]]), [1, 0]))
@example(data=(np.array([[1e308, -1e308]]), [0]))
@example(data=(np.array([[np.nan, 0.0], [np.inf, 0.0], [-np.inf, -np.inf]]), [0, 1, 0]))
@example(data=(np.array([[5.0], [-np.inf]]), [0, 0]))
@example(data=(np.zeros((0, 7)), []))
def test_loss_forward_backward_against_exact(fmt, kind, eps, data):
    if isinstance(data, tuple):
        z, y = in_format(data[0], fmt), np.array(data[1], dtype=np.int64)
    else:
        z = data.draw(logits_any(fmt, max_rows=3, max_cols=6))
        y = data.draw(hnp.arrays(np.int64, z.shape[0], elements=st.integers(0, z.shape[1] - 1)))
    f = get_format(fmt)
    loss, cache = call(loss_forward, z, y, kind=kind, fmt=fmt, eps=eps)
    assert isinstance(cache, LossCache) and loss.dtype == f.carrier and loss.shape == y.shape
    g = call(loss_backward, cache, 1.0)
    assert g.dtype == f.carrier and g.shape == z.shape
    with np.errstate(over="ignore"):
        zq = carrier64(quantize(z if z.dtype != BF16 else z.astype(np.float32), fmt))
    # Documented special values: a NaN or +inf logit makes the row's loss NaN or inf (IEEE).
    bad = np.isnan(zq).any(axis=1) | np.isposinf(zq).any(axis=1)
    assert (np.isnan(loss[bad]) | np.isinf(loss[bad])).all()
    fin = np.isfinite(zq).all(axis=1)
    assert not np.isnan(loss[fin]).any() and (loss[fin] >= 0).all()
    # Documented limitations (docs/reliability.md) of StableMax evaluated in the format:
    # S = Σ s(z) overflows for logits near the format's max (two float64 logits of 2**1023:
    # loss inf), and the backward's 1/S or 1/s_y overflows for logits near -max in float16
    # (s = 1/65505, 1/s rounds to inf: the gradient row is NaN). Every other finite row has
    # numbers, checked against the exact values below.
    over = stablemax_overflow(cache, y) if kind == "stablemax" else np.zeros(len(y), bool)
    assert not np.isnan(g[fin & ~over]).any(), "no silent NaN for finite logits"
    fin &= ~over
    if fin.any():
        zf, yf = zq[fin], y[fin]
        at = (np.arange(len(yf)), yf)
        lx, gx = exact_loss_and_grad(zf, yf, kind, eps)
        tl, tg_rel, u, q = loss_tolerances(zf, yf, kind, eps, fmt, lx)
        with np.errstate(over="ignore"):  # longdouble beyond float64: inf, compared as such
            got = np.asarray(loss[fin], dtype=np.float64)
            gg = np.asarray(g[fin], dtype=np.float64)
        top = float(min(f.max, np.finfo(np.float64).max))
        ok_range = lx <= top / 4  # beyond: the loss may round to inf
        if kind == "stablemax":  # p_y subnormal in the format: its relative error is unbounded
            ok_range &= lx < -(f.emin + f.precision) * math.log(2) - 1
        with np.errstate(invalid="ignore"):
            err = np.abs(got - lx)
            tl = tl + 2.0**-52 * np.abs(lx)  # the comparison is in float64 (longdouble runs)
        assert (err[ok_range] <= np.broadcast_to(tl, lx.shape)[ok_range]).all(), (zf, yf, got, lx)
        assert (got[~ok_range] >= top / 8).all() or kind == "stablemax"
        with np.errstate(all="ignore"):
            tg = np.where(gx == 0, 0.0, (tg_rel + 2.0**-52) * np.abs(gx)) + 2 * q
            tg[at] += 2 * u  # p_y - 1 (or 1/S - 1/s_y) cancels: u absolute
            if kind != "stablemax":  # ... after p_y's own error, relative to p_y = 1 + g_y
                tg[at] += tg_rel[at] * np.abs(1 + gx[at])
            if kind == "stablemax":  # ... times s'(z_y) / s_y
                sv = np.where(zf >= 0, zf + 1, 1 / (1 - np.minimum(zf, 0) + eps))
                ratio = np.where(zf >= 0, 1 / sv, sv)
                tg[at] += 4 * u * ratio[at]
                # s'(z) = s**2 may be subnormal in the format: q absolute, times 1/S (1/s_y)
                tg += 2 * q / sv.sum(axis=1, keepdims=True)
                tg[at] += 2 * q / sv[at]
            keep = np.broadcast_to(ok_range[:, None], gx.shape)
            bad_g = (np.abs(gg - gx) > tg) & keep
        assert not bad_g.any(), (zf, yf, gg, gx, tg)
    # Layouts and read-only logits: bit for bit (labels as given).
    if z.size:
        for name, view in layouts(z):
            l2, c2 = call(loss_forward, view, y, kind=kind, fmt=fmt, eps=eps)
            same(l2, loss, name)
            same(call(loss_backward, c2, 1.0), g, name)
        same(call(loss_forward, z, read_only(y), kind=kind, fmt=fmt, eps=eps)[0], loss, "labels")
    # The backward never changes its cache (so it can be called twice).
    same(call(loss_backward, cache, 1.0), g, "second backward")


def test_loss_forward_and_backward_reject():
    z = np.array([[0.0, -1.0], [1.0, 2.0]], dtype=np.float32)
    y = np.array([0, 1])
    rejects(loss_forward, z, y, fmt=None, match="unknown format None")
    rejects(loss_forward, z, y, fmt="float8", match="'float8'")
    rejects(loss_forward, z, y, kind="sparsemax", match="'sparsemax'")
    rejects(loss_forward, z, y, order="random", match="'random'")
    _, cache = loss_forward(z, y)
    for dloss, pattern in [
        (None, "dloss.*None"),
        ("1", "dloss.*'1'"),
        (1j, "dloss.*1j"),
        (True, "dloss.*True"),
        (np.ones(3), r"dloss.*\(2,\).*\(3,\)"),
        (np.ones((1, 2)), r"dloss.*\(1, 2\)"),
    ]:
        rejects(loss_backward, cache, dloss, match=pattern)
    rejects(loss_backward, None, 1.0, match="LossCache.*NoneType")
    rejects(loss_backward, (z, y), 1.0, match="LossCache.*tuple")
    # Accepted: a scalar, an array (N,), integers; NaN upstream gives NaN (IEEE).
    g1 = call(loss_backward, cache, 1.0)
    same(call(loss_backward, cache, np.array([1, 1])), g1)
    same(call(loss_backward, cache, 1), g1)
    assert np.isnan(call(loss_backward, cache, math.nan)).all()


@MANY
@given(
    loss=st.one_of(
        hnp.arrays(np.float32, st.integers(0, 20), elements=st.floats(0, width=32)),
        hnp.arrays(np.float64, st.integers(0, 20), elements=st.floats(0, 1e308)),
        hnp.arrays(np.float64, st.integers(0, 5), elements=st.floats(width=64)),
    )
)
@example(loss=np.array([1e308, 1e308, 1e308]))
@example(loss=np.array([np.inf, 1.0]))
@example(loss=np.array([np.inf, -np.inf]))
@example(loss=np.zeros(0, dtype=np.float32))
def test_reduce_loss_mean_against_exact(loss):
    m = call(reduce_loss, loss)
    assert call(reduce_loss, loss, "none") is loss
    if loss.size == 0:
        assert math.isnan(m)  # documented: the mean of no losses
        return
    if not np.isfinite(loss).all():
        with np.errstate(all="ignore"):
            ref = float(np.sum(loss.astype(np.float64)))  # inf / NaN classification
        assert classify(m) == classify(ref)
        return
    want = sum(frac(v) for v in loss) / len(loss)
    # float64 pairwise mean: γ_n relative on a sum of non-negative terms (or |x| for signed).
    tol = gamma(len(loss) + 1, 2.0**-53) * float(sum(abs(frac(v)) for v in loss) / len(loss))
    assert abs(frac(m) - want) <= Fraction(tol) + Fraction(2.0**-1074), (loss, m, float(want))
    check_layouts(reduce_loss, [loss])


def test_reduce_loss_rejects_and_converts():
    assert call(reduce_loss, [1.0, 2.0]) == 1.5
    assert call(reduce_loss, np.array([1, 2])) == 1.5
    rejects(reduce_loss, np.ones((2, 2)), match=r"1-D.*\(2, 2\)")
    rejects(reduce_loss, 1.0, match=r"1-D.*\(\)")
    rejects(reduce_loss, np.array([True]), match="bool")
    rejects(reduce_loss, np.array([1j]), match="complex")
    rejects(reduce_loss, np.array(["a"]), match="<U1")
    rejects(reduce_loss, np.array([1.0], dtype=object), match="object")
    rejects(reduce_loss, np.ones(2), "sum", match="'sum'.*mean.*none")


# =============================================================================================
# numstab.data
# =============================================================================================


def brute_labels(p, op, a, b):
    if op == "add":
        return (a + b) % p
    if op == "sub":
        return (a - b) % p
    if op == "mul":
        return (a * b) % p
    return (a * pow(b, -1, p)) % p


PRIMES = [2, 3, 5, 7, 11, 13, 17, 19, 23]


@MANY
@given(
    p=st.integers(2, 23),
    op=st.sampled_from(D.MODULAR_OPS),
    encoding=st.sampled_from(D.MODULAR_ENCODINGS),
    permute=st.booleans(),
    seed=st.one_of(st.integers(0, 2**32), st.just(2**200)),
    f=st.floats(0.01, 0.99),
)
def test_modular_arithmetic_against_brute_force(p, op, encoding, permute, seed, f):
    permute = permute and encoding == "binary"
    n_total = p * p if op != "div" else p * (p - 1)
    kw = dict(train_fraction=f, seed=seed, encoding=encoding, permute_codes=permute)
    if op == "div" and p not in PRIMES:
        rejects(D.modular_arithmetic, p, op, match=f"prime.*p={p}", **kw)
        return
    if not 1 <= int(f * n_total) <= n_total - 1:
        rejects(D.modular_arithmetic, p, op, match="train_fraction.*empty", **kw)
        return
    ds = call(D.get_dataset, op, p=p, **kw)
    assert (
        ds.n_classes == p and ds.n_train == int(f * n_total) and ds.n_train + ds.n_test == n_total
    )
    codes = call(D.code_table, p, permute_codes=permute, seed=seed)
    decode = {int(c): v for v, c in enumerate(codes)}
    pairs = set()
    for x, y in [(ds.x_train, ds.y_train), (ds.x_test, ds.y_test)]:
        assert not x.flags.writeable and not y.flags.writeable  # read-only on construction
        for xi, yi in zip(x, y, strict=True):
            if encoding == "onehot":
                a, b = int(xi[0]), int(xi[1]) - p
            elif encoding == "tokens":
                a, b = int(xi[0]), int(xi[1])
            else:
                w = D.bit_width(p)
                bits = xi.astype(int)
                a = decode[int("".join(map(str, bits[:w])), 2)]
                b = decode[int("".join(map(str, bits[w:])), 2)]
            assert yi == brute_labels(p, op, a, b)
            pairs.add((a, b))
    assert len(pairs) == n_total  # every pair exactly once
    # The split is the documented permutation (an independent recomputation).
    perm = np.random.default_rng(seed).permutation(n_total)
    tr, te = call(D.split_indices, n_total, f, seed)
    np.testing.assert_array_equal(tr, perm[: ds.n_train])
    np.testing.assert_array_equal(te, perm[ds.n_train :])
    if encoding == "tokens":  # a sequence the model embeds: no dense form
        rejects(D.dense_inputs, ds.x_train, ds, match="no dense form")
        return
    dense = call(D.dense_inputs, ds.x_train, ds)
    assert dense.shape == (ds.n_train, ds.n_inputs) and dense.dtype == np.float32
    if encoding == "onehot":
        w1 = np.arange(ds.n_inputs * 3, dtype=np.float64).reshape(-1, 3)
        np.testing.assert_array_equal(dense @ w1, w1[ds.x_train[:, 0]] + w1[ds.x_train[:, 1]])
    else:
        np.testing.assert_array_equal(dense, ds.x_train)


@MANY
@given(n_bits=st.integers(1, 70), data=st.data())
def test_sparse_parity_against_brute_force(n_bits, data):
    k = data.draw(st.integers(1, n_bits))
    n_samples = data.draw(st.integers(2, min(2**n_bits, 40)))
    f = data.draw(st.floats(0.05, 0.95))
    seed = data.draw(st.integers(0, 2**40))
    if not 1 <= int(f * n_samples) <= n_samples - 1:
        rejects(D.sparse_parity, n_bits, k, n_samples, train_fraction=f, seed=seed, match="empty")
        return
    ds = call(D.sparse_parity, n_bits, k, n_samples, train_fraction=f, seed=seed)
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    assert x.dtype == np.float32 and set(np.unique(x)) <= {0.0, 1.0}
    assert len({row.tobytes() for row in x}) == n_samples  # distinct vectors
    np.testing.assert_array_equal(y, x[:, :k].astype(int).sum(axis=1) % 2)
    same(
        call(
            D.get_dataset,
            "parity",
            n_bits=n_bits,
            k=k,
            n_samples=n_samples,
            train_fraction=f,
            seed=seed,
        ).x_train,
        ds.x_train,
    )
    same(call(D.dense_inputs, ds.x_test, ds), ds.x_test)


@MANY
@given(p=st.integers(2, 300), seed=st.integers(0, 2**64), permute=st.booleans())
def test_code_table_is_the_documented_bijection(p, seed, permute):
    codes = call(D.code_table, p, permute_codes=permute, seed=seed)
    assert codes.dtype == np.int64 and sorted(codes.tolist()) == list(range(p))
    if permute:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
        np.testing.assert_array_equal(codes, rng.permutation(p))
    else:
        np.testing.assert_array_equal(codes, np.arange(p))


@MANY
@given(n=st.integers(2, 400), f=st.floats(0, 1), seed=st.integers(0, 2**70))
@example(n=2, f=0.5, seed=0)
@example(n=10, f=1e-300, seed=0)
@example(n=10, f=0.999999999, seed=0)
def test_split_indices_against_the_documented_permutation(n, f, seed):
    k = int(f * n)
    if not (0 < f < 1) or not 1 <= k <= n - 1:
        rejects(D.split_indices, n, f, seed, match=r"train_fraction=.*(open interval|empty)")
        return
    tr, te = call(D.split_indices, n, f, seed)
    perm = np.random.default_rng(seed).permutation(n)
    np.testing.assert_array_equal(np.concatenate([tr, te]), perm)
    assert tr.dtype == te.dtype == np.int64 and len(tr) == k


DATA_REJECTIONS = [
    # (call, pattern): every message names the argument and its value
    (lambda: D.modular_arithmetic(1), "p=1.*>= 2"),
    (lambda: D.modular_arithmetic(7.0), "p must be an integer.*7.0"),
    (lambda: D.modular_arithmetic(True), "p must be an integer.*True"),
    (lambda: D.modular_arithmetic("7"), "p must be an integer.*'7'"),
    (lambda: D.modular_arithmetic(np.array(7)), "p must be an integer"),
    (lambda: D.modular_arithmetic(7, "pow"), "op='pow'"),
    (lambda: D.modular_arithmetic(7, encoding="bits"), "encoding='bits'"),
    (lambda: D.modular_arithmetic(7, permute_codes=True), "permute_codes=True.*binary"),
    (lambda: D.modular_arithmetic(7, encoding="binary", permute_codes=1), "permute_codes.*bool"),
    (lambda: D.modular_arithmetic(7, train_fraction=1.0), "train_fraction=1.0"),
    (lambda: D.modular_arithmetic(7, train_fraction=math.nan), "train_fraction=nan"),
    (lambda: D.modular_arithmetic(7, train_fraction="0.4"), "train_fraction.*'0.4'"),
    (lambda: D.modular_arithmetic(7, seed=-1), "seed=-1"),
    (lambda: D.modular_arithmetic(7, seed=1.5), "seed must be an integer.*1.5"),
    (lambda: D.modular_arithmetic(8, "div"), "prime.*p=8"),
    (lambda: D.sparse_parity(0), "n_bits=0"),
    (lambda: D.sparse_parity(3, 4), "k=4.*n_bits=3"),
    (lambda: D.sparse_parity(3, 0), "k=0"),
    (lambda: D.sparse_parity(3, 1, 9), r"n_samples=9.*2\*\*n_bits = 8"),
    (lambda: D.sparse_parity(3, 1, 1), "n_samples=1"),
    (lambda: D.sparse_parity(3.0), "n_bits must be an integer.*3.0"),
    (lambda: D.sparse_parity(k=None), "k must be an integer.*None"),
    (lambda: D.get_dataset("pow"), "task='pow'"),
    (lambda: D.get_dataset(None), "task=None"),
    (lambda: D.get_dataset(["add"]), r"task=\['add'\]"),
    (lambda: D.get_dataset("add", op="mul"), "op='mul'"),
    (lambda: D.get_dataset("add", modulus=7), "modulus"),
    (lambda: D.get_dataset("parity", p=7), "'p'"),
    (lambda: D.split_indices(1, 0.5, 0), "n_total=1"),
    (lambda: D.split_indices(10, 0.5, None), "seed.*None"),
    (lambda: D.split_indices(10.0, 0.5, 0), "n_total must be an integer.*10.0"),
    (lambda: D.code_table(7, permute_codes=None), "permute_codes.*None"),
    (lambda: D.code_table(7, seed=-3), "seed=-3"),
    (lambda: D.code_table(1), "p=1"),
    # dense_inputs
    (lambda: D.dense_inputs(np.array([[0, 10]]), "onehot", 10), r"\[0, 10\].*\[0, 10\)"),
    (lambda: D.dense_inputs(np.array([[0.0, 1.0]]), "onehot", 10), "integer.*float64"),
    (lambda: D.dense_inputs(np.array([[True]]), "onehot", 10), "integer.*bool"),
    (lambda: D.dense_inputs(np.array([[0, 1]], dtype=object), "onehot", 10), "integer.*object"),
    (lambda: D.dense_inputs(np.array([0, 1]), "onehot", 10), r"2-D.*\(2,\)"),
    (lambda: D.dense_inputs(np.zeros((1, 2, 2), int), "onehot", 10), r"2-D.*\(1, 2, 2\)"),
    (lambda: D.dense_inputs(np.array([[0, 1]]), "onehot"), "n_inputs is required"),
    (
        lambda: D.dense_inputs(np.array([[0, 1]]), "onehot", 10.0),
        "n_inputs must be an integer.*10.0",
    ),
    (lambda: D.dense_inputs(np.array([[0, 1]]), "onehot", 0), "n_inputs=0"),
    (lambda: D.dense_inputs(np.array([[0, 1]]), "onehot", "10"), "n_inputs.*'10'"),
    (lambda: D.dense_inputs(np.ones((2, 6)), "binary", "6"), "n_inputs.*'6'"),
    (lambda: D.dense_inputs(np.ones((2, 6)), "binary", 6.5), "n_inputs.*6.5"),
    (lambda: D.dense_inputs(np.ones((2, 6)), "binary", 7), "6 columns.*n_inputs=7"),
    (lambda: D.dense_inputs(np.full((2, 3), 2.0), "bits"), "0 or 1.*2.0"),
    (lambda: D.dense_inputs(np.full((2, 3), np.nan), "bits"), "0 or 1.*nan"),
    (lambda: D.dense_inputs(np.full((2, 3), 1e308), "bits"), "0 or 1.*1e\\+308"),
    (lambda: D.dense_inputs(np.ones((2, 3), complex), "bits"), "0/1.*complex"),
    (lambda: D.dense_inputs(np.full((2, 3), "1"), "bits"), "0/1.*<U1"),
    (lambda: D.dense_inputs(np.ones((2, 3), object), "bits"), "0/1.*object"),
    (lambda: D.dense_inputs(np.ones((2, 3)), "spikes"), "encoding='spikes'"),
    (lambda: D.dense_inputs(np.ones((2, 3)), None), "encoding=None"),
    (lambda: D.dense_inputs(np.ones((2, 3)), "bits", dtype=None), "dtype.*None"),
    (lambda: D.dense_inputs(np.ones((2, 3)), "bits", dtype=bool), "dtype.*bool"),
    (lambda: D.dense_inputs(np.ones((2, 3)), "bits", dtype=complex), "dtype.*complex"),
    (lambda: D.dense_inputs(np.ones((2, 3)), "bits", dtype=object), "dtype.*object"),
    (lambda: D.dense_inputs(np.ones((2, 3)), "bits", dtype="U1"), "dtype.*<U1"),
    (lambda: D.dense_inputs(np.ones((2, 3)), "bits", dtype="float8"), "float8"),
]


@pytest.mark.parametrize("case", range(len(DATA_REJECTIONS)))
def test_data_rejections_name_the_argument(case):
    fn, pattern = DATA_REJECTIONS[case]
    rejects(fn, match=pattern)


@SOME
@given(
    x=hnp.arrays(
        st.sampled_from([np.int64, np.int8, np.uint16]),
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=5),
        elements=st.integers(0, 9),
    ),
    dtype=st.sampled_from([np.float32, np.float64, np.int32, np.float16, BF16]),
)
def test_dense_inputs_onehot_counts_and_layouts(x, dtype):
    out = call(D.dense_inputs, x, "onehot", 10, dtype=dtype)
    assert out.shape == (x.shape[0], 10) and out.dtype == np.dtype(dtype)
    want = np.zeros((x.shape[0], 10), dtype=int)
    for i, row in enumerate(x):
        for v in row:
            want[i, v] += 1
    np.testing.assert_array_equal(out.astype(np.float64), want)
    if x.size:
        check_layouts(D.dense_inputs, [x], dataset_or_encoding="onehot", n_inputs=10, dtype=dtype)
    bits = (x % 2).astype(np.float32)
    same(call(D.dense_inputs, bits, "bits", dtype=dtype), bits.astype(dtype))
    if bits.shape[1]:
        same(
            call(D.dense_inputs, bits.tolist() if bits.size else bits, "bits", bits.shape[1]), bits
        )
    else:
        rejects(D.dense_inputs, bits, "bits", 0, match="n_inputs=0")
