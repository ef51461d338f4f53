"""numstab.elementary: exp, log, log1p, expm1 correctly rounded in every format.

The reference is an oracle written here, independent of the module: mpmath at 160 bits
(relative error below ``2**-158``), the two ends ``v (1 ± 2**-150)`` rounded to the format
with :func:`numstab.exact.round_exact` (integer arithmetic) and required to agree -- the oracle
fails loudly rather than guess -- plus the special values of C99 Annex F written out by hand.

* float16, bfloat16: exhaustive, all 65 536 bit patterns of every function (the oracle table
  is built once per session: ~10 s for the 8 tables on one core).
* float32: the neighbourhood of 0 (``±2**-k``), of 1, of every overflow / underflow threshold,
  the subnormal range, and random bit patterns. ``scripts/check_elementary.py`` checks all
  float32 inputs.
* float64: random inputs over each function's range, and published hard-to-round arguments
  (CORE-MATH's worst-case lists for exp and log, from Lefèvre--Muller / Zimmermann's
  searches: at least 45 identical bits after the rounding bit) pinned with ``@example``.
* longdouble (x87): a sample (every element goes through mpmath there).
* array_api_strict gives the same bits as NumPy (both are correct).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from helpers import all_patterns
from hypothesis import example, given
from hypothesis import strategies as st

from numstab import elementary as el
from numstab import exact as ex
from numstab.precision import available_formats, get_format, quantize

FUNCS = ("exp", "log", "log1p", "expm1")
HAS_LD = "longdouble" in available_formats()
_PREC = 160
_TOL_EXP = 150  # ends at v (1 ± 2**-150): mpmath's error at 160 bits is below 2**-158


# --- the oracle ---------------------------------------------------------------------------


def _special(name: str, v: float):
    """C99 Annex F value for an input outside the mpmath path, else None."""
    if math.isnan(v):
        return math.nan
    if name == "exp":
        if math.isinf(v):
            return math.inf if v > 0 else 0.0
    elif name == "expm1":
        if math.isinf(v):
            return math.inf if v > 0 else -1.0
        if v == 0:
            return v  # keeps the sign of zero
    elif name == "log":
        if v < 0:
            return math.nan
        if v == 0:
            return -math.inf
        if math.isinf(v):
            return math.inf
    else:  # log1p
        if v < -1:
            return math.nan
        if v == -1:
            return -math.inf
        if math.isinf(v):
            return math.inf
        if v == 0:
            return v
    return None


def oracle(name: str, x: np.ndarray, fmt: str) -> np.ndarray:
    """``RN_fmt(name(x))`` elementwise, in ``fmt``'s dtype, from mpmath (see the module doc)."""
    f = get_format(fmt)
    flat = np.asarray(x).reshape(-1)
    out = np.empty(flat.size, dtype=f.dtype)
    ctx = ex.context(_PREC)
    tol = ctx.mpf(2) ** -_TOL_EXP
    fn = getattr(ctx, name)
    with np.errstate(invalid="ignore"):  # NaN patterns widened on the way in
        exact_vals = ex.to_exact(flat, prec=_PREC)
    lo_list, hi_list, where = [], [], []
    for i in range(flat.size):
        v = float(flat[i]) if f.dtype != np.longdouble else flat[i]
        sp = _special(name, float(v))
        if sp is not None:
            out[i] = np.asarray(sp).astype(f.dtype)
            continue
        y = fn(exact_vals[i])
        lo_list.append(y * (1 - tol))
        hi_list.append(y * (1 + tol))
        where.append(i)
    if where:
        lo = ex.round_exact(np.array(lo_list, dtype=object), f)
        hi = ex.round_exact(np.array(hi_list, dtype=object), f)
        same = (lo == hi) | (np.isnan(lo) & np.isnan(hi))
        assert same.all(), f"oracle undecided for {name} at {flat[np.array(where)[~same]]}"
        out[np.array(where)] = lo
    return out.reshape(np.shape(x))


def same_bits(got, ref) -> np.ndarray:
    """Elementwise: equal values with equal sign bits, or both NaN."""
    got = np.asarray(got).astype(np.float64) if got.dtype != np.longdouble else got
    ref = np.asarray(ref).astype(got.dtype)
    both_nan = np.isnan(got) & np.isnan(ref)
    return both_nan | ((got == ref) & (np.signbit(got) == np.signbit(ref)))


def assert_correct(name, x, got, fmt):
    ref = oracle(name, x, fmt)
    ok = same_bits(np.asarray(got), ref)
    if not ok.all():
        bad = np.flatnonzero(~ok.reshape(-1))[:8]
        xs = np.asarray(x).reshape(-1)[bad]
        raise AssertionError(
            f"{name} {fmt}: {np.count_nonzero(~ok)} of {ok.size} wrong, e.g. x={xs.tolist()} "
            f"got={np.asarray(got).reshape(-1)[bad].tolist()} "
            f"want={ref.reshape(-1)[bad].tolist()}"
        )


# --- float16 and bfloat16: every input ------------------------------------------------------


@functools.cache
def table(name: str, fmt: str) -> np.ndarray:
    """The oracle over all 65 536 patterns, once per session."""
    return oracle(name, all_patterns(fmt), fmt)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", FUNCS)
def test_16_bit_formats_exhaustively(name, fmt):
    """All 65 536 inputs, from the format's own dtype and from the float32 carrier."""
    x = all_patterns(fmt)
    got = el.evaluate(name, x, fmt)
    assert got.dtype == np.float32
    ok = same_bits(got, table(name, fmt))
    assert ok.all(), (name, fmt, x[~ok][:8], got[~ok][:8])
    carried = el.evaluate(name, x.astype(np.float32), fmt)
    np.testing.assert_array_equal(carried.view(np.uint32), got.view(np.uint32))


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_16_bit_libm_mode_is_float32_libm_rounded_once_more(fmt):
    """``libm``: ``fl_fmt(numpy_f(x_float32))`` (the project's former bits), for every input."""
    x = all_patterns(fmt).astype(np.float32)
    with np.errstate(all="ignore"):
        for name in FUNCS:
            want = quantize(getattr(np, name)(x), fmt)
            got = el.evaluate(name, x, fmt, mode="libm")
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# --- float32 ----------------------------------------------------------------------------------


def _f32(values) -> np.ndarray:
    return np.unique(np.asarray(values, dtype=np.float64).astype(np.float32))


def _around(centres, k=40) -> np.ndarray:
    """``k`` consecutive float32 values on each side of every centre."""
    c = np.asarray(centres, dtype=np.float32)
    steps = np.arange(-k, k + 1, dtype=np.int64)
    bits = c.view(np.int32).astype(np.int64)[:, None] + steps[None, :]
    bits = bits[(bits >= -(2**31)) & (bits < 2**31)]
    return np.unique(bits.astype(np.int32).view(np.float32))


def float32_inputs(name: str) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, name)))
    random_bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    pow2 = [2.0**-k for k in range(0, 150)]
    near0 = _around(pow2 + [-v for v in pow2], k=2)
    common = np.concatenate(
        [
            random_bits.view(np.float32),
            near0,
            _around([1.0, -1.0, 2.0**-23, -(2.0**-23), 2.0**-24, -(2.0**-24)], k=60),
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan], dtype=np.float32),
            np.float32(2.0**-149) * np.arange(1, 300, dtype=np.float32),  # subnormals
        ]
    )
    if name in ("exp", "expm1"):
        # exp overflows from ln(max + ulp/2) = 88.7228...; results go subnormal below
        # ln(2**-126) = -87.3365... and round to 0 below ln(2**-150) = -103.972...
        extra = [
            _around([88.72283, 88.7228394, -87.33655, -103.97208, -103.2789, -16.0], k=80),
            rng.uniform(-110, 90, 3000),
            rng.uniform(-1, 1, 2000),
        ]
    else:
        # log of subnormals, of values near 1 and -1 (log1p's pole), of huge values.
        extra = [
            _around([1.0, 0.5, 2.0, -1.0, -0.5, 3.4028235e38, 1.1754944e-38], k=80),
            np.exp(rng.uniform(-103, 88, 3000)),
            rng.uniform(-1, 1, 2000),
        ]
    return np.concatenate([common, *[np.asarray(e).astype(np.float32) for e in extra]])


@pytest.mark.parametrize("name", FUNCS)
def test_float32_sampled(name):
    x = float32_inputs(name)
    got = el.evaluate(name, x, "float32")
    assert got.dtype == np.float32
    assert_correct(name, x, got, "float32")


def test_float32_exp_near_zero_regression():
    """exp(-2**-23) = 1 - 2**-23 + 2**-47 - ...: the nearest float32 is 1 - 2**-23
    (0.99999988). NumPy's float32 exp gives a different value on this machine (measured at
    run time below, not assumed); ``libm`` mode keeps it, ``correct`` does not."""
    x = np.array([-(2.0**-23)], dtype=np.float32)
    got = el.exp(x)
    assert got[0] == np.float32(1 - 2.0**-23)
    assert_correct("exp", x, got, "float32")
    np.testing.assert_array_equal(el.exp(x, mode="libm"), np.exp(x))


def test_scalar_and_shape_handling():
    assert el.exp(np.float32(0.0)).shape == ()
    x = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    assert el.log1p(x).shape == (3, 4)
    assert el.exp(x[:, ::2]).shape == (3, 2)  # non-contiguous input
    with pytest.raises(ValueError, match="unknown elementary mode"):
        el.exp(x, mode="fast")
    with pytest.raises(ValueError, match="unknown elementary function"):
        el.evaluate("sin", x)
    with pytest.raises(ValueError, match="unknown format"):
        el.exp(x, "float8")


# --- float64 ----------------------------------------------------------------------------------

# Published hard-to-round arguments (CORE-MATH's worst-case lists for binary64 exp and log,
# which collect Lefèvre--Muller's and later searches): a sample from each list.
EXP_HARD = [
    "0x1.0122ef37212ebp-1", "0x1.00d48a707b93ep-1", "0x1.00e0e33c8c3fdp-1",
    "0x1.0303c5638675fp-1", "0x1.9a945965ff098p-1", "0x1.fedc746ddf8fap-1",
    "0x1.008eb56314daap+0", "0x1.5e0a70df7b68fp+0", "-0x1.4e0416ecbbf74p+6",
    "-0x1.4ea04cbfc458ap+8", "-0x1.4f00000000037p-46", "-0x1.51993a0221e9ap+9",
    "-0x1.520000000001cp-47", "-0x1.5b3e4e2e3bba9p+9", "-0x1.62c9fc0dcbdb5p+9",
    "-0x1.80000018p-26", "-0x1.9374800009ef6p-37", "-0x1.bed68c759d375p+8",
    "-0x1.e95ce5c126f22p+8", "-0x1.f1403e6266858p+8", "-0x1.6000000000002p-51",
]  # fmt: skip
LOG_HARD = [
    "0x1.a6ae5142326b5p+0", "0x1.c877cba59d0acp+0", "0x1.1e852e6951306p+1",
    "0x1.0f955b46f7ac5p+1", "0x1.967e2d739876bp+1", "0x1.39e3e05fe5f35p+3",
    "0x1.0af4fba7063b8p+4", "0x1.15956b273c365p+8", "0x1.a455a70c31d8p+13",
    "0x1.561031d4db97cp+16", "0x1.7d822b508bb3bp+20", "0x1.5106c15d1fc3fp+22",
    "0x1.187473f1019f6p+31", "0x1.8e27f4f0e6c74p+34", "0x1.a6004162f2b8cp+45",
]  # fmt: skip


def _hard(name):
    return np.array([float.fromhex(h) for h in (EXP_HARD if name == "exp" else LOG_HARD)])


def float64_inputs(name: str) -> np.ndarray:
    rng = np.random.default_rng(64 + sum(map(ord, name)))
    specials = [0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 5e-324, -5e-324, 2.0**-1022]
    if name == "exp":
        parts = [
            rng.uniform(-750, 712, 1500),
            rng.uniform(-1, 1, 500),
            rng.uniform(-746, -708, 150),  # subnormal results
            709.782712893384 + np.arange(-30, 31) * 2.0**-43,  # the overflow threshold
            -745.1332191019411 + np.arange(-30, 31) * 2.0**-43,  # half the smallest subnormal
            -(2.0 ** -np.arange(1, 60)),
            _hard("exp"),
        ]
    elif name == "expm1":
        parts = [
            rng.uniform(-50, 712, 1500),
            rng.uniform(-1e-3, 1e-3, 300),
            2.0 ** -np.arange(1, 80),
            -(2.0 ** -np.arange(1, 80)),
            709.782712893384 + np.arange(-30, 31) * 2.0**-43,
        ]
    else:
        parts = [
            np.exp(rng.uniform(-740, 709, 1500)),
            1 + rng.uniform(-1e-3, 1e-3, 300),
            rng.uniform(-1, 1, 300),
            -1 + 2.0 ** -np.arange(1, 60),
            np.float64(5e-324) * np.arange(1, 50),
        ]
        if name == "log":
            parts.append(_hard("log"))
    return np.concatenate([np.asarray(specials), *parts])


@pytest.mark.parametrize("name", FUNCS)
def test_float64_sampled(name):
    x = float64_inputs(name)
    got = el.evaluate(name, x, "float64")
    assert got.dtype == np.float64
    assert_correct(name, x, got, "float64")


def _hard_examples(name):
    def deco(test):
        for v in _hard(name):
            test = example(x=float(v))(test)
        return test

    return deco


@given(x=st.floats(min_value=-745.5, max_value=710.0))
@_hard_examples("exp")
def test_float64_exp_property(x):
    xs = np.array([x])
    assert_correct("exp", xs, el.exp(xs), "float64")


@given(x=st.floats(min_value=0.0, exclude_min=True, allow_infinity=False))
@_hard_examples("log")
def test_float64_log_property(x):
    xs = np.array([x])
    assert_correct("log", xs, el.log(xs), "float64")


def test_float64_exp_hard_cases_for_nearest_go_to_mpmath():
    """The listed arguments are hard for some rounding mode: within ``2**-45`` ulp of a
    float64 (hard for directed rounding) or of a midpoint (hard for nearest). The latter must
    fall in the window that the double-double evaluation refers to mpmath; all come out
    correct."""
    x = _hard("exp")
    ctx = ex.context(_PREC)
    near_mid = []
    for v in x:
        y = ctx.exp(ctx.mpf(float(v)))
        e = max(int(ctx.floor(ctx.log(y, 2))), -1022)  # below 2**-1022: the subnormal grid
        frac = (y / ctx.mpf(2) ** (e - 52)) % 1  # position between two float64s, in ulps
        near_mid.append(abs(frac - 0.5) < 2.0**-30)
    near_mid = np.array(near_mid)
    assert near_mid.any()
    _, needs = el._exp64_block(x, np)
    assert needs[near_mid].all()
    assert_correct("exp", x, el.exp(x), "float64")


def _args_near_tiny_midpoints(ns) -> np.ndarray:
    """float64 arguments whose ``exp`` is nearest to ``(n + 1/2) 2**-1074`` (a midpoint of
    the subnormal grid, hard for nearest), with their two float64 neighbours."""
    ctx = ex.context(_PREC)
    out = []
    for n in ns:
        v = float(ctx.log((ctx.mpf(int(n)) + ctx.mpf(0.5)) * ctx.mpf(2) ** -1074))
        out += [np.nextafter(v, -np.inf), v, np.nextafter(v, np.inf)]
    return np.array(out)


def test_float64_exp_tiny_results_near_subnormal_midpoints():
    """Results below ``2**-1022`` are rounded on the grid of ``2**-1074`` from the
    double-double; arguments whose result lies next to a midpoint of that grid (from the
    smallest subnormal to just below ``2**-1022``) and their neighbours come out correct."""
    rng = np.random.default_rng(1074)
    ns = [*range(8), *rng.integers(8, 2**52, 120), 2**52 - 1]
    x = _args_near_tiny_midpoints(ns)
    assert_correct("exp", x, el.exp(x), "float64")


def test_float64_exp_decides_tiny_results_without_mpmath():
    """The double-double decides subnormal results itself: the window referred to mpmath is
    ``2**-16`` wide on each side of a midpoint, ``2**-15`` of random arguments, so at most a
    few of these 4 000 (the expected count is 0.12). All are correct."""
    x = np.random.default_rng(708).uniform(-745.13, -708.4, 4000)
    _, needs = el._exp64_block(x, np)
    assert np.count_nonzero(needs) <= 4
    assert_correct("exp", x, el.exp(x), "float64")


# --- longdouble ---------------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_LD, reason="long double is float64 on this platform")
@pytest.mark.parametrize("name", FUNCS)
def test_longdouble_sample(name):
    rng = np.random.default_rng(7)
    x = rng.uniform(-20, 20, 120).astype(np.longdouble)
    x = x + x * np.longdouble(2.0**-60)  # bits beyond float64's 53
    if name in ("log", "log1p"):
        x = np.abs(x)
    x = np.concatenate([x, np.array([0.0, np.inf, -np.inf, np.nan], dtype=np.longdouble)])
    got = el.evaluate(name, x, "longdouble")
    assert got.dtype == np.longdouble
    assert_correct(name, x, got, "longdouble")


# --- other backends ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["float32", "float64"])
@pytest.mark.parametrize("name", FUNCS)
def test_array_api_strict_gives_the_same_bits(name, fmt):
    xps = pytest.importorskip("array_api_strict")
    x = (float32_inputs if fmt == "float32" else float64_inputs)(name)
    x = x[:1200] if fmt == "float64" else x
    x = x.astype(get_format(fmt).dtype)
    x = x[: x.size // 2 * 2].reshape(2, -1)  # 2-D, as the losses pass them
    host = el.evaluate(name, x, fmt)
    dev = el.evaluate(name, xps.asarray(x), fmt)
    assert type(dev).__module__.startswith("array_api_strict")
    np.testing.assert_array_equal(np.asarray(dev).view(np.uint8), host.view(np.uint8))


# --- the audit: rounding_fidelity -----------------------------------------------------------


def test_rounding_fidelity_counts_wrong_results_and_their_ulps():
    """A function that is the oracle except for k results moved by one ulp: exactly k wrong,
    worst error between 0.5 and 1.5 ulps, and a correctly rounded function scores 1.0 with at
    most half an ulp."""
    from numstab.fidelity import rounding_fidelity

    rng = np.random.default_rng(3)
    x = rng.uniform(-20, 5, 400).astype(np.float32)
    ref = oracle("exp", x, "float32")
    bumped = ref.copy()
    k = np.arange(0, 400, 37)
    bumped[k] = np.nextafter(ref[k], np.float32(np.inf))
    r = rounding_fidelity(lambda v: bumped, x, "exp")
    assert (r.n, r.n_correct) == (400, 400 - k.size)
    assert 0.5 < r.max_ulp_error <= 1.5
    assert r.worst_input in x[k].tolist()
    good = rounding_fidelity(el.exp, x, "exp")
    assert good.fraction_correct == 1.0 and good.max_ulp_error <= 0.5
    assert good.worst_input is None


def test_rounding_fidelity_specials_callables_and_errors():
    from numstab.fidelity import rounding_fidelity

    x = np.array([0.0, -0.0, 1.0, -1.0, np.inf, np.nan], dtype=np.float64)
    r = rounding_fidelity(lambda v: el.log1p(v), x, "log1p")
    assert r.n_correct == 6 and r.max_ulp_error <= 0.5
    wrong_zero = rounding_fidelity(lambda v: np.abs(el.expm1(v)) * 0 + 0.0, x[:2], "expm1")
    assert wrong_zero.n_correct == 1  # +0 for expm1(-0) = -0 is wrong
    t = rounding_fidelity(np.tanh, np.float32([0.25, -3.0]), lambda ctx, v: ctx.tanh(v))
    assert t.n == 2 and t.format == "float32"
    with pytest.raises(ValueError, match="unknown exact function"):
        rounding_fidelity(np.exp, x, "sin")
    with pytest.raises(TypeError, match="fn must be callable"):
        rounding_fidelity("exp", x)
    with pytest.raises(ValueError, match="returned 1 values"):
        rounding_fidelity(lambda v: v[:1], x, "exp")


def test_check_script_on_a_range(capsys):
    """scripts/check_elementary.py over 2**14 float32 patterns around 1.0 and -87.3 (the
    subnormal-result threshold of exp) reports no mismatch; a bad range exits 2."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "check_elementary.py"
    spec = importlib.util.spec_from_file_location("check_elementary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    one = int(np.float32(1.0).view(np.uint32))
    assert mod.main(["all", "--start", str(one - 4096), "--stop", str(one + 4096)]) == 0
    edge = int(np.float32(-87.3365).view(np.uint32))
    assert mod.main(["exp", "--start", str(edge - 4096), "--stop", str(edge + 4096)]) == 0
    out = capsys.readouterr().out
    assert "exp: 8192 inputs" in out and "0 mismatches" in out
    with pytest.raises(SystemExit) as exc:
        mod.main(["exp", "--start", "10", "--stop", "5"])
    assert exc.value.code == 2
