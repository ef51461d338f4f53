"""The numeric core is backend-generic: under ``array_api_strict`` it gives NumPy's bits.

``array_api_strict`` implements the array-API standard and nothing else (no ufunc ``out=``,
no integer-array assignment, no bit views, its own dtype objects, no mixing of floats and
booleans), so a NumPy-only call in the numeric code raises here. Every function is run on
strict arrays and on NumPy arrays holding the same values, for float32 and float64, and must
return arrays of the strict namespace whose values are bit-identical to NumPy's (signed zeros
and NaN included). A last-bit difference would mean a different order of operations: a
genericity bug, not a tolerance to widen.

float16/bfloat16 need bit views (NumPy and CuPy only): on strict arrays they are a TypeError
that says so.
"""

import math

import array_api_strict as xps
import ml_dtypes
import numpy as np
import pytest

from numstab import metrics as M
from numstab import precision
from numstab.backend import SegmentRows, namespace, sparse_rows_matrix
from numstab.functional import (
    LOSS_KINDS,
    GatherPlan,
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
from numstab.mlp import MLPConfig, backward, forward, init_params
from numstab.precision import PrecisionPolicy, get_format, quantize, round_to
from numstab.summation import ordered_sum

FORMATS = ("float32", "float64")
ORDERS = ("pairwise", "sequential", "sorted", "wide")
# float64's wide order accumulates in x87 longdouble, which exists only in NumPy (a TypeError
# test covers the strict namespace): those combinations are not generated at all.
FORMAT_ORDERS = [(f, o) for f in FORMATS for o in ORDERS if not (f == "float64" and o == "wide")]


# --- helpers ------------------------------------------------------------------------------


def strict(a):
    """The same values as a strict array (integers stay int64, floats keep their dtype)."""
    return xps.asarray(np.ascontiguousarray(a))


def is_strict(a) -> bool:
    return type(a).__module__.startswith("array_api_strict")


def assert_same(got, want, what=""):
    """``got`` is a strict array with exactly ``want``'s bits (a NumPy array)."""
    assert is_strict(got), f"{what}: {type(got)} is not a strict array"
    g = np.asarray(got)
    want = np.asarray(want)
    assert g.dtype == want.dtype and g.shape == want.shape, (what, g.dtype, want.dtype)
    if want.dtype.kind == "f":
        ui = {4: np.uint32, 8: np.uint64}[want.dtype.itemsize]
        nan = np.isnan(want)
        assert (np.isnan(g) == nan).all(), what
        bad = g[~nan].view(ui) != want[~nan].view(ui)
        assert not bad.any(), (
            f"{what}: {int(bad.sum())} of {bad.size} differ ({g[~nan][bad][:4]} "
            f"vs {want[~nan][bad][:4]})"
        )
    else:
        np.testing.assert_array_equal(g, want, err_msg=what)


def spread(rng, shape, fmt, lo=-30, hi=30):
    """Values of both signs over many binades (so that summation order shows), in ``fmt``."""
    v = rng.standard_normal(shape) * np.exp2(rng.uniform(lo, hi, shape))
    return quantize(v, fmt)


def logits(rng, fmt, n=24, c=37):
    """Rows from well mixed to collapsed (a dominant logit), a few ties and signed zeros."""
    z = rng.standard_normal((n, c)) * rng.uniform(0.1, 8.0, (n, 1))
    top = rng.integers(0, c, n)
    z[np.arange(n), top] += np.linspace(0.0, 60.0, n)  # gap from 0 to far past collapse
    z[0] = 0.0
    z[1, :3] = -0.0
    z[2, 5:9] = z[2].max()  # ties at the max
    return quantize(z, fmt)


@pytest.fixture
def rng():
    return np.random.default_rng(20250117)


def test_assert_same_reports_both_sides_of_a_difference():
    """A failure names what differs on both sides (the message was once cut after the first
    half: its second f-string stood alone as a statement of its own)."""
    got = strict(np.array([1.0, 2.0, np.nan], np.float32))
    want = np.array([1.0, 3.0, np.nan], np.float32)
    with pytest.raises(AssertionError) as info:
        assert_same(got, want, "probe")
    assert str(info.value).startswith("probe: 1 of 2 differ ([2.] vs [3.])"), str(info.value)


# --- summation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "order"), FORMAT_ORDERS)
@pytest.mark.parametrize("n", [0, 1, 5, 8, 61, 128, 129, 300, 1031])
def test_ordered_sum_is_bit_identical(fmt, order, n, rng):
    x = spread(rng, (6, n), fmt)
    if n:
        x[0] = -0.0  # signed zeros: NumPy's reduction starts from +0
        x[1, : n // 2] = 0.0
    want = ordered_sum(x, fmt, order)
    assert_same(ordered_sum(strict(x), fmt, order), want, f"{fmt} {order} n={n}")


def test_ordered_sum_orders_differ_on_these_inputs(rng):
    """The data above separate the orders (else the bit-identity test would prove little)."""
    x = spread(rng, (6, 300), "float32")
    sums = {o: ordered_sum(x, "float32", o) for o in ORDERS}
    assert len({s.tobytes() for s in sums.values()}) == len(ORDERS)


def test_wide_float32_accumulates_in_float64(rng):
    x = spread(rng, (3, 200), "float32")
    got = ordered_sum(strict(x), "float32", "wide")
    assert got.dtype == xps.float32
    want = quantize(np.sum(x.astype(np.float64), axis=-1), "float32")
    assert_same(got, want, "wide")


def test_wide_float64_and_longdouble_are_numpy_only(rng):
    x = strict(spread(rng, (2, 5), "float64"))
    with pytest.raises(TypeError, match="longdouble.*not available.*float32 and float64"):
        ordered_sum(x, "float64", "wide")
    with pytest.raises(TypeError, match="longdouble.*not available"):
        quantize(x, "longdouble")


# --- rounding -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_between_float32_and_float64(fmt, rng):
    x = rng.standard_normal(500) * np.exp2(rng.uniform(-160, 140, 500))
    x[:4] = [np.inf, -np.inf, np.nan, -0.0]
    for src in (np.float32, np.float64):
        with np.errstate(over="ignore"):
            xs = x.astype(src)
        with np.errstate(over="ignore"):  # float64 -> float32 overflows to inf (IEEE)
            for fn in (quantize, round_to):
                assert_same(fn(strict(xs), fmt), fn(xs, fmt), f"{src.__name__}->{fmt}")


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
@pytest.mark.parametrize("src", ["float32", "float64"])
def test_16_bit_formats_on_strict_arrays_are_a_clear_type_error(fmt, src):
    x = xps.asarray([1.0, 2.5], dtype=getattr(xps, src))
    for fn in (quantize, round_to):
        with pytest.raises(
            TypeError, match=r"float16/bfloat16.*NumPy or CuPy.*float32 and float64"
        ):
            fn(x, fmt)
    with pytest.raises(TypeError, match="float16/bfloat16"):
        loss_forward(xps.asarray([[1.0, 2.0]]), xps.asarray([0]), fmt=fmt)
    with pytest.raises(TypeError, match="float16/bfloat16"):
        gemm(xps.ones((2, 2)), xps.ones((2, 2)), PrecisionPolicy.uniform(fmt))


def _all_bfloat16_patterns_and_midpoints():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    with np.errstate(invalid="ignore"):
        x = bits.astype(np.float32)
    s = np.unique(x[np.isfinite(x)].astype(np.float64))
    mids = (s[:-1] + s[1:]) / 2  # exact in float64; in float32 too (8 + 1 bits)
    return np.concatenate([x, mids.astype(np.float32)])


@pytest.mark.parametrize("src", [np.float32, np.float64])
def test_round_bits_is_the_one_bfloat16_emulation_and_matches_ml_dtypes(src):
    """``precision._round_bits`` is the single rounding routine of float16/bfloat16 for every
    backend with bit views: ``quantize`` calls it for NumPy and for CuPy arrays alike, with
    no backend branch inside (it takes the module that owns its input, ``array_module(x)``,
    and only uses what NumPy and CuPy arrays share: ``view``, ufuncs with ``out=``, boolean
    masks). So the CuPy path *is* this code path, run here on NumPy arrays: it must equal
    ml_dtypes' conversion on all 65 536 bfloat16 patterns and on every midpoint between
    neighbouring finite values (ties to even), from float32 and from float64 sources.
    (``tests/test_gpu.py`` runs the same comparison on a device when one is present.)
    Every input has at most 9 significant bits, so it is exact in float32: a cast that goes
    from float64 through float32 (as some ml_dtypes releases do) rounds only once here, and
    ml_dtypes is a valid reference on these inputs whichever way it converts."""
    with np.errstate(invalid="ignore"):  # NaN patterns
        x = _all_bfloat16_patterns_and_midpoints().astype(src)
    fmt = get_format("bfloat16")
    got = precision._round_bits(x.copy(), fmt)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).astype(src)
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all()
    ui = np.uint32 if src == np.float32 else np.uint64
    np.testing.assert_array_equal(got[~nan].view(ui), want[~nan].view(ui))
    assert (np.signbit(got[nan]) == np.signbit(x[nan])).all()


def test_quantize_routes_every_view_backend_through_round_bits(monkeypatch):
    """``quantize`` hands 16-bit formats to ``_round_bits`` whatever the backend: the spy
    sees the call (and would see a CuPy array the same way)."""
    seen = []
    real = precision._round_bits

    def spy(x, fmt):
        seen.append((type(x).__module__, fmt.name))
        return real(x, fmt)

    monkeypatch.setattr(precision, "_round_bits", spy)
    quantize(np.array([1.0, 3.0]), "bfloat16")
    quantize(np.array([1.0, 3.0], dtype=np.float32), "float16")
    assert seen == [("numpy", "bfloat16"), ("numpy", "float16")]


# --- layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_and_linear_layer(fmt, rng):
    pol = PrecisionPolicy.uniform(fmt)
    x, w, b = spread(rng, (13, 40), fmt, -4, 4), spread(rng, (40, 9), fmt, -4, 4), None
    assert_same(gemm(strict(x), strict(w), pol), gemm(x, w, pol), "gemm")
    for b in (None, spread(rng, (9,), fmt, -4, 4)):
        y, cache = linear_forward(x, w, b, pol)
        ys, caches = linear_forward(strict(x), strict(w), None if b is None else strict(b), pol)
        assert_same(ys, y, "linear_forward")
        dy = spread(rng, (13, 9), fmt, -6, 6)
        dy[:, 0] = -0.0  # an all -0 bias gradient column
        want = linear_backward(dy, cache, pol)
        got = linear_backward(strict(dy), caches, pol)
        for g, w_ in zip(got, want, strict=True):
            if w_ is None:
                assert g is None
            else:
                assert_same(g, w_, "linear_backward")


def test_mixed_policy_float32_storage_float64_compute(rng):
    pol = PrecisionPolicy(storage="float32", compute="float64", loss="float32")
    a, b = spread(rng, (7, 50), "float32", -8, 8), spread(rng, (50, 5), "float32", -8, 8)
    assert_same(gemm(strict(a), strict(b), pol), gemm(a, b, pol), "gemm f32/f64")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gather_forward_backward(fmt, k, rng):
    pol = PrecisionPolicy.uniform(fmt)
    n, n_rows, n_out = 300, 23, 17
    idx = rng.integers(0, n_rows, (n, k))
    if k == 3:
        idx[::7, 2] = idx[::7, 1]  # a sample hitting one row twice
    w = spread(rng, (n_rows, n_out), fmt, -3, 3)
    w[4] = -0.0
    b = spread(rng, (n_out,), fmt, -3, 3)
    for bias in (None, b):
        h, cache = gather_forward(idx, w, bias, pol)
        hs, caches = gather_forward(
            strict(idx), strict(w), None if bias is None else strict(bias), pol
        )
        assert_same(hs, h, "gather_forward")
        plan, plans = GatherPlan.build(idx, n_rows), GatherPlan.build(strict(idx), n_rows)
        assert isinstance(plans.matrix, SegmentRows)
        dh = spread(rng, (n, n_out), fmt, -20, 20)
        dw, db = gather_backward(dh, cache, plan, pol)
        dws, dbs = gather_backward(strict(dh), caches, plans, pol)
        assert_same(dws, dw, "gather_backward dW")
        if bias is None:
            assert dbs is None and db is None
        else:
            assert_same(dbs, db, "gather_backward db")


def test_segment_rows_follows_the_csr_order_at_the_papers_size(rng):
    """A dense 0/1 product through BLAS adds the same terms in a blocked order (measured:
    ~77% of the entries differ in the last bits at 5107 samples); ``SegmentRows`` must give
    the CSR kernel's bits."""
    p, n = 113, 5107
    idx = np.stack([rng.integers(0, p, n), p + rng.integers(0, p, n)], axis=1)
    flat = idx.reshape(-1)
    samples = np.repeat(np.arange(n), 2)
    csr = sparse_rows_matrix(flat, samples, (2 * p, n), None)
    seg = sparse_rows_matrix(flat, samples, (2 * p, n), xps.asarray([0.0]))
    assert isinstance(seg, SegmentRows) and seg.shape == (2 * p, n)
    for dt in (np.float32, np.float64):
        dh = (rng.standard_normal((n, 64)) * np.exp2(rng.uniform(-10, 10, (n, 1)))).astype(dt)
        want = csr.astype(dt) @ dh
        assert_same(seg.astype(getattr(xps, dt.__name__)) @ strict(dh), want, dt.__name__)


@pytest.mark.parametrize("fmt", FORMATS)
def test_relu(fmt, rng):
    x = spread(rng, (9, 11), fmt, -3, 3)
    x[0, :4] = [-0.0, 0.0, np.nan, -np.inf]
    y, cache = relu_forward(x)
    ys, caches = relu_forward(strict(x))
    assert_same(ys, y, "relu_forward")
    assert caches is ys
    dy = spread(rng, (9, 11), fmt, -3, 3)  # negative upstream times 0 gives -0
    assert_same(relu_backward(strict(dy), caches), relu_backward(dy, cache), "relu_backward")


# --- losses -------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "order"), FORMAT_ORDERS)
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_loss_forward_backward(fmt, kind, order, rng):
    z = logits(rng, fmt)
    y = rng.integers(0, z.shape[1], z.shape[0])
    y[3:8] = np.argmax(z[3:8], axis=-1)  # targets that are the argmax (collapse possible)
    y[9] -= z.shape[1]  # a negative label counts from the end, as in NumPy indexing
    for eps in (0.0, 1e-30) if kind == "stablemax" else (0.0,):
        kw = {"kind": kind, "fmt": fmt, "order": order, "eps": eps}
        loss, cache = loss_forward(z, y, **kw)
        losss, caches = loss_forward(strict(z), strict(y), **kw)
        assert_same(losss, loss, f"{kind} loss")
        assert_same(caches.normaliser, cache.normaliser, f"{kind} normaliser")
        assert_same(caches.probs, cache.probs, f"{kind} probs")
        for dloss in (1.0 / z.shape[0], 1.0, np.linspace(0.5, 2.0, z.shape[0])):
            got = loss_backward(caches, dloss)
            assert_same(got, loss_backward(cache, dloss), f"{kind} backward")
        assert_same(
            loss_backward(caches, strict(np.full(z.shape[0], 0.25))),
            loss_backward(cache, 0.25),
            f"{kind} backward, strict dloss",
        )
        assert_same(reduce_loss(losss), reduce_loss(loss), "reduce_loss")


def test_collapse_is_exercised(rng):
    """The logits above contain collapsed and non-collapsed rows in both formats."""
    for fmt in FORMATS:
        m = collapse_mask(logits(rng, fmt), fmt)
        assert m.any() and not m.all()


@pytest.mark.parametrize(("fmt", "order"), FORMAT_ORDERS)
@pytest.mark.parametrize("kind", ["softmax", "stablemax"])
def test_collapse_mask(fmt, kind, order, rng):
    z = logits(rng, fmt)
    z[4, 0] = np.nan
    z[5, 1] = np.inf
    z[6, :] = -np.inf
    got = collapse_mask(strict(z), fmt, kind=kind, order=order)
    assert_same(got, collapse_mask(z, fmt, kind=kind, order=order), "collapse_mask")


@pytest.mark.parametrize("fmt", FORMATS)
def test_stablemax_s(fmt, rng):
    x = spread(rng, (5, 30), fmt, -10, 10)
    x[0, :4] = [-np.inf, np.inf, -0.0, np.nan]
    for eps in (0.0, 1e-30, 0.5):
        for a, b in zip(
            stablemax_s(strict(x), fmt, eps=eps), stablemax_s(x, fmt, eps=eps), strict=True
        ):
            assert_same(a, b, f"stablemax_s eps={eps}")


# --- the whole model ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("input_kind", "bias", "alpha"),
    [("index", False, 1.0), ("index", True, 2.5), ("dense", False, 1.0), ("dense", True, 0.3)],
)
def test_mlp_forward_backward_and_a_loss_step(fmt, input_kind, bias, alpha, rng):
    p = 11
    cfg = MLPConfig(2 * p, p, hidden=(16, 12), bias=bias, alpha=alpha, input_kind=input_kind)
    pol = PrecisionPolicy.uniform(fmt)
    params = init_params(cfg, 3, fmt)
    params_s = init_params(cfg, 3, fmt, xp=xps)
    for k in params:
        assert_same(params_s[k], params[k], f"init {k}")
    a, b = rng.integers(0, p, 60), rng.integers(0, p, 60)
    idx = np.stack([a, p + b], axis=1)
    if input_kind == "index":
        x, xs = idx, strict(idx)
        plan, plans = GatherPlan.build(idx, 2 * p), GatherPlan.build(xs, 2 * p)
    else:
        x = np.zeros((60, 2 * p))
        x[np.arange(60), idx[:, 0]] = 1.0
        x[np.arange(60), idx[:, 1]] = 1.0
        x = quantize(x, fmt)
        xs, plan, plans = strict(x), None, None
    z, caches = forward(params, x, cfg, pol)
    zs, cachess = forward(params_s, xs, cfg, pol)
    assert_same(zs, z, "logits")
    y = (a + b) % p
    loss, lc = loss_forward(z, y, fmt=fmt)
    losss, lcs = loss_forward(zs, strict(y), fmt=fmt)
    assert_same(losss, loss, "loss")
    dz, dzs = loss_backward(lc, 1.0 / 60), loss_backward(lcs, 1.0 / 60)
    grads = backward(dz, caches, cfg, pol, plan)
    gradss = backward(dzs, cachess, cfg, pol, plans)
    assert list(gradss) == list(grads)
    for k in grads:
        assert_same(gradss[k], grads[k], f"grad {k}")


# --- metrics ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_metrics(fmt, rng):
    z = logits(rng, fmt)
    z[7, 2] = np.nan
    y = rng.integers(0, z.shape[1], z.shape[0])
    y[3:12] = np.argmax(z[3:12], axis=-1)
    acc = M.accuracy(strict(z), strict(y))
    assert isinstance(acc, float) and acc == M.accuracy(z, y) and 0 < acc < 1
    assert_same(M.logit_gaps(strict(z), strict(y)), M.logit_gaps(z, y), "logit_gaps")
    params = {"W1": spread(rng, (30, 8), fmt, -5, 5), "W2": spread(rng, (8, 4), fmt, -5, 5)}
    grads = {k: spread(rng, v.shape, fmt, -9, 3) for k, v in params.items()}
    sp = {k: strict(v) for k, v in params.items()}
    sg = {k: strict(v) for k, v in grads.items()}
    got, want = M.cosine(sp["W1"], sg["W1"]), M.cosine(params["W1"], grads["W1"])
    assert isinstance(got, float) and got == want
    assert math.isnan(M.cosine(strict(np.zeros(3)), strict(np.ones(3))))
    assert M.param_norms(sp) == M.param_norms(params)
    for sign in (1.0, -1.0):
        assert M.param_cosines(sp, sg, sign=sign) == M.param_cosines(params, grads, sign=sign)


def test_namespace_of_results_is_the_inputs(rng):
    """NumPy inputs still give plain NumPy arrays (no wrapper on the hot path)."""
    x = spread(rng, (3, 4), "float32", -2, 2)
    assert namespace(x) is np
    assert type(ordered_sum(x, "float32")) is np.ndarray
    assert type(relu_forward(x)[0]) is np.ndarray
    assert namespace(strict(x)) is xps
