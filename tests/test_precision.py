"""Formats, correctly rounded conversion and the precision policy."""

import math
import warnings
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from helpers import all_patterns
from hypothesis import example, given
from hypothesis import strategies as st

from numstab.precision import (
    FORMAT_NAMES,
    PrecisionPolicy,
    available_formats,
    get_format,
    quantize,
    round_to,
)

SIXTEEN_BIT = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def widen(x):
    with np.errstate(invalid="ignore"):  # NaN payloads widen with a warning in ml_dtypes
        return x.astype(np.float64)


def finite_sorted_values(dtype):
    v = widen(all_patterns(dtype))
    return np.unique(v[np.isfinite(v)])


def fraction_round(x: Fraction, fmt) -> float:
    """Reference round-to-nearest-even of an exact rational to ``fmt`` (independent code)."""
    if x == 0:
        return 0.0
    sign = -1 if x < 0 else 1
    a = abs(x)
    e = math.floor(math.log2(a))
    # log2 of a Fraction can be off by one near powers of two: fix it exactly.
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    q = Fraction(2) ** (max(e, fmt.emin) - fmt.precision + 1)
    k, r = divmod(a, q)
    if r > q / 2 or (r == q / 2 and k % 2 == 1):
        k += 1
    v = k * q
    if v > Fraction(float(fmt.max)):
        return sign * math.inf
    return sign * float(v)


# --- registry -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alias,name",
    [
        ("fp16", "float16"),
        ("half", "float16"),
        ("bf16", "bfloat16"),
        ("fp32", "float32"),
        ("single", "float32"),
        ("fp64", "float64"),
        ("double", "float64"),
        ("FLOAT32", "float32"),
    ],
)
def test_aliases(alias, name):
    assert get_format(alias).name == name


def test_unknown_format_lists_valid_names():
    with pytest.raises(ValueError, match=r"'float8'.*float16.*bfloat16.*float32.*float64"):
        get_format("float8")


def test_dtype_lookup():
    assert get_format(np.float32).name == "float32"
    assert get_format(np.dtype(ml_dtypes.bfloat16)).name == "bfloat16"
    with pytest.raises(ValueError, match="int32"):
        get_format(np.int32)


@pytest.mark.parametrize("name", available_formats())
def test_format_constants_match_finfo(name):
    fmt = get_format(name)
    fi = ml_dtypes.finfo(fmt.dtype) if name == "bfloat16" else np.finfo(fmt.dtype)
    assert fmt.precision == fi.nmant + 1
    assert fmt.eps == float(fi.eps)
    assert fmt.unit_roundoff == fmt.eps / 2
    assert fmt.tiny == fi.smallest_normal
    assert fmt.smallest_subnormal == fi.smallest_subnormal
    assert fmt.max == fi.max
    assert fmt.tiny.dtype == fmt.dtype


def test_longdouble_availability_is_explicit():
    if np.finfo(np.longdouble).nmant >= 63:
        assert get_format("longdouble").precision == 64
    else:
        with pytest.raises(ValueError, match="long double"):
            get_format("longdouble")


@pytest.mark.parametrize("name", available_formats())
def test_absorption_rule(name):
    """fl(1 + x) == 1 iff 0 <= x <= 2**-p (round to nearest even), at the boundary."""
    fmt = get_format(name)
    u = fmt.unit_roundoff
    one = np.ones(1, dtype=fmt.carrier)
    at_u = quantize(np.asarray([u], dtype=fmt.carrier), fmt)
    assert quantize(one + at_u, fmt)[0] == 1
    # The next number above u (u is a power of two: next is u·(1 + 2**(1-p))).
    if fmt.name == "longdouble":
        above = np.nextafter(np.longdouble(u), np.longdouble(1))
    else:
        above = quantize(np.asarray([u * (1 + fmt.eps)]), fmt)[0]
    assert quantize(one + above, fmt)[0] > 1


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "float64"])
@given(k=st.integers(min_value=-40, max_value=0), m=st.integers(min_value=0, max_value=2**20))
@example(k=0, m=0)
@example(k=-1, m=1)
def test_absorption_iff_at_most_unit_roundoff(name, k, m):
    """For x = u·(1 + m 2**-20)·2**k: fl(1 + x) == 1 exactly when x <= u."""
    fmt = get_format(name)
    x = quantize(np.asarray([fmt.unit_roundoff * (1 + m * 2.0**-20) * 2.0**k]), fmt)
    s = quantize(np.ones(1, dtype=fmt.carrier) + x, fmt)[0]
    assert (s == 1) == (float(x[0]) <= fmt.unit_roundoff)


# --- rounding -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("src", [np.float32, np.float64])
def test_round_to_matches_astype_on_all_patterns_and_midpoints(name, src):
    dt = SIXTEEN_BIT[name]
    pats = widen(all_patterns(dt))  # includes inf and every NaN payload
    s = finite_sorted_values(dt)
    mids = (s[:-1] + s[1:]) / 2  # exact in float64 (and in float32: p+1 bits)
    fmt = get_format(name)
    beyond = (float(fmt.max) + 2.0 ** (fmt.emax + 1)) / 2  # the overflow tie
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN patterns, as they are
        x = np.concatenate([pats, mids, [beyond, -beyond]]).astype(src)
        ref = x.astype(dt)
    got = round_to(x, name)
    assert got.dtype == dt
    ref_nan = np.isnan(ref.astype(np.float32))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), ref_nan)
    np.testing.assert_array_equal(got.view(np.uint16)[~ref_nan], ref.view(np.uint16)[~ref_nan])
    # NaN keeps its sign.
    np.testing.assert_array_equal(
        np.signbit(got.astype(np.float32))[ref_nan], np.signbit(x[ref_nan])
    )


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_round_to_is_correct_one_ulp_beside_midpoints(name):
    """Values one float64 ulp either side of every midpoint round to the nearer neighbour.

    NumPy's float64 -> float16 cast is correctly rounded; ml_dtypes' float64 -> bfloat16 is
    not (it rounds through float32 first), so the reference here is exact rational rounding.
    """
    fmt = get_format(name)
    s = finite_sorted_values(SIXTEEN_BIT[name])
    mids = (s[:-1] + s[1:]) / 2
    x = np.concatenate([np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
    got = round_to(x, name).astype(np.float64)
    rng = np.random.default_rng(0)
    sample = rng.choice(x.size, 3000, replace=False)
    ref = np.array([fraction_round(Fraction(float(v)), fmt) for v in x[sample]])
    np.testing.assert_array_equal(got[sample], ref)
    if name == "float16":
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float64))


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32"])
@given(st.floats(allow_nan=False, allow_infinity=False, width=64))
@example(2.0**-25)  # float16 half of the smallest subnormal: tie to 0
@example(3 * 2.0**-25)  # tie between subnormals 1 and 2 -> 2
@example(65520.0)  # float16 overflow tie -> inf
@example(65519.99999999999)  # just below: max
@example(2.0**-133 * 1.5)  # bfloat16 subnormal tie
@example(5e-324)
def test_round_to_matches_exact_rational_rounding(name, v):
    fmt = get_format(name)
    got = float(round_to(np.float64(v), name))
    assert got == fraction_round(Fraction(v), fmt) or (got == 0 and v == 0)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_quantize_returns_representable_carrier_values(name):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(10_000) * np.exp(rng.uniform(-100, 20, 10_000))
    q = quantize(x, name)
    assert q.dtype == np.float32
    np.testing.assert_array_equal(q, round_to(x, name).astype(np.float32))
    np.testing.assert_array_equal(quantize(q, name), q)  # idempotent


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "tf32", "float8_e5m2"])
@pytest.mark.parametrize("mode", ["nearest", "toward_zero", "up"])
def test_overflow_gives_inf_or_max_without_a_warning(name, mode):
    """Overflow is a documented result (±inf in the modes that round away from zero there,
    ±max toward zero), in every format the same way: no RuntimeWarning (NumPy's own float64 ->
    float32 cast warns, the emulated formats' path never did)."""
    x = np.array([1e300, -1e300])
    fmt = get_format(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = quantize(x, name, rounding=mode).astype(np.float64)
        rt = round_to(x, name) if mode == "nearest" else None
    big = math.inf if mode != "toward_zero" else float(fmt.max)
    want = [big, -big] if mode != "up" else [math.inf, -float(fmt.max)]
    assert got.tolist() == want
    if rt is not None:
        assert rt.astype(np.float64).tolist() == [math.inf, -math.inf]


def test_round_to_scalar_and_shape():
    assert round_to(np.float32(1.0), "float16").shape == ()
    x = np.ones((3, 4), dtype=np.float32)
    assert round_to(x, "bfloat16").shape == (3, 4)
    assert round_to(np.ones((2, 0)), "float16").shape == (2, 0)


def test_round_to_rejects_non_float_input():
    with pytest.raises(TypeError, match="int64"):
        round_to(np.arange(3), "float16")
    with pytest.raises(TypeError, match="complex"):
        quantize(np.ones(2, dtype=complex), "float32")


def test_round_to_does_not_mutate_input():
    x = np.array([1.0 + 2.0**-12, np.nan, np.inf, 7e4], dtype=np.float32)
    before = x.copy()
    round_to(x, "float16")
    quantize(x, "bfloat16")
    np.testing.assert_array_equal(x, before)


# --- policy -------------------------------------------------------------------------------


def test_policy_uniform_and_paper():
    p = PrecisionPolicy.uniform("bf16")
    assert (p.storage.name, p.compute.name, p.loss.name) == ("bfloat16", "float32", "bfloat16")
    p = PrecisionPolicy.paper("float32", "float64")
    assert (p.storage.name, p.loss.name) == ("float32", "float64")
    assert p.to_dict() == {
        "storage": "float32",
        "compute": "float32",
        "loss": "float64",
        "order": "pairwise",
        "elementary": "correct",
    }
    assert PrecisionPolicy.uniform("float32", elementary="libm").elementary == "libm"
    with pytest.raises(ValueError, match="unknown elementary mode 'fast'"):
        PrecisionPolicy.uniform("float32", elementary="fast")


def test_policy_rejects_bad_values():
    with pytest.raises(ValueError, match="'backwards'.*pairwise"):
        PrecisionPolicy.uniform("float32", order="backwards")
    with pytest.raises(ValueError, match="narrower"):
        PrecisionPolicy(storage="float32", compute="float16", loss="float32")
    with pytest.raises(ValueError, match="float8"):
        PrecisionPolicy.uniform("float8")


def test_format_names_are_canonical():
    assert set(available_formats()) <= set(FORMAT_NAMES)
    for name in available_formats():
        assert get_format(name).name == name
        assert str(get_format(name)) == name
