"""Tests for numstab.exact, the mpmath reference.

Tolerances are stated in units of ``2**-prec``: every function of ``numstab.exact`` promises a
relative error below ``2**(1 - prec)`` (one ulp at ``prec`` bits, see the module docstring), so
two such values that should agree in exact arithmetic may differ by ``2 * 2**(1 - prec)``
relative. Independent references are either exact (``fractions.Fraction``) or mpmath at a much
higher precision, whose own error is negligible next to that.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import mpmath
import numpy as np
import pytest
import scipy.special
from helpers import frac
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mpmath import libmp

from numstab import exact as ex
from numstab.precision import available_formats, get_format

BF16 = ml_dtypes.bfloat16
HAS_LD = "longdouble" in available_formats()
needs_ld = pytest.mark.skipif(not HAS_LD, reason="longdouble is not x87 80-bit here")
FAST = settings(max_examples=40, deadline=None, database=None)

# A private high-precision context for references (never the global mpmath.mp).
HI = mpmath.MPContext()
HI.prec = 1200


def to_mpf(f: Fraction):
    """Exact mpf (of HI) of a dyadic Fraction."""
    d = f.denominator
    assert d & (d - 1) == 0, "not dyadic"
    return HI.make_mpf(libmp.from_man_exp(f.numerator, -(d.bit_length() - 1)))


def ref_round(v: Fraction, fmt):
    """Round-to-nearest-even of an exact Fraction, by Fraction arithmetic (independent)."""
    f = get_format(fmt)
    if v == 0:
        return Fraction(0)
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    q = Fraction(2) ** (max(e, f.emin) - f.precision + 1)
    k = math.floor(a / q)
    r = a / q - k
    if r > Fraction(1, 2) or (r == Fraction(1, 2) and k % 2 == 1):
        k += 1
    res = k * q
    if res > (2**f.precision - 1) * Fraction(2) ** (f.emax - f.precision + 1):
        return -math.inf if v < 0 else math.inf
    return -res if v < 0 else res


def as_ref(x):
    """A rounded NumPy scalar as a Fraction or ±inf, for comparison with ref_round."""
    if np.isinf(x):
        return math.inf if x > 0 else -math.inf
    return frac(x)


def rel_err(a, b):
    """|a - b| / |b| for mpf values, evaluated in HI."""
    a, b = HI.mpf(a), HI.mpf(b)
    if b == 0:
        return abs(a)
    return abs(a - b) / abs(b)


def ulps(prec, n=1):
    return HI.ldexp(n, -prec)


# --- round_exact: exhaustive 16-bit checks ------------------------------------------------


def _all_finite_nonneg(dtype):
    bits = np.arange(0x8000, dtype=np.uint16)
    v = bits.view(dtype)
    return v[np.isfinite(v.astype(np.float32))]


@pytest.mark.parametrize("name, dtype", [("float16", np.float16), ("bfloat16", BF16)])
def test_round_exact_all_16bit_patterns_match_astype(name, dtype):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(invalid="ignore"):
        vals = bits.view(dtype).astype(np.float64)  # exact widening, NaN and inf included
    got = ex.round_exact(vals, name)
    want = vals.astype(dtype)
    assert got.dtype == np.dtype(dtype)
    gb, wb = got.view(np.uint16), want.view(np.uint16)
    nan = np.isnan(vals)
    zero = vals == 0  # -0.0 becomes mpf 0, which rounds to +0.0 (mpf has no signed zero)
    assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
    assert np.array_equal(gb[~nan & ~zero], wb[~nan & ~zero])
    assert np.all(gb[zero] == 0)


@pytest.mark.parametrize("name, dtype", [("float16", np.float16), ("bfloat16", BF16)])
def test_round_exact_all_16bit_midpoints_match_astype(name, dtype):
    # Midpoints between neighbours (and between max and 2**(emax+1), the overflow threshold)
    # have p + 1 <= 12 significant bits: exact in float64, and in float32, so even a cast that
    # goes through float32 (as some ml_dtypes releases do) rounds only once here.
    f = get_format(name)
    lo = _all_finite_nonneg(dtype).astype(np.float64)
    hi = np.append(lo[1:], math.ldexp(1.0, f.emax + 1))
    mid = (lo + hi) / 2
    assert np.all((lo < mid) & (mid < hi))
    vals = np.concatenate([mid, -mid])
    got = ex.round_exact(vals, name)
    with np.errstate(over="ignore"):
        want = vals.astype(dtype)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    # Ties go to the even neighbour: the result's last significand bit is 0 (or it is inf).
    gb = got.view(np.uint16)[: mid.size]
    assert np.all(((gb & 1) == 0) | np.isinf(got[: mid.size].astype(np.float32)))


# --- round_exact: Fraction reference ------------------------------------------------------


def _random_patterns(name, rng, n):
    f = get_format(name)
    if name == "longdouble":
        man = rng.integers(1 << 62, 1 << 63, n, dtype=np.uint64) * 2 + 1
        m = np.ldexp((man >> np.uint64(32)).astype(np.longdouble), 32) + (
            man & np.uint64(0xFFFFFFFF)
        ).astype(np.longdouble)
        e = rng.integers(f.emin - 80, f.emax - 63, n)
        v = np.ldexp(m, e)  # includes subnormals (rounded by ldexp, still valid values)
        return v * np.where(rng.random(n) < 0.5, -1, 1).astype(np.longdouble)
    nbits = 8 * f.dtype.itemsize
    uint = {16: np.uint16, 32: np.uint32, 64: np.uint64}[nbits]
    raw = rng.integers(0, 1 << min(nbits, 63), n, dtype=np.uint64, endpoint=False)
    if nbits == 64:
        raw = raw * 2 + rng.integers(0, 2, n, dtype=np.uint64)
    v = raw.astype(uint).view(f.dtype)
    with np.errstate(invalid="ignore"):
        return v[np.isfinite(v.astype(np.float64) if nbits < 64 else v)]


def _next_up(x, name):
    if name == "bfloat16":
        b = x.view(np.uint16).copy()
        pos = x.astype(np.float32) >= 0
        b = np.where(pos, b + 1, b - 1).astype(np.uint16)
        return b.view(BF16)
    return np.nextafter(x, np.array(np.inf, dtype=x.dtype))


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32"])
def test_round_exact_beside_midpoints_vs_fraction(name):
    # For the narrow formats, midpoints are exact float64 values; the float64 neighbours of a
    # midpoint (1 float64 ulp away) must round to the nearer neighbour, not by the tie rule.
    rng = np.random.default_rng(1)
    f = get_format(name)
    x = _random_patterns(name, rng, 3000)
    x = x[np.abs(x.astype(np.float64)) < float(f.max)]
    nxt = _next_up(x, name)
    mid = (x.astype(np.float64) + nxt.astype(np.float64)) / 2
    vals = np.concatenate(
        [mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf), x.astype(np.float64)]
    )
    got = ex.round_exact(vals, name)
    for v, g in zip(vals.tolist(), got, strict=True):
        assert as_ref(g) == ref_round(Fraction(v), name), (name, v)
    if name != "bfloat16":  # NumPy's float64 -> float16/float32 casts are correctly rounded
        assert np.array_equal(got, vals.astype(f.dtype))


@pytest.mark.parametrize("name", ["float64", pytest.param("longdouble", marks=needs_ld)])
def test_round_exact_wide_targets_beside_midpoints(name):
    # Midpoints of float64 / x87 neighbours, and values 2**-30 ulp beside them, as Fraction
    # and as mpf inputs, against the Fraction reference.
    rng = np.random.default_rng(2)
    x = _random_patterns(name, rng, 300)
    nxt = _next_up(x, name)
    for a, b in zip(x, nxt, strict=True):
        fa, fb = frac(a), frac(b)
        mid = (fa + fb) / 2
        delta = (fb - fa) / 2**30
        for v in (mid, mid + delta, mid - delta, fa):
            want = ref_round(v, name)
            assert as_ref(ex.round_exact(v, name)) == want
            assert as_ref(ex.round_exact(to_mpf(v), name)) == want


@pytest.mark.parametrize("name", available_formats())
def test_round_exact_subnormals_and_zero(name):
    f = get_format(name)
    q = Fraction(2) ** (f.emin - f.precision + 1)  # smallest subnormal
    cases = {
        q / 2: Fraction(0),  # tie between 0 and q: even is 0
        q / 2 + q / 2**70: q,
        q / 2 - q / 2**70: Fraction(0),
        3 * q / 2: 2 * q,  # tie between q and 2q: even is 2q
        5 * q / 2: 2 * q,
        q * 7: q * 7,
        Fraction(2) ** f.emin - q / 2: Fraction(2) ** f.emin,  # tie at the normal boundary
        Fraction(2) ** f.emin - q / 2 - q / 2**70: Fraction(2) ** f.emin - q,
        q / 2**100: Fraction(0),
    }
    for v, want in cases.items():
        for sign in (1, -1):
            got = ex.round_exact(sign * v, name)
            assert as_ref(got) == sign * want, (name, v)
            assert as_ref(ex.round_exact(to_mpf(sign * v), name)) == sign * want
    # Underflow to zero keeps the sign (IEEE): -tiny -> -0.0.
    assert np.signbit(ex.round_exact(-q / 4, name))


def test_round_exact_float64_subnormal_midpoints():
    k = np.arange(1, 2000, dtype=np.int64)
    q = Fraction(1, 2**1074)
    for kk in k.tolist():
        v = (2 * kk + 1) * q / 2  # midpoint between kk*q and (kk+1)*q
        want = (kk + (kk % 2)) * q
        got = ex.round_exact(v, "float64")
        assert frac(got) == want
    # Values of float64 subnormals come back exactly.
    sub = np.array([5e-324, 2.2250738585072009e-308, -1e-310])
    assert np.array_equal(ex.round_exact(ex.to_exact(sub), "float64"), sub)


@pytest.mark.parametrize("name", available_formats())
def test_round_exact_overflow_threshold(name):
    f = get_format(name)
    mx = frac(f.max)
    half_ulp = Fraction(2) ** (f.emax - f.precision)
    tiny = half_ulp / 2**80
    assert ex.round_exact(mx + half_ulp, name) == np.inf  # max + ulp/2 -> inf
    assert ex.round_exact(-(mx + half_ulp), name) == -np.inf
    assert frac(ex.round_exact(mx + half_ulp - tiny, name)) == mx  # just below -> max
    assert frac(ex.round_exact(to_mpf(mx + half_ulp - tiny), name)) == mx
    assert ex.round_exact(to_mpf(mx + half_ulp), name) == np.inf
    assert frac(ex.round_exact(mx, name)) == mx
    assert ex.round_exact(2 ** (f.emax + 1), name) == np.inf
    # Exponents far outside any format are handled without building huge integers.
    huge = HI.make_mpf(libmp.from_man_exp(3, 10**30))
    small = HI.make_mpf(libmp.from_man_exp(-3, -(10**30)))
    assert ex.round_exact(huge, name) == np.inf
    z = ex.round_exact(small, name)
    assert z == 0 and np.signbit(z)


@pytest.mark.parametrize("name", available_formats())
def test_round_exact_specials_types_and_shapes(name):
    dt = get_format(name).dtype
    assert np.isnan(ex.round_exact(HI.nan, name).astype(np.float64))
    assert ex.round_exact(HI.inf, name) == np.inf
    assert ex.round_exact(-HI.inf, name) == -np.inf
    z = ex.round_exact(HI.zero, name)
    assert z == 0 and not np.signbit(z)
    s = ex.round_exact(3, name)
    assert isinstance(s, np.generic) and s.dtype == dt and s == 3
    assert ex.round_exact(Fraction(1, 4), name) == 0.25
    arr = np.array([[HI.mpf(1), 2], [Fraction(1, 2), -0.25]], dtype=object)
    out = ex.round_exact(arr, name)
    assert out.shape == (2, 2) and out.dtype == dt
    assert out.astype(np.float64).tolist() == [[1.0, 2.0], [0.5, -0.25]]
    assert ex.round_exact([HI.mpf(1), Fraction(3, 2)], name).tolist() == [1.0, 1.5]
    assert ex.round_exact(np.arange(3), name).tolist() == [0, 1, 2]


def test_round_exact_rejects_bad_input():
    with pytest.raises(TypeError, match="complex"):
        ex.round_exact(np.array([1 + 2j]), "float32")
    with pytest.raises(TypeError, match="'abc'"):
        ex.round_exact(np.array(["abc"], dtype=object), "float32")
    with pytest.raises(TypeError, match="True"):
        ex.round_exact(True, "float32")
    with pytest.raises(TypeError, match="bool"):
        ex.round_exact(np.array([True]), "float32")
    with pytest.raises(ValueError, match="float8"):
        ex.round_exact(1, "float8")


_FMT = st.sampled_from(available_formats())


@FAST
@given(
    num=st.integers(-(2**300), 2**300),
    den=st.integers(1, 2**300),
    shift=st.integers(-17000, 17000),
    fmt=_FMT,
)
@example(num=1, den=3, shift=0, fmt="float16")
@example(num=2**11 + 1, den=2**11, shift=0, fmt="float16")  # tie -> even
@example(num=131071, den=2, shift=0, fmt="float16")  # max + ulp/2 -> inf
@example(num=1, den=1, shift=-1075, fmt="float64")  # half the smallest subnormal -> 0
def test_round_exact_matches_fraction_reference(num, den, shift, fmt):
    v = Fraction(num, den) * Fraction(2) ** shift
    assert as_ref(ex.round_exact(v, fmt)) == ref_round(v, fmt)


@FAST
@given(man=st.integers(-(2**200), 2**200), exp=st.integers(-17000, 16500), fmt=_FMT)
@example(man=2**64 + 1, exp=-64, fmt="longdouble")  # 1 + 2**-64: tie -> 1
@example(man=2**64 + 3, exp=-64, fmt="longdouble")  # 1 + 3*2**-64: tie -> up
def test_round_exact_mpf_matches_fraction_reference(man, exp, fmt):
    v = HI.make_mpf(libmp.from_man_exp(man, exp))
    want = ref_round(Fraction(man) * Fraction(2) ** exp, fmt)
    assert as_ref(ex.round_exact(v, fmt)) == want


# --- to_exact -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", available_formats())
def test_to_exact_round_trip_bit_for_bit(name):
    f = get_format(name)
    rng = np.random.default_rng(3)
    x = _random_patterns(name, rng, 2000)
    specials = np.array([0.0, np.inf, -np.inf, 1.0, -1.0], dtype=np.float64).astype(f.dtype)
    x = x[~((x == 0) & np.signbit(x))]  # -0.0 comes back as +0.0 (checked below)
    extremes = np.array([f.max, f.tiny, f.smallest_subnormal], dtype=f.dtype)
    x = np.concatenate([x, specials, extremes])
    x = np.concatenate([x, -x[-3:]])
    back = ex.round_exact(ex.to_exact(x), name)
    assert back.dtype == f.dtype
    nb = 10 if name == "longdouble" else f.dtype.itemsize  # x87: 10 significant bytes
    bx = x.view(np.uint8).reshape(x.size, -1)[:, :nb]
    bb = back.view(np.uint8).reshape(x.size, -1)[:, :nb]
    assert np.array_equal(bx, bb)
    # NaN and -0.0: NaN comes back as NaN; -0.0 as +0.0 (mpf has no signed zero).
    special = np.array([np.nan, -0.0]).astype(f.dtype)
    out = ex.round_exact(ex.to_exact(special), name)
    assert np.isnan(out[0].astype(np.float64)) and out[1] == 0 and not np.signbit(out[1])


@needs_ld
def test_to_exact_longdouble_is_exact_not_via_float():
    rng = np.random.default_rng(4)
    x = _random_patterns("longdouble", rng, 500)
    x = np.concatenate([x, [np.longdouble(1) / 3, np.nextafter(np.longdouble(1), 2)]])
    ex_vals = ex.to_exact(x)
    for v, e in zip(x, ex_vals, strict=True):
        assert frac(e) == Fraction(*v.as_integer_ratio())
    # 1 + 2**-63 is not a float64: going through float() would give exactly 1.
    one_plus = ex.to_exact(np.nextafter(np.longdouble(1), 2))
    assert frac(one_plus) == 1 + Fraction(1, 2**63)


def test_to_exact_values_specials_and_inputs():
    v = ex.to_exact(np.float32(0.1))
    assert frac(v) == Fraction(13421773, 2**27)
    assert frac(ex.to_exact(np.array(0.1, dtype=BF16))) == Fraction(float(BF16(0.1)))
    assert frac(ex.to_exact(np.float16(65504))) == 65504
    out = ex.to_exact([1.5, -np.inf, np.inf, np.nan])
    assert out.dtype == object and out.shape == (4,)
    assert out[0] == 1.5 and out[1] == -HI.inf and out[2] == HI.inf and HI.isnan(out[3])
    assert ex.to_exact(-0.0) == 0
    assert frac(ex.to_exact(2**100 + 1)) == 2**100 + 1  # Python int: exact, no float64
    assert ex.to_exact([[1, 2], [3, 4]]).shape == (2, 2)
    a = ex.to_exact(np.ones((2, 3), dtype=np.float32), prec=80)
    assert a.shape == (2, 3) and a[0, 0].context.prec == 80
    assert ex.to_exact(1.0).context.prec == ex.DEFAULT_PREC


def test_to_exact_keeps_value_exact_below_prec():
    # prec only sets later arithmetic; a 53-bit value stays exact even with prec=10.
    v = ex.to_exact(1 + 2**-52, prec=10)
    assert frac(v) == 1 + Fraction(1, 2**52)


@pytest.mark.parametrize(
    "bad, dtype_name",
    [
        (np.array([1, 2], dtype=np.int32), "int32"),
        (np.array([True]), "bool"),
        (np.array([1 + 1j]), "complex128"),
        (np.array([1.0], dtype=object), "object"),
        (np.int64(3), "int64"),
    ],
)
def test_to_exact_rejects_non_float_arrays(bad, dtype_name):
    with pytest.raises(TypeError, match=dtype_name) as info:
        ex.to_exact(bad)
    assert "float16" in str(info.value)  # names what is allowed


def test_prec_validation():
    for bad, exc in [(0, ValueError), (1, ValueError), (2.5, TypeError), (True, TypeError)]:
        with pytest.raises(exc, match=repr(bad) if exc is TypeError else str(bad)):
            ex.softmax([0.0, 1.0], prec=bad)
    assert ex.softmax([0.0, 0.0], prec=np.int64(30))[0].context.prec == 30


def test_private_contexts_leave_global_mp_alone():
    def state():  # the rounding mode is a context setting from mpmath 1.4 on
        return mpmath.mp.prec, getattr(mpmath.mp, "rounding", None)

    before = state()
    ex.cross_entropy(np.array([[1.0, 2.0]]), [0], prec=500)
    ex.softmax(np.array([1.0, 2.0]), prec=70)
    assert state() == before
    assert ex.softmax(np.array([1.0, 2.0]), prec=70)[0].context is not mpmath.mp


# --- softmax family: closed forms -----------------------------------------------------------


def test_logsumexp_of_equal_logits():
    for c in (1, 2, 3, 113):
        for zv in (0.0, -7.25, 1e10, -3e-300):
            got = ex.logsumexp(np.full((1, c), zv))[0]
            want = HI.mpf(zv) + HI.log(c)
            assert rel_err(got, want) <= ulps(ex.DEFAULT_PREC, 1) or (got == 0 and want == 0)


@pytest.mark.parametrize("g", [0.5, 1.0, 30.0, 60.0, 745.0, 1e4])
def test_softmax_two_classes_closed_form(g):
    p = ex.softmax(np.array([0.0, -g]))
    eg = HI.exp(-HI.mpf(g))
    # Each entry has relative error below 2**(1 - prec).
    assert rel_err(p[0], 1 / (1 + eg)) <= ulps(ex.DEFAULT_PREC, 2)
    assert rel_err(p[1], eg / (1 + eg)) <= ulps(ex.DEFAULT_PREC, 2)
    ce = ex.cross_entropy(np.array([[0.0, -g], [0.0, -g]]), [0, 1])
    assert rel_err(ce[0], HI.log1p(eg)) <= ulps(ex.DEFAULT_PREC, 2)
    assert rel_err(ce[1], g + HI.log1p(eg)) <= ulps(ex.DEFAULT_PREC, 2)


def test_cross_entropy_tiny_loss_keeps_relative_accuracy():
    # gap 92: loss 2 e**-92 ~ 2.2e-40; log(1 + s) at 53 bits would be exactly 0.
    z = np.array([[0.0, -92.0, -92.0]])
    loss = ex.cross_entropy(z, [0])[0]
    want = HI.log1p(2 * HI.exp(-92))
    assert rel_err(loss, want) <= ulps(ex.DEFAULT_PREC, 1)
    p = scipy.special.softmax(z, axis=1)
    assert -np.log(p[0, 0]) == 0.0  # the float64 loss has collapsed to 0
    # And at a low precision too: the result still has prec good bits.
    assert rel_err(ex.cross_entropy(z, [0], prec=24)[0], want) <= ulps(24, 1)


def test_tail_sum_definition_and_ties():
    z = np.array([[0.0, -1.0, 0.0, -2.0], [3.0, 3.0, 3.0, 3.0], [5.0, -np.inf, 4.0, 5.0]])
    s = ex.tail_sum(z)
    assert rel_err(s[0], 1 + HI.exp(-1) + HI.exp(-2)) <= ulps(ex.DEFAULT_PREC)
    assert s[1] == 3  # ties contribute exactly 1 each
    assert rel_err(s[2], 1 + HI.exp(-1)) <= ulps(ex.DEFAULT_PREC)
    assert ex.tail_sum(np.array([7.0])) == 0  # C = 1
    # Absorption: tail 2**-25 (float32 u = 2**-24) is absorbed in float32.
    t = ex.tail_sum(np.array([0.0, math.log(2.0**-25)]))
    assert t < 2**-24 and np.float32(1) + np.float32(ex.round_exact(t, "float32")) == 1


def test_logsumexp_recovers_cancellation():
    # z_max + log1p(s) cancels when z_max ~ -log C: with z = [a, a], a = -log 2 rounded to
    # 400 bits, logsumexp is ~2**-400 and the Ziv loop must find all ~400 lost bits. Without
    # it (one pass at prec + 20 bits) the result would have no correct bit at prec = 64.
    a = -HI.log(2)
    ctx = mpmath.MPContext()
    ctx.prec = 400
    a400 = ctx.mpf(a)
    z = np.array([a400, a400], dtype=object)
    got = ex.logsumexp(z, prec=64)
    want = HI.mpf(a400) + HI.log(2)
    assert want != 0
    assert rel_err(got, want) <= ulps(64, 1)
    # float64 version: lse = fl(-log 2) + log 2 ~ 2**-55.
    a64 = -math.log(2.0)
    got = ex.logsumexp(np.array([a64, a64]))
    assert rel_err(got, HI.mpf(a64) + HI.log(2)) <= ulps(ex.DEFAULT_PREC, 1)


def test_softmax_sums_to_one_and_log_softmax_consistency():
    rng = np.random.default_rng(5)
    z = rng.normal(scale=10, size=(20, 17))
    p = ex.softmax(z)
    lp = ex.log_softmax(z)
    lse = ex.logsumexp(z)
    for i in range(z.shape[0]):
        # |sum(p) - 1| <= sum_k p_k * 2**(1 - prec) = 2**(1 - prec)
        assert abs(HI.fsum(p[i]) - 1) <= ulps(ex.DEFAULT_PREC, 2)
        for k in range(z.shape[1]):
            want = HI.mpf(z[i, k]) - HI.mpf(lse[i])  # lse has rel err 2**(1-prec)
            tol = 2 * (abs(want) + abs(HI.mpf(lse[i]))) * ulps(ex.DEFAULT_PREC)
            assert abs(HI.mpf(lp[i, k]) - want) <= tol
            # exp turns lp's absolute error 2**(1-prec)|lp| into a relative one.
            lpk = abs(HI.mpf(lp[i, k]))
            assert rel_err(HI.exp(lp[i, k]), p[i, k]) <= (2 * lpk + 4) * ulps(ex.DEFAULT_PREC)


def test_shift_invariance_exact():
    # Logits on a 2**-20 grid shifted by an integer: z + c is exact in float64, so the exact
    # results must agree to the functions' accuracy (2 * 2**(1 - prec) relative).
    rng = np.random.default_rng(6)
    z = np.round(rng.normal(scale=8, size=(6, 9)) * 2**20) / 2**20
    y = rng.integers(0, 9, 6)
    tol = ulps(ex.DEFAULT_PREC, 4)
    for c in (1.0, -37.0, 2.0**30):
        zc = z + c
        assert np.array_equal(zc - c, z)  # the shift was exact
        for f in (ex.softmax, ex.log_softmax, ex.cross_entropy_grad):
            a = f(z) if f is not ex.cross_entropy_grad else f(z, y)
            b = f(zc) if f is not ex.cross_entropy_grad else f(zc, y)
            assert all(rel_err(u, v) <= tol for u, v in zip(a.flat, b.flat, strict=True))
        ce_a, ce_b = ex.cross_entropy(z, y), ex.cross_entropy(zc, y)
        assert all(rel_err(u, v) <= tol for u, v in zip(ce_a, ce_b, strict=True))
        lse_a, lse_b = ex.logsumexp(z), ex.logsumexp(zc)
        for u, v in zip(lse_a, lse_b, strict=True):
            assert abs(HI.mpf(v) - u - c) <= tol * (abs(u) + abs(v))


def test_against_scipy_float64_benign():
    # Benign inputs: z in [0, R], R = 8, C <= 16. SciPy computes d = z - max (rounding
    # error u|d|, u = 2**-53, which perturbs exp(d) by u|d| <= R u), exp (~u), a sum of C
    # positive terms (<= C u), log1p (conditioning <= 1, +u) and two additions of
    # non-negative terms (+2u). So |scipy - exact| <= (2R + C + 3) u |exact| for logsumexp;
    # log_softmax adds an absolute error of about that size, hence the (|exact| + 1) factor.
    rng = np.random.default_rng(7)
    u = 2.0**-53
    R = 8.0
    for c in (1, 2, 5, 16):
        z = rng.uniform(0, R, size=(30, c))
        bound = (2 * R + c + 3) * u
        ref = ex.round_exact(ex.logsumexp(z), "float64")
        sp = scipy.special.logsumexp(z, axis=1)
        assert np.all(np.abs(sp - ref) <= bound * np.abs(ref))
        ref = ex.round_exact(ex.log_softmax(z), "float64")
        sp = scipy.special.log_softmax(z, axis=1)
        assert np.all(np.abs(sp - ref) <= bound * (np.abs(ref) + 1))
        ref = ex.round_exact(ex.softmax(z), "float64")
        sp = scipy.special.softmax(z, axis=1)
        assert np.all(np.abs(sp - ref) <= bound * np.abs(ref))


# --- cross-entropy gradient -----------------------------------------------------------------


def _fd_grad(f, z_mpf, y, h):
    """Central differences of a per-sample loss at exact mpf points z +- h e_i (HI context)."""
    c = len(z_mpf)
    g = []
    for i in range(c):
        zp, zm = z_mpf.copy(), z_mpf.copy()
        zp[i] = z_mpf[i] + h
        zm[i] = z_mpf[i] - h
        g.append((HI.mpf(f(zp, y, prec=700)) - HI.mpf(f(zm, y, prec=700))) / (2 * h))
    return g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_entropy_grad_vs_finite_differences(seed):
    # With h = 2**-100, the central-difference truncation error is ~h**2 |f'''| <= 2**-190,
    # and evaluation errors are 2**-699 |f| / h ~ 2**-590: so FD agrees with the gradient
    # to ~2**-185 absolute; we test 2**-150 (entries are O(1e-10) or larger here).
    rng = np.random.default_rng(seed)
    c = 5
    z = rng.normal(scale=4, size=c)
    y = int(rng.integers(0, c))
    zm = np.array([HI.mpf(v) for v in z], dtype=object)
    fd = _fd_grad(ex.cross_entropy, zm, y, HI.ldexp(1, -100))
    g = ex.cross_entropy_grad(z, y)
    for a, b in zip(g, fd, strict=True):
        assert abs(HI.mpf(a) - b) <= HI.ldexp(1, -150)


def test_cross_entropy_grad_equals_softmax_minus_onehot():
    rng = np.random.default_rng(8)
    z = rng.normal(scale=6, size=(10, 7))
    y = rng.integers(0, 7, 10)
    g = ex.cross_entropy_grad(z, y)
    p = ex.softmax(z, prec=600)  # reference: p - onehot at 600 bits; its error ~2**-599
    for i in range(10):
        row = [HI.mpf(v) for v in p[i]]
        row[y[i]] -= 1
        for a, b in zip(g[i], row, strict=True):
            assert rel_err(a, b) <= ulps(ex.DEFAULT_PREC, 2)
        # rows sum to 0: |sum| <= sum |g_k| * 2**(1 - prec)
        assert abs(HI.fsum(g[i])) <= HI.fsum(abs(v) for v in g[i]) * ulps(ex.DEFAULT_PREC, 2)


@pytest.mark.parametrize("c", [2, 113])
def test_cross_entropy_grad_no_cancellation_at_gap_60(c):
    z = np.full((1, c), -60.0)
    z[0, 0] = 0.0
    g = ex.cross_entropy_grad(z, [0])[0]
    t = (c - 1) * HI.exp(-60)
    want_y = -t / (1 + t)
    assert rel_err(g[0], want_y) <= ulps(ex.DEFAULT_PREC, 1)
    assert rel_err(g[1], HI.exp(-60) / (1 + t)) <= ulps(ex.DEFAULT_PREC, 1)
    # float64 p_y - 1 is exactly 0 here: the tail (c-1) e**-60 < 2**-53 is absorbed.
    p = scipy.special.softmax(z, axis=1)
    assert p[0, 0] - 1.0 == 0.0
    # The exact gradient rounds to a non-zero float64 (and float32) value.
    assert ex.round_exact(g[0], "float64") < 0 and ex.round_exact(g[0], "float32") < 0


# --- StableMax --------------------------------------------------------------------------------


def test_stablemax_s_values_and_continuity():
    s = ex.stablemax_s(np.array([-3.0, -0.5, 0.0, 2.5, np.inf, -np.inf]))
    assert [frac(v) for v in s[[0, 2, 3]]] == [Fraction(1, 4), 1, Fraction(7, 2)]
    assert rel_err(s[1], HI.mpf(2) / 3) <= ulps(ex.DEFAULT_PREC)  # correctly rounded 2/3
    assert s[4] == HI.inf and s[5] == 0
    assert HI.isnan(ex.stablemax_s(np.nan))
    h = 2.0**-60
    left, mid, right = ex.stablemax_s(np.array([-h, 0.0, h]))
    assert mid == 1
    # s(-h) = 1/(1+h) = 1 - h + h**2 - ..., s(h) = 1 + h: both slopes at 0 are 1.
    # (s(0) - s(-h)) / h = 1/(1 + h); the subtraction amplifies s(-h)'s 2**-prec by 1/h.
    assert rel_err((mid - left) / h, 1 / (1 + HI.mpf(h))) <= ulps(ex.DEFAULT_PREC - 62)
    assert (right - mid) / h == 1
    assert ex.stablemax_s(2.0) == 3  # scalar in, mpf out


def test_stablemax_equals_softmax_of_signed_log1p():
    # StableMax(z) = softmax(sign(z) log1p|z|): w computed at 1200 bits has relative error
    # 2**-1199, which moves softmax by ~|w| 2**-1199; both sides then carry 2**(1-prec).
    rng = np.random.default_rng(9)
    z = rng.normal(scale=20, size=(8, 6))
    z[0, :3] = [0.0, -0.0, 1e-300]
    w = np.empty(z.shape, dtype=object)
    for idx, v in np.ndenumerate(z):
        m = HI.mpf(v)
        w[idx] = HI.sign(m) * HI.log1p(abs(m))
    a = ex.stablemax(z)
    b = ex.softmax(w)
    for u, v in zip(a.flat, b.flat, strict=True):
        assert rel_err(u, v) <= ulps(ex.DEFAULT_PREC, 4)
    la, lb = ex.log_stablemax(z), ex.log_softmax(w)
    for u, v in zip(la.flat, lb.flat, strict=True):
        assert rel_err(u, v) <= ulps(ex.DEFAULT_PREC, 4)


def test_log_stablemax_dominant_entry_and_loss():
    z = np.array([[1e20, 0.0, -3.0], [0.0, 0.0, 0.0]])
    lp = ex.log_stablemax(z)
    s_other = 1 + HI.mpf(1) / 4
    want = -HI.log1p(s_other / (HI.mpf(1e20) + 1))
    assert rel_err(lp[0, 0], want) <= ulps(ex.DEFAULT_PREC, 2)
    assert rel_err(lp[1, 2], -HI.log(3)) <= ulps(ex.DEFAULT_PREC, 2)
    ce = ex.stablemax_cross_entropy(z, [0, 2])
    assert rel_err(ce[0], -want) <= ulps(ex.DEFAULT_PREC, 2)
    assert rel_err(ce[1], HI.log(3)) <= ulps(ex.DEFAULT_PREC, 2)
    p = ex.stablemax(z)
    assert rel_err(HI.fsum(p[0]), 1) <= ulps(ex.DEFAULT_PREC, 2)
    assert frac(ex.round_exact(p[1, 0], "float64")) == Fraction(float(1 / 3))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stablemax_grad_vs_finite_differences(seed):
    # Same FD bounds as for softmax; logits kept >= 2**-20 away from the kink at 0, where s''
    # jumps (so the O(h**2) central-difference error holds).
    rng = np.random.default_rng(seed + 10)
    c = 6
    z = rng.normal(scale=5, size=c)
    z[np.abs(z) < 2**-20] = 0.5
    y = int(rng.integers(0, c))
    zm = np.array([HI.mpf(v) for v in z], dtype=object)
    for eps in (0, 1e-30):

        def loss(zz, yy, prec, eps=eps):
            return ex.stablemax_cross_entropy(zz, yy, eps=eps, prec=prec)

        fd = _fd_grad(loss, zm, y, HI.ldexp(1, -100))
        g = ex.stablemax_cross_entropy_grad(z, y, eps=eps)
        for a, b in zip(g, fd, strict=True):
            assert abs(HI.mpf(a) - b) <= HI.ldexp(1, -150)


def test_stablemax_grad_formula():
    z = np.array([[1.0, -1.0], [1.0, -1.0], [-2.0, 3.0]])
    g = ex.stablemax_cross_entropy_grad(z, [0, 1, 0])
    # s = (2, 1/2), S = 5/2: i != y: s'/S; i = y: s'(1/S - 1/s_y).
    assert ex.round_exact(g[0], "float64").tolist() == [-0.1, 0.1]
    assert rel_err(g[1, 1], HI.mpf(1) / 4 * (HI.mpf(2) / 5 - 2)) <= ulps(ex.DEFAULT_PREC, 2)
    assert rel_err(g[1, 0], HI.mpf(2) / 5) <= ulps(ex.DEFAULT_PREC, 2)
    # Row sums are not 0 for StableMax (s' != s): check the target against its formula.
    s0, s1 = HI.mpf(1) / 3, HI.mpf(4)
    assert rel_err(g[2, 0], s0**2 * (1 / (s0 + s1) - 1 / s0)) <= ulps(ex.DEFAULT_PREC, 2)


def test_stablemax_eps_variant():
    # Authors' s(x) = 1/(1 - x + eps) for x < 0: s_eps - s = -eps / ((1-x)(1-x+eps)) exactly,
    # relative change eps/(1 - x + eps) <= eps; x >= 0 is unaffected.
    eps = 1e-30
    x = np.array([-5.0, -1e-3, 0.0, 2.0])
    a, b = ex.stablemax_s(x), ex.stablemax_s(x, eps=eps)
    for xv, u, v in zip(x, a, b, strict=True):
        m, e = HI.mpf(xv), HI.mpf(eps)
        if xv < 0:
            want = -e / ((1 - m) * (1 - m + e))
            assert rel_err(HI.mpf(v) - HI.mpf(u), want) <= ulps(ex.DEFAULT_PREC - 110, 4)
            assert rel_err(v, 1 / (1 - m + e)) <= ulps(ex.DEFAULT_PREC)
        else:
            assert u == v
    # eps is taken as the exact value of the float given: float32 1e-30 != float64 1e-30.
    e32 = np.float32(1e-30)
    v32 = ex.stablemax_s(-1.0, eps=e32)
    assert rel_err(v32, 1 / (2 + to_mpf(frac(e32)))) <= ulps(ex.DEFAULT_PREC)
    assert v32 != ex.stablemax_s(-1.0, eps=1e-30)
    # Loss: each s changes by a relative amount <= eps, so the loss by at most 2 eps.
    z = np.array([[3.0, -2.0, -4.0], [-1.0, -0.5, 0.25]])
    l0 = ex.stablemax_cross_entropy(z, [0, 2])
    l1 = ex.stablemax_cross_entropy(z, [0, 2], eps=eps)
    for u, v in zip(l0, l1, strict=True):
        d = abs(HI.mpf(u) - HI.mpf(v))
        assert 0 < d <= 2 * eps


# --- special values and validation ----------------------------------------------------------


def test_special_values_softmax_family():
    inf, nan = np.inf, np.nan
    z = np.array(
        [
            [inf, 0.0, -1.0],  # single +inf: one-hot
            [inf, inf, 0.0],  # inf - inf: NaN
            [nan, 0.0, 1.0],  # NaN row
            [0.0, -inf, 1.0],  # -inf entry: probability 0
            [-inf, -inf, -inf],  # all -inf, C > 1: NaN
        ]
    )
    p = ex.round_exact(ex.softmax(z), "float64")
    assert p[0].tolist() == [1.0, 0.0, 0.0]
    assert np.all(np.isnan(p[1])) and np.all(np.isnan(p[2])) and np.all(np.isnan(p[4]))
    assert p[3, 1] == 0 and p[3, 2] > p[3, 0] > 0
    lse = ex.round_exact(ex.logsumexp(z), "float64")
    assert lse[0] == inf and np.isnan(lse[1]) and np.isnan(lse[2]) and np.isnan(lse[4])
    lp = ex.round_exact(ex.log_softmax(z), "float64")
    assert lp[0].tolist() == [0.0, -inf, -inf] and lp[3, 1] == -inf
    ce = ex.round_exact(ex.cross_entropy(z, [0, 0, 0, 1, 0]), "float64")
    assert ce[0] == 0 and np.isnan(ce[1]) and np.isnan(ce[2]) and ce[3] == inf
    assert ex.round_exact(ex.cross_entropy(z[:1], [1]), "float64")[0] == inf
    g = ex.round_exact(ex.cross_entropy_grad(z, [1, 0, 0, 1, 0]), "float64")
    assert g[0].tolist() == [1.0, -1.0, 0.0]
    assert np.all(np.isnan(g[1])) and np.all(np.isnan(g[2]))
    assert g[3, 1] == -1.0
    assert ex.tail_sum(np.array([inf, 3.0])) == 0
    one = ex.round_exact(ex.softmax(np.array([[-inf]])), "float64")
    assert one.tolist() == [[1.0]]
    assert ex.logsumexp(np.array([-inf])) == -HI.inf


def test_special_values_stablemax_family():
    inf, nan = np.inf, np.nan
    z = np.array([[inf, 0.0], [nan, 1.0], [-inf, 1.0], [-inf, -inf]])
    p = ex.round_exact(ex.stablemax(z), "float64")
    assert np.isnan(p[0, 0]) and p[0, 1] == 0  # inf / inf and 1 / inf
    assert np.all(np.isnan(p[1])) and p[2].tolist() == [0.0, 1.0] and np.all(np.isnan(p[3]))
    lp = ex.round_exact(ex.log_stablemax(z), "float64")
    assert np.isnan(lp[0, 0]) and lp[0, 1] == -inf and lp[2].tolist() == [-inf, 0.0]
    ce = ex.round_exact(ex.stablemax_cross_entropy(z, [1, 0, 0, 0]), "float64")
    assert ce[0] == inf and np.isnan(ce[1]) and ce[2] == inf and np.isnan(ce[3])
    g = ex.round_exact(ex.stablemax_cross_entropy_grad(z, [1, 0, 0, 0]), "float64")
    assert g[0, 0] == 0 and np.isnan(g[0, 1]) and np.all(np.isnan(g[1]))
    assert g[2].tolist() == [0.0, 0.5] and np.all(np.isnan(g[3]))  # s'(-inf) = s**2 = 0


def test_c_equals_one():
    z = np.array([[2.5], [-1e300]])
    y = [0, 0]
    assert [frac(v) for v in ex.logsumexp(z)] == [Fraction(2.5), Fraction(-1e300)]
    assert ex.softmax(z).tolist() == [[1], [1]]
    assert ex.log_softmax(z).tolist() == [[0], [0]]
    assert ex.cross_entropy(z, y).tolist() == [0, 0]
    assert ex.cross_entropy_grad(z, y).tolist() == [[0], [0]]
    assert ex.stablemax(z).tolist() == [[1], [1]]
    assert ex.log_stablemax(z).tolist() == [[0], [0]]
    assert ex.stablemax_cross_entropy(z, y).tolist() == [0, 0]
    assert ex.stablemax_cross_entropy_grad(z, y).tolist() == [[0], [0]]


def test_shapes_one_row_and_empty_batch():
    z = np.array([1.0, 2.0, 0.5], dtype=np.float32)
    assert ex.softmax(z).shape == (3,)
    assert ex.cross_entropy_grad(z, 1).shape == (3,)
    assert hasattr(ex.cross_entropy(z, np.int64(1)), "_mpf_")  # one mpf, not an array
    assert ex.cross_entropy(z, 1) == ex.cross_entropy(z[None], [1])[0]
    assert ex.logsumexp(z) == ex.logsumexp(z[None])[0]
    assert ex.stablemax_cross_entropy(z, 2) == ex.stablemax_cross_entropy(z[None], [2])[0]
    e = np.zeros((0, 4))
    assert ex.softmax(e).shape == (0, 4) and ex.cross_entropy(e, []).shape == (0,)
    # All input formats are accepted, and the caller's array is not modified.
    for dt in (np.float16, BF16, np.float32, np.float64, np.longdouble):
        a = np.array([[1.0, -2.0]], dtype=dt)
        keep = a.copy()
        ex.cross_entropy_grad(a, [0])
        assert np.array_equal(a.view(np.uint8), keep.view(np.uint8))


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda: ex.softmax(np.float64(1.0)), ValueError, r"shape \(\)"),
        (lambda: ex.softmax(np.zeros((2, 2, 2))), ValueError, r"\(2, 2, 2\)"),
        (lambda: ex.logsumexp(np.zeros((3, 0))), ValueError, r"C = 0"),
        (lambda: ex.softmax(np.array([1, 2])), TypeError, "int64"),
        (lambda: ex.cross_entropy(np.zeros((3, 4)), [0, 1]), ValueError, r"\(2,\)"),
        (lambda: ex.cross_entropy(np.zeros((2, 4)), [0.0, 1.0]), TypeError, "float64"),
        (lambda: ex.cross_entropy(np.zeros((2, 4)), [True, False]), TypeError, "bool"),
        (lambda: ex.cross_entropy(np.zeros((2, 4)), [0, 4]), ValueError, r"y\[1\] = 4"),
        (lambda: ex.cross_entropy_grad(np.zeros((2, 4)), [-1, 0]), ValueError, "= -1"),
        (lambda: ex.cross_entropy(np.zeros(4), [1, 2]), ValueError, r"\(2,\)"),
        (lambda: ex.stablemax_cross_entropy(np.zeros((1, 3)), [7]), ValueError, "= 7"),
        (lambda: ex.stablemax_cross_entropy_grad(np.zeros((1, 3)), [3]), ValueError, "= 3"),
        (lambda: ex.stablemax(np.zeros(3), eps=-1e-30), ValueError, "-1e-30"),
        (lambda: ex.stablemax_s(np.zeros(3), eps=np.nan), ValueError, "nan"),
        (lambda: ex.log_stablemax(np.zeros(3), eps="tiny"), TypeError, "'tiny'"),
        (lambda: ex.stablemax(np.zeros(3), eps=np.ones(2)), ValueError, r"\(2,\)"),
        (lambda: ex.softmax(np.array([1.0, "x"], dtype=object)), TypeError, "'x'"),
        (lambda: ex.softmax(np.array([1.0, 2j])), TypeError, "complex"),
    ],
)
def test_input_validation(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


# --- properties -------------------------------------------------------------------------------

_LOGIT = st.floats(-1e4, 1e4, allow_subnormal=True) | st.sampled_from([5e-324, -5e-324, 0.0])


@st.composite
def _rows(draw):
    c = draw(st.integers(1, 6))
    z = draw(st.lists(_LOGIT, min_size=c, max_size=c))
    y = draw(st.integers(0, c - 1))
    return np.array([z]), y


@FAST
@given(_rows())
@example((np.array([[0.0, 0.0, 0.0]]), 1))  # ties between maxima, label on a tied one
@example((np.array([[3.0, 3.0, -1.0]]), 2))
@example((np.array([[0.0, -1e4]]), 0))  # huge gap
@example((np.array([[-1e4, 1e4]]), 0))
@example((np.array([[5e-324, -5e-324, 0.0]]), 0))  # subnormal logits
@example((np.array([[1.5]]), 0))  # one class
def test_softmax_family_properties(zy):
    z, y = zy
    prec = ex.DEFAULT_PREC
    tol = ulps(prec, 2)
    p = ex.softmax(z)[0]
    lp = ex.log_softmax(z)[0]
    ce = ex.cross_entropy(z, [y])[0]
    g = ex.cross_entropy_grad(z, [y])[0]
    lse = ex.logsumexp(z)[0]
    s = ex.tail_sum(z)[0]
    assert abs(HI.fsum(p) - 1) <= tol
    assert ce >= 0 and g[y] <= 0 and all(v >= 0 for k, v in enumerate(g) if k != y)
    assert rel_err(ce, -HI.mpf(lp[y])) <= 2 * tol
    assert abs(HI.fsum(g)) <= HI.fsum(abs(v) for v in g) * tol
    zmax = max(z[0])
    assert lse >= zmax and 0 <= s <= len(z[0]) - 1
    assert abs(HI.mpf(lse) - (zmax + HI.log1p(s))) <= 2 * tol * (abs(zmax) + HI.log1p(s))
    # DEFAULT_PREC is enough for correct rounding: same float64 / x87 result as at 1024 bits.
    fmts = ["float64", "longdouble"] if HAS_LD else ["float64"]
    ce_hi = ex.cross_entropy(z, [y], prec=1024)[0]
    g_hi = ex.cross_entropy_grad(z, [y], prec=1024)[0]
    lse_hi = ex.logsumexp(z, prec=1024)[0]
    for fmt in fmts:
        assert ex.round_exact(ce, fmt) == ex.round_exact(ce_hi, fmt)
        assert ex.round_exact(lse, fmt) == ex.round_exact(lse_hi, fmt)
        assert np.array_equal(ex.round_exact(g, fmt), ex.round_exact(g_hi, fmt))


@FAST
@given(_rows())
@example((np.array([[0.0, 0.0, 0.0]]), 1))
@example((np.array([[1e4, -1e4]]), 0))
@example((np.array([[5e-324, -5e-324, 0.0]]), 2))
@example((np.array([[-2.0]]), 0))
def test_stablemax_family_properties(zy):
    z, y = zy
    tol = ulps(ex.DEFAULT_PREC, 2)
    p = ex.stablemax(z)[0]
    lp = ex.log_stablemax(z)[0]
    ce = ex.stablemax_cross_entropy(z, [y])[0]
    g = ex.stablemax_cross_entropy_grad(z, [y])[0]
    s = ex.stablemax_s(z[0])
    S = HI.fsum(s)
    assert abs(HI.fsum(p) - 1) <= tol
    assert ce >= 0 and rel_err(ce, -HI.mpf(lp[y])) <= 2 * tol
    for k in range(len(s)):
        assert rel_err(p[k], HI.mpf(s[k]) / S) <= 2 * tol
        ds = 1 if z[0, k] >= 0 else HI.mpf(s[k]) ** 2
        want = ds / S - (ds / HI.mpf(s[k]) if k == y else 0)
        # The target entry is formed without cancellation; the reference ds/S - ds/s_y
        # cancels, so compare against the sum of the terms' magnitudes.
        scale = ds / S + (ds / HI.mpf(s[k]) if k == y else 0)
        assert abs(HI.mpf(g[k]) - want) <= 4 * tol * scale
    hi_ce = ex.stablemax_cross_entropy(z, [y], prec=1024)[0]
    assert ex.round_exact(ce, "float64") == ex.round_exact(hi_ce, "float64")
