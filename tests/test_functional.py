"""Tests for numstab.functional: gemm, linear, gather, ReLU and the three losses.

Every check compares against a reference that does not share code with the function under
test: float64 central finite differences along a random direction (the HIPS/autograd
``check_grads`` dot-product test), ``numstab.exact`` (mpmath at 256 bits), closed forms, or
exact integer / ``math.fsum`` arithmetic.

Error model behind every tolerance (float64 unless stated)
----------------------------------------------------------
* ``u = 2**-53``; ``+ - * /`` are correctly rounded (relative error <= u).
* ``elementary="correct"`` (the default): ``exp``, ``log`` and ``log1p`` are correctly
  rounded (``tests/test_elementary.py``), relative error ``u``. ``elementary="libm"``: NumPy's
  float64 functions are within 2 ulps, i.e. relative error ``EXP = 4u`` (an ulp is at most
  ``2u`` relative); ``test_libm_accuracy_assumption`` checks it.
* A sum or dot product of ``n`` terms, in any order, is within ``γ_n · Σ|terms|`` of the exact
  value, ``γ_n = n·u / (1 - n·u)``.
* The loss bounds are first order; the factor ``SLACK = 1.01`` covers the second-order terms
  (relative size ~1e-13) and the float64 evaluation of the bound itself.

Finite differences
------------------
``numstab.testing.check_vjp``: ``θ`` and the direction ``v`` are dyadic (multiples of
``2**-20``) and ``h`` is a power of two, so ``θ ± h·v`` are exact. The FD error is the
truncation ``h²/6 · sup|F'''|`` plus the evaluation errors of ``F(θ ± h v)`` divided by ``2h``,
plus the rounding of the difference itself (``u·|FD|``); the analytic side ``⟨∇F, v⟩`` carries
the backward's rounding error. Each test derives, per operation, the error bounds of its
forward (``f_err``) and backward (``vjp_err``) and the truncation (``third``); check_vjp adds
the roundings of its own products and sums and asserts that the tolerance is below ``1e-6``
of ``⟨|∇F|, |v|⟩`` (sharp: a wrong backward cannot hide in it).
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from helpers import (
    bits,
    dyadic,
    fsum_dot,
    gamma,
    modular_idx,
    onehot_counts,
    representable,
    shifted,
)
from hypothesis import example, given
from hypothesis import strategies as st

from numstab import exact as ex
from numstab.elementary import exact_round as el_exact_round
from numstab.functional import (
    LOSS_KINDS,
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
)
from numstab.precision import PrecisionPolicy, available_formats, get_format, quantize, round_to
from numstab.summation import ordered_sum
from numstab.testing import check_vjp

U = 2.0**-53
EXP = 4 * U  # NumPy float64 exp / log / log1p: <= 2 ulps (test_libm_accuracy_assumption)
ETA = 4 * 2.0**-1074  # absolute error of a result that underflows into the subnormal range
SLACK = 1.01
P64 = PrecisionPolicy.uniform("float64")
FORMATS = ["float16", "bfloat16", "float32", "float64"]
ORDERS = ["pairwise", "sequential", "wide", "sorted"]
HAS_LD = "longdouble" in available_formats()
UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


def ulp(x, fmt):
    """Spacing of ``fmt`` at |x| (the subnormal quantum below the normal range)."""
    f = get_format(fmt)
    a = np.abs(np.asarray(x, np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.ldexp(1.0, (np.maximum(e, f.emin) - f.precision + 1).astype(int))


def mp_abs_err(computed, exact):
    """``|computed - exact|`` per element, evaluated in mpmath (256 bits), as float64."""
    c = ex.to_exact(np.asarray(computed, np.float64))
    flat = [float(abs(a - b)) for a, b in zip(np.ravel(c), np.ravel(exact), strict=True)]
    return np.array(flat).reshape(np.shape(computed))


def exact_round(v, fmt):
    return np.asarray(ex.round_exact(v, fmt), dtype=np.float64)


def wide_values(rng, shape, fmt, spread=6.0):
    """Values of ``fmt`` spread over a few binades (so that additions really round)."""
    x = rng.standard_normal(shape) * np.exp2(rng.uniform(-spread, spread, shape))
    return quantize(x, fmt)


# --- the libm assumption behind EXP -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["float32", "float64"])
def test_libm_accuracy_assumption(fmt):
    """NumPy's exp / log / log1p are within 2 ulps of the correctly rounded value over the
    ranges the loss bounds use (the ``EXP = 4u`` of the error model; float32 is used by the
    gap-30 tests)."""
    rng = np.random.default_rng(0)
    ctx = ex.context()
    dt = np.dtype(fmt)
    top = 700 if fmt == "float64" else 80
    cases = {
        "exp": (np.exp, ctx.exp, -rng.uniform(0, top, 400)),
        "log": (np.log, ctx.log, np.exp(rng.uniform(-top, top, 400))),
        "log1p": (np.log1p, ctx.log1p, np.exp(rng.uniform(-60, 10, 400))),
    }
    for name, (f, mf, x) in cases.items():
        x = x.astype(dt)
        got = f(x)
        assert got.dtype == dt
        ref = np.asarray(
            ex.round_exact(np.array([mf(v) for v in ex.to_exact(x)], dtype=object), fmt)
        )
        assert np.all(np.sign(got) == np.sign(ref)), name
        ints = UINT[dt]
        diff = np.abs(got.view(ints).astype(np.int64) - ref.view(ints).astype(np.int64))
        assert diff.max() <= 2, (name, diff.max())  # same sign: distance in ulps


# --- gemm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_gemm_rounds_once_from_float32(fmt):
    rng = np.random.default_rng(1)
    a, b = wide_values(rng, (9, 40), fmt), wide_values(rng, (40, 6), fmt)
    pol = PrecisionPolicy.uniform(fmt)
    r = gemm(a, b, pol)
    assert r.dtype == np.float32 and r.shape == (9, 6)
    # The tensor-core model, recomputed here: float32 BLAS product, one rounding.
    ref = quantize(a.astype(np.float32) @ b.astype(np.float32), fmt)
    np.testing.assert_array_equal(bits(r), bits(ref))
    assert representable(r, fmt)
    # Against the exact product S = Σ a·b (products of 16-bit values are exact in float32 and
    # float64; math.fsum rounds S once, relative error u): float32 accumulation adds at most
    # γ_40(float32)·Σ|a||b|, the final rounding half an ulp of fmt at |r|.
    exact = np.array([[math.fsum(a[i] * b[:, j]) for j in range(6)] for i in range(9)])
    bound = (
        gamma(40, 2.0**-24) * (np.abs(a) @ np.abs(b))
        + ulp(np.maximum(np.abs(r), np.abs(exact)), fmt) / 2
        + U * np.abs(exact)
    )
    assert np.all(np.abs(r - exact) <= bound)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_gemm_accepts_narrow_dtypes_and_never_runs_a_16_bit_matmul(fmt):
    """Inputs given in float16 / bfloat16 dtype are widened exactly to the float32 carrier
    before the product: every matmul the function runs has float32 operands."""
    calls = []

    class Spy(np.ndarray):
        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            arrays = [i.view(np.ndarray) if isinstance(i, Spy) else i for i in inputs]
            calls.append((ufunc.__name__, [np.asarray(i).dtype for i in arrays]))
            return getattr(ufunc, method)(*arrays, **kwargs)

    rng = np.random.default_rng(2)
    dt = np.float16 if fmt == "float16" else ml_dtypes.bfloat16
    a = wide_values(rng, (5, 12), fmt).astype(dt)
    b = wide_values(rng, (12, 4), fmt).astype(dt)
    r = gemm(a.view(Spy), b.view(Spy), PrecisionPolicy.uniform(fmt))
    matmuls = [dts for name, dts in calls if name == "matmul"]
    assert matmuls, "the product was not observed"
    assert all(d == np.float32 for dts in matmuls for d in dts), matmuls
    ref = quantize(a.astype(np.float32) @ b.astype(np.float32), fmt)
    np.testing.assert_array_equal(bits(np.asarray(r, np.float32)), bits(ref))


@pytest.mark.parametrize("fmt", ["float32", "float64"])
def test_gemm_native_formats_are_blas(fmt):
    rng = np.random.default_rng(3)
    dt = get_format(fmt).dtype
    a, b = rng.standard_normal((6, 30)).astype(dt), rng.standard_normal((30, 5)).astype(dt)
    r = gemm(a, b, PrecisionPolicy.uniform(fmt))
    assert r.dtype == dt
    np.testing.assert_array_equal(bits(r), bits(a @ b))


def test_gemm_wider_compute_rounds_once_to_storage():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((6, 300)).astype(np.float32)
    b = rng.standard_normal((300, 5)).astype(np.float32)
    pol = PrecisionPolicy(storage="float32", compute="float64", loss="float32")
    r = gemm(a, b, pol)
    assert r.dtype == np.float32
    ref = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(bits(r), bits(ref))


# --- linear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_linear_backward_matches_finite_differences(bias, seed):
    """F(x, w, b) = ⟨x w + b, R⟩ along a random direction.

    F is quadratic along any line, so the central difference has no truncation error. A
    computed ``y_ij`` is within ``γ_{n_in+1}·(|x||w| + |b|)_ij`` of the exact value; the
    products with R and the fsum add ``u`` each. ``dx = R wᵀ``, ``dw = xᵀ R``, ``db = Σ R``
    are dot products of at most ``max(N, n_out)`` terms.
    """
    rng = np.random.default_rng(seed)
    N, n_in, n_out = 6, 7, 5
    theta = {"x": dyadic(rng, (N, n_in)), "w": dyadic(rng, (n_in, n_out))}
    if bias:
        theta["b"] = dyadic(rng, (n_out,))

    def f(p):
        y, _ = linear_forward(p["x"], p["w"], p.get("b"), P64)
        assert y.dtype == np.float64
        return y

    def vjp(p, R):
        _, cache = linear_forward(p["x"], p["w"], p.get("b"), P64)
        dx, dw, db = linear_backward(R, cache, P64)
        assert (db is None) == (not bias)
        assert dx.dtype == dw.dtype == np.float64
        return {"x": dx, "w": dw, **({"b": db} if bias else {})}

    def f_err(p):
        return gamma(n_in + 1) * (np.abs(p["x"]) @ np.abs(p["w"]) + np.abs(p.get("b", 0.0)))

    def vjp_err(R):
        g_abs = {
            "x": np.abs(R) @ np.abs(theta["w"]).T,
            "w": np.abs(theta["x"]).T @ np.abs(R),
            "b": np.abs(R).sum(axis=0),
        }
        return {k: gamma(max(N, n_out)) * g_abs[k] for k in theta}

    check_vjp(f, vjp, theta, rng=rng, h=2.0**-8, f_err=f_err, vjp_err=vjp_err)


def test_linear_backward_need_dx_false_and_bias_is_one_extra_rounding():
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)
    y, cache = linear_forward(x, w, b, P64)
    np.testing.assert_array_equal(y, (x @ w) + b)  # product rounded, then one more rounding
    dx, dw, db = linear_backward(np.ones((4, 2)), cache, P64, need_dx=False)
    assert dx is None and dw.shape == (3, 2) and db.shape == (2,)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_linear_16_bit_outputs_are_representable(fmt):
    rng = np.random.default_rng(6)
    pol = PrecisionPolicy.uniform(fmt)
    x, w, b = (wide_values(rng, s, fmt) for s in [(8, 13), (13, 5), (5,)])
    y, cache = linear_forward(x, w, b, pol)
    assert y.dtype == np.float32 and representable(y, fmt)
    ref = quantize(quantize(x @ w, fmt) + b, fmt)  # x, w exact in float32: x @ w is float32
    np.testing.assert_array_equal(bits(y), bits(ref))
    dy = wide_values(rng, (8, 5), fmt)
    for g in linear_backward(dy, cache, pol):
        assert g.dtype == np.float32 and representable(g, fmt)


# --- ReLU -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_relu_backward_matches_finite_differences(seed):
    """F(x) = ⟨relu(x), R⟩ is linear along the segment when no x_j changes sign on it, so the
    central difference is exact up to rounding. Points are drawn away from 0 and the
    activation pattern is *checked* at x ± h v (a draw that changes it is redrawn, and the
    test fails if no valid draw is found: it never passes silently)."""
    rng = np.random.default_rng(seed)
    h = 2.0**-10
    for _attempt in range(20):
        x = dyadic(rng, (7, 9))
        x = np.where(np.abs(x) < 2.0**-6, x + np.sign(x + 0.5) * 2.0**-5, x)  # away from 0
        v = dyadic(rng, x.shape)
        plus, minus = shifted(x, v, h)
        if np.all(np.sign(plus) == np.sign(x)) and np.all(np.sign(minus) == np.sign(x)):
            break
    else:
        pytest.fail("no draw kept the activation pattern on [x - h v, x + h v]")
    assert np.all(x != 0)
    # relu and its backward are exact: no evaluation error beyond check_vjp's own products.
    check_vjp(
        lambda p: relu_forward(p)[0],
        lambda p, R: relu_backward(R, relu_forward(p)[1]),
        x,
        direction=v,
        rng=rng,
        h=h,
        f_err=np.zeros_like,
        vjp_err=lambda R: np.zeros_like(R),
    )


# --- gather ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [5, 13])
def test_gather_forward_equals_onehot_gemm_bit_for_bit(fmt, bias, p):
    """Index inputs (a, p + b): the gather equals gemm(onehot, W) (+ b) bit for bit."""
    rng = np.random.default_rng(p)
    pol = PrecisionPolicy.uniform(fmt)
    idx = modular_idx(p)
    W = wide_values(rng, (2 * p, 9), fmt, spread=12.0)  # wide spread: the float32 add rounds
    b = wide_values(rng, (9,), fmt) if bias else None
    h, _ = gather_forward(idx, W, b, pol)
    onehot = quantize(onehot_counts(idx, 2 * p), fmt)
    ref = linear_forward(onehot, W, b, pol)[0] if bias else gemm(onehot, W, pol)
    assert h.dtype == get_format(fmt).carrier and representable(h, fmt)
    np.testing.assert_array_equal(bits(h), bits(ref))


@pytest.mark.parametrize("fmt", ["float32", "float64"])
def test_gather_forward_adds_three_indices_in_slot_order(fmt):
    """For k >= 3 the documented order is left to right (slot order), rounded once."""
    rng = np.random.default_rng(7)
    pol = PrecisionPolicy.uniform(fmt)
    idx = rng.integers(0, 50, (200, 3))
    W = wide_values(rng, (50, 30), fmt, spread=5.0)
    h, _ = gather_forward(idx, W, None, pol)
    ref = quantize((W[idx[:, 0]] + W[idx[:, 1]]) + W[idx[:, 2]], fmt)
    np.testing.assert_array_equal(bits(h), bits(ref))
    # Pinned: [1, 2**-24, 2**-24] left to right is 1 (each tiny term absorbed).
    W1 = np.array([[1.0], [2.0**-24], [2.0**-24]], np.float32)
    assert (
        gather_forward(np.array([[0, 1, 2]]), W1, None, PrecisionPolicy.uniform("float32"))[0][0, 0]
        == 1.0
    )


def test_gather_forward_signed_zero_matches_onehot_gemm():
    W = np.array([[-0.0, 1.0], [-0.0, 2.0], [3.0, 4.0]])
    idx = np.array([[0, 1]])
    h, _ = gather_forward(idx, W, None, P64)
    np.testing.assert_array_equal(bits(h), bits(gemm(onehot_counts(idx, 3), W, P64)))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_gather_backward_matches_finite_differences_and_dense_linear(bias, seed):
    """F(W, b) = ⟨gather(idx, W) + b, R⟩ is linear in (W, b): no truncation error. A computed
    h is within γ_3·(|W_a| + |W_b| + |b|) (two additions, the product with R) plus the
    fsum's u|F|. The segment sum of ``n_r <= N k`` terms is within γ_{Nk}·|onehot|ᵀ|R|."""
    rng = np.random.default_rng(10 + seed)
    n_rows, n_out, N = 9, 4, 12
    idx = rng.integers(0, n_rows, (N, 2))
    idx[0] = [3, 3]  # a repeated index within one sample counts twice
    theta = {"W": dyadic(rng, (n_rows, n_out))}
    if bias:
        theta["b"] = dyadic(rng, (n_out,))
    v = {k: dyadic(rng, a.shape) for k, a in theta.items()}
    R = dyadic(rng, (N, n_out))
    onehot = onehot_counts(idx, n_rows)
    plan = GatherPlan.build(idx, n_rows)
    g_abs = {"W": onehot.T @ np.abs(R), "b": np.abs(R).sum(axis=0)}

    def vjp(p, R):
        _, cache = gather_forward(idx, p["W"], p.get("b"), P64)
        dW, db = gather_backward(R, cache, plan, P64)
        assert (db is None) == (not bias)
        return {"W": dW, **({"b": db} if bias else {})}

    check_vjp(
        lambda p: gather_forward(idx, p["W"], p.get("b"), P64)[0],
        vjp,
        theta,
        direction=v,
        cotangent=R,
        h=2.0**-8,
        f_err=lambda p: gamma(2) * (onehot @ np.abs(p["W"]) + np.abs(p.get("b", 0.0))),
        vjp_err=lambda R: {k: gamma(2 * N) * g_abs[k] for k in theta},
    )
    grads = vjp(theta, R)
    dW, db = grads["W"], grads.get("b")
    # The dense one-hot linear layer has the same gradient (another summation order):
    # each side is within γ_{2N}·|onehot|ᵀ|R| of the exact sum.
    _, dense_cache = linear_forward(onehot, theta["W"], theta.get("b"), P64)
    _, dW_dense, db_dense = linear_backward(R, dense_cache, P64, need_dx=False)
    assert np.all(np.abs(dW - dW_dense) <= 2 * gamma(2 * N) * g_abs["W"])
    if bias:
        np.testing.assert_array_equal(db, db_dense)  # the same pairwise sum of dh


@pytest.mark.parametrize("fmt", FORMATS)
def test_gather_backward_within_bound_of_onehot_transpose_product(fmt):
    """Segment sum vs ``quantize(onehotᵀ @ dh)``: both sum the ``n_r`` rows of a segment in the
    compute format, in different orders, so each is within ``γ_{n_r}(compute)·Σ|dh|`` of the
    exact sum; the final rounding to storage adds up to one storage ulp between them (half an
    ulp each), nothing for native formats. Against the exact sum (math.fsum, relative u): one
    γ and half a storage ulp."""
    rng = np.random.default_rng(20)
    pol = PrecisionPolicy.uniform(fmt)
    p = 11
    idx = modular_idx(p)
    idx = idx[(idx[:, 0] != 3) & (idx[:, 1] != p + 5)]  # weight rows 3 and p + 5 untouched
    idx = idx[rng.permutation(len(idx))[:90]]
    n_rows = 2 * p
    dh = wide_values(rng, (idx.shape[0], 7), fmt)
    _, cache = gather_forward(idx, wide_values(rng, (n_rows, 7), fmt), None, pol)
    dW, db = gather_backward(dh, cache, GatherPlan.build(idx, n_rows), pol)
    assert db is None and dW.dtype == get_format(fmt).carrier and representable(dW, fmt)
    onehot = onehot_counts(idx, n_rows)
    c = pol.compute.carrier
    ref = quantize(onehot.T.astype(c) @ dh.astype(c), fmt)
    n_r = onehot.sum(axis=0)[:, None]
    u_c = pol.compute.unit_roundoff
    A = onehot.T @ np.abs(dh.astype(np.float64))
    storage_ulp = ulp(np.maximum(np.abs(dW), np.abs(ref)), fmt) if pol.storage.is_emulated else 0
    assert np.all(np.abs(dW - ref) <= 2 * gamma(n_r, u_c) * A + storage_ulp)
    exact = np.array(
        [
            [math.fsum(dh[onehot[:, r] > 0, j].astype(np.float64)) for j in range(7)]
            for r in range(n_rows)
        ]
    )
    half = ulp(np.maximum(np.abs(dW), np.abs(exact)), fmt) / 2 if pol.storage.is_emulated else 0
    assert np.all(np.abs(dW - exact) <= gamma(n_r, u_c) * A + half + U * np.abs(exact))
    untouched = n_r[:, 0] == 0
    assert untouched.any() and np.all(bits(dW[untouched]) == 0)  # exact +0 rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_gather_backward_exact_for_small_integers(fmt):
    """Integer dh in [-3, 3] with p = 7 (segments of 7 samples, |sums| <= 147 <= 2**8): every
    partial sum is an integer exactly representable in all four formats, so the segment sum,
    onehotᵀ @ dh and the exact integer sums agree exactly."""
    rng = np.random.default_rng(21)
    pol = PrecisionPolicy.uniform(fmt)
    p = 7
    idx = modular_idx(p)
    dh = quantize(rng.integers(-3, 4, (p * p, 5)).astype(np.float64), fmt)
    b = quantize(np.ones(5), fmt)
    _, cache = gather_forward(idx, quantize(np.ones((2 * p, 5)), fmt), b, pol)
    dW, db = gather_backward(dh, cache, GatherPlan.build(idx, 2 * p), pol)
    onehot = onehot_counts(idx, 2 * p)
    exact_w = onehot.astype(np.int64).T @ dh.astype(np.int64)
    np.testing.assert_array_equal(dW, exact_w)
    np.testing.assert_array_equal(dW, quantize(onehot.T.astype(dh.dtype) @ dh, fmt))
    np.testing.assert_array_equal(db, dh.astype(np.int64).sum(axis=0))


def test_gather_plan_validation():
    with pytest.raises(ValueError, match="float64"):
        GatherPlan.build(np.zeros((3, 2)), 4)
    with pytest.raises(ValueError, match=r"\(6,\)"):
        GatherPlan.build(np.zeros(6, dtype=np.int64), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\).*\[0, 4\]"):
        GatherPlan.build(np.array([[0, 4]]), 4)
    with pytest.raises(ValueError, match=r"-1"):
        GatherPlan.build(np.array([[-1, 2]]), 4)
    # A plan is tied to its index set: a gradient of another batch size is refused.
    idx = np.array([[2, 0], [2, 1]])
    _, cache = gather_forward(idx, np.ones((4, 3)), None, P64)
    with pytest.raises(ValueError):
        gather_backward(np.ones((3, 3)), cache, GatherPlan.build(idx, 4), P64)
    dW, _ = gather_backward(np.ones((2, 3)), cache, GatherPlan.build(idx, 4), P64)
    np.testing.assert_array_equal(dW, [[1] * 3, [1] * 3, [2] * 3, [0] * 3])


# --- losses: error bounds of the float64 implementations --------------------------------------


def softmax_bounds(z, y, dl, U=U, EXP=EXP):
    """First-order bounds on |computed - exact| of the float64 ``softmax`` loss and gradient.

    With ``gap_k = m - z_k`` (m = max z), ``C`` classes:
    ``d_k = fl(z_k - m)``: abs ``u·gap_k``; ``e_k = fl(exp d_k)``: rel ``EXP + u·gap_k``;
    ``T = Σ e``: rel ``ρ = EXP + u·max gap + (C-1)u``; ``lse = fl(log T)``: abs
    ``ρ + EXP·log C``; ``lsm_k = fl(d_k - lse)``: abs
    ``Δ_k = u·gap_k + ρ + EXP·log C + u·|lsm_k|`` with ``|lsm_k| <= gap_k + log C``.
    loss = -lsm_y. ``p_k = fl(exp lsm_k)``: rel ``Δ_k + EXP``; ``g_k = fl(p_k·dl)``: +u;
    target ``RN(dl·(p_y - 1))``: ``dl·p_y·rel(p_y)`` + u|g_y|. ETA covers results that
    underflow.
    """
    N, C = z.shape
    rows = np.arange(N)
    m = z.max(axis=1, keepdims=True)
    gap = m - z
    e = np.exp(-gap)
    p = e / e.sum(axis=1, keepdims=True)
    rho = EXP + U * gap.max(axis=1, keepdims=True) + (C - 1) * U
    delta = 2 * U * gap + rho + (EXP + U) * math.log(C)
    loss_err = delta[rows, y] + ETA
    g_mag = p.copy()
    g_mag[rows, y] = 1 - p[rows, y]
    dl = np.abs(np.broadcast_to(dl, (N,)))[:, None]
    grad_err = dl * (p * (delta + EXP + U) + U * g_mag) + ETA
    return loss_err, grad_err


def stablemax_bounds(z, y, dl, eps, U=U, EXP=EXP):
    """First-order bounds for the float64 ``stablemax`` loss and gradient.

    ``s_k``: ``fl(z+1)`` (rel u) or ``fl(1/fl(1 - z (+ eps)))`` (rel 2u; eps shifts the exact
    value by a relative ``eps`` at most); ``S = Σ s``: rel ``ρ_S = ρ_s + (C-1)u``;
    ``p = fl(s/S)``: rel ``ρ_p = ρ_s + ρ_S + u``; loss ``-fl(log p_y)``: abs
    ``ρ_p + EXP·loss``. Gradient ``g_k = dl·(p_k - δ_ky)·c_k``, ``c = s`` (z < 0) or ``1/s``:
    ``t_k = RN(dl·(p_k - δ))`` (abs ``dl·p_k·ρ_p + u·|t_k|``), then ``RN(t·s)`` or
    ``RN(t/s)`` (``s`` rel ``ρ_s``, one rounding ``u``).
    """
    N, C = z.shape
    rows = np.arange(N)
    s = np.where(z >= 0, z + 1, 1 / (1 - np.minimum(z, 0)))
    S = s.sum(axis=1, keepdims=True)
    rho_s = 2 * U + eps
    rho_S = rho_s + (C - 1) * U
    rho_p = rho_s + rho_S + U
    loss_mag = -np.log(s[rows, y] / S[:, 0])
    loss_err = rho_p + EXP * loss_mag + ETA
    p = s / S
    pm = p.copy()
    pm[rows, y] -= 1  # p_k - δ_ky
    c = np.where(z >= 0, 1 / s, s)
    dl = np.abs(np.broadcast_to(dl, (N,)))[:, None]
    grad_err = dl * c * (p * rho_p + np.abs(pm) * (rho_s + 2 * U)) + ETA
    return loss_err, grad_err


def softmax_stable_bounds(z, y, dl, U=U, EXP=EXP):
    """First-order bounds for the float64 ``softmax_stable`` loss and gradient.

    Tail ``t = Σ_{k≠top} e_k``: rel ``ρ = EXP + u·max gap + (C-2)u``; ``log1p``: abs
    ``ρ·t/(1+t) + EXP·log1p t``; loss = fl(gap_y + that) (+ u·gap_y + u·loss: both terms are
    >= 0, no cancellation). ``denom = fl(1 + t)``: rel ``δ = u + ρ·t/(1+t)``;
    ``p_k = fl(e_k/denom)``: rel ``EXP + u·gap_k + δ + u``; ``p_top = fl(1/denom)``: rel
    ``δ + u``. Target at top: ``fl(-t/denom)``: rel ``ρ + δ + u``, then times dl (+u);
    otherwise ``RN(dl·(p_y - 1))``: abs ``dl·(p_y·rel(p_y) + u(1-p_y))``. Off-target entries
    are multiplied by dl (+u).
    """
    N, C = z.shape
    rows = np.arange(N)
    top = np.argmax(z, axis=1)
    gap = z[rows, top][:, None] - z
    e = np.exp(-gap)
    e[rows, top] = 0
    t = e.sum(axis=1)
    f = t / (1 + t)
    rho = EXP + U * gap.max(axis=1) + max(C - 2, 0) * U
    loss_mag = gap[rows, y] + np.log1p(t)
    loss_err = U * gap[rows, y] + rho * f + EXP * np.log1p(t) + U * loss_mag + ETA
    delta = (U + rho * f)[:, None]
    p = e / (1 + t)[:, None]
    p[rows, top] = 1 / (1 + t)
    prel = EXP + U * gap + delta + U
    prel[rows, top] = delta[:, 0] + U
    err = p * (prel + U)
    at_top = top == y
    err_y = np.where(
        at_top,
        f * (rho + delta[:, 0] + 2 * U),
        p[rows, y] * (prel[rows, y] + U) + 2 * U * (1 - p[rows, y]),
    )
    err[rows, y] = err_y
    dl = np.abs(np.broadcast_to(dl, (N,)))[:, None]
    return loss_err, dl * err + ETA


LOSS_CASES = [("softmax", 0.0), ("stablemax", 0.0), ("stablemax", 1e-30), ("softmax_stable", 0.0)]


def bounds_for(kind, eps, z, y, dl, U=U, EXP=EXP):
    if kind == "softmax":
        return softmax_bounds(z, y, dl, U=U, EXP=EXP)
    if kind == "stablemax":
        return stablemax_bounds(z, y, dl, eps, U=U, EXP=EXP)
    return softmax_stable_bounds(z, y, dl, U=U, EXP=EXP)


def exact_loss_and_grad(kind, eps, z, y):
    if kind == "stablemax":
        return ex.stablemax_cross_entropy(z, y, eps=eps), ex.stablemax_cross_entropy_grad(
            z, y, eps=eps
        )
    return ex.cross_entropy(z, y), ex.cross_entropy_grad(z, y)


# --- losses: gradients by finite differences -----------------------------------------------


@pytest.mark.parametrize(("kind", "eps"), LOSS_CASES)
@pytest.mark.parametrize("seed", range(3))
def test_loss_backward_matches_finite_differences(kind, eps, seed):
    """F(z) = Σ_i r_i·loss_i(z) along a random direction v, per-sample upstream weights r.

    Truncation ``h²/6·sup|F'''|``: for softmax cross-entropy the third derivative along v is
    the third cumulant of v under p, at most ``range(v_i)³/4`` (|X-μ|³ <= range·Var and
    Var <= range²/4). For StableMax, away from 0, ``|s^(j)| <= j!·s`` and
    ``|(log(1+x))'''|, |(log(1-x))'''| <= 2``, which give ``|loss'''| <= 16·max|v_i|³``; the
    logits are drawn away from 0 (s is only C¹ there) and that is asserted.
    """
    rng = np.random.default_rng(100 + seed)
    N, C = 5, [3, 8, 13][seed]
    z = dyadic(rng, (N, C), scale=3.0)
    if kind == "stablemax":
        z = np.where(np.abs(z) < 0.25, z + np.sign(z + 0.5) * 0.5, z)
    y = rng.integers(0, C, N)
    y[0] = np.argmax(z[0])
    r = dyadic(rng, (N,))
    v = dyadic(rng, (N, C))
    h = 2.0**-16
    plus, minus = shifted(z, v, h)
    if kind == "stablemax":
        assert np.all(np.sign(plus) == np.sign(z)) and np.all(np.sign(minus) == np.sign(z))

    def f(zz):
        loss, _ = loss_forward(zz, y, kind=kind, fmt="float64", eps=eps)
        assert loss.dtype == np.float64
        return loss

    def vjp(zz, r):
        _, cache = loss_forward(zz, y, kind=kind, fmt="float64", eps=eps)
        g = loss_backward(cache, r)
        assert g.dtype == np.float64
        return g

    def third(v, r):
        if kind == "stablemax":
            return fsum_dot(np.abs(r), 16 * np.abs(v).max(axis=1) ** 3)
        return fsum_dot(np.abs(r), np.ptp(v, axis=1) ** 3 / 4)

    check_vjp(
        f,
        vjp,
        z,
        direction=v,
        cotangent=r,
        h=h,
        f_err=lambda zz: bounds_for(kind, eps, zz, y, r)[0],
        vjp_err=lambda r: bounds_for(kind, eps, z, y, r)[1],
        third=third,
    )


# --- losses: against the exact reference ---------------------------------------------------


@st.composite
def logit_batches(draw, lo=-30.0, hi=30.0, max_classes=12):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(2, max_classes))
    vals = st.floats(lo, hi, allow_subnormal=True)
    z = np.array(draw(st.lists(st.lists(vals, min_size=c, max_size=c), min_size=n, max_size=n)))
    y = np.array(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
    return z, y


NASTY = [
    (np.zeros((1, 5)), np.array([2])),  # all tied
    (np.array([[0.0, -40.0, -40.0]]), np.array([0])),  # collapses in float64
    (np.array([[0.0, -0.0, 5e-324, -5e-324]]), np.array([1])),  # signed zeros, subnormals
    (np.array([[30.0, -30.0] * 6]), np.array([1])),  # target far below the max
    (np.array([[1e-300, 3.0, 3.0, -2.5]]), np.array([2])),  # tie at the max, second one
]


def _with_nasty(test):
    for z, y in NASTY:
        test = example(zy=(z, y))(test)
    return test


@pytest.mark.parametrize("elementary", ["correct", "libm"])
@pytest.mark.parametrize(("kind", "eps"), LOSS_CASES)
@given(zy=logit_batches())
@_with_nasty
def test_float64_loss_and_gradient_match_exact(kind, eps, elementary, zy):
    """Loss and logit gradient within the derived first-order bounds of the mpmath values;
    correctly rounded elementary functions enter the bounds with ``u``, NumPy's with 4u."""
    z, y = zy
    z_before, y_before = z.copy(), y.copy()
    loss, cache = loss_forward(z, y, kind=kind, fmt="float64", eps=eps, elementary=elementary)
    g = loss_backward(cache, 1.0)
    ex_loss, ex_grad = exact_loss_and_grad(kind, eps, z, y)
    loss_err, grad_err = bounds_for(kind, eps, z, y, 1.0, EXP=U if elementary == "correct" else EXP)
    assert np.all(mp_abs_err(loss, ex_loss) <= SLACK * (loss_err + U * np.abs(loss)))
    assert np.all(mp_abs_err(g, ex_grad) <= SLACK * grad_err)
    np.testing.assert_array_equal(z, z_before)  # inputs untouched
    np.testing.assert_array_equal(y, y_before)


def test_float64_softmax_is_within_a_few_ulps_on_benign_inputs():
    """Standard-normal logits, C = 10: the derived bound of ``softmax_bounds`` amounts to at
    most 32 ulps of the loss and 48 ulps of each gradient entry (the terms: u·gap, the
    (C-1)u of the sum, 2 ulps each for exp and log, and log C), and the errors against the
    correctly rounded exact values stay within it, counted in ulps of the exact value.
    (Measured over 30 seeds: at most 2 ulps for the loss, 8 for the gradient.)"""
    rng = np.random.default_rng(7)
    z = rng.standard_normal((200, 10))
    y = rng.integers(0, 10, 200)
    loss, cache = loss_forward(z, y, kind="softmax", fmt="float64")
    g = loss_backward(cache, 1.0)
    ref_l = exact_round(ex.cross_entropy(z, y), "float64")
    ref_g = exact_round(ex.cross_entropy_grad(z, y), "float64")
    loss_err, grad_err = softmax_bounds(z, y, 1.0)
    ulp_l, ulp_g = ulp(ref_l, "float64"), ulp(ref_g, "float64")
    assert np.max(SLACK * loss_err / ulp_l) <= 32 and np.max(SLACK * grad_err / ulp_g) <= 48
    # The exact value is rounded once more here: half an ulp.
    assert np.all(np.abs(loss - ref_l) <= SLACK * loss_err + ulp_l / 2)
    assert np.all(np.abs(g - ref_g) <= SLACK * grad_err + ulp_g / 2)


# --- Softmax Collapse ----------------------------------------------------------------------


def gap_row(gap, C=113, dtype=np.float32):
    z = np.full((1, C), -gap, dtype=dtype)
    z[0, 0] = 0
    return z


@pytest.mark.parametrize("order", ORDERS)
def test_softmax_collapse_in_float32_at_gap_30(order):
    """exp(-30) ≈ 9.4e-14 and 112 of them (1.05e-11) are far below 2**-24: absorbed in every
    order. Loss exactly +0.0, target gradient exactly 0, off-target fl(exp(-30)) > 0."""
    z = gap_row(30.0)
    loss, cache = loss_forward(z, [0], kind="softmax", fmt="float32", order=order)
    g = loss_backward(cache, 1.0)
    assert loss.dtype == np.float32 and loss[0] == 0 and not np.signbit(loss[0])
    assert g[0, 0] == 0
    assert cache.normaliser[0] == 1
    assert collapse_mask(z, "float32", order=order)[0]
    # Off target: exp(-30)/1, correctly rounded to float32 within 1 ulp (float32 exp).
    off = exact_round(ex.cross_entropy_grad(z, [0]), "float32")[0, 1:]
    assert np.all(g[0, 1:] > 0)
    assert np.all(np.abs(g[0, 1:] - off) <= ulp(off, "float32"))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("C", [2, 113])
def test_softmax_stable_does_not_collapse_at_gap_30(order, C):
    """The absorption-free loss keeps the tail t = (C-1)·exp(-30).

    Loss and target gradient equal the exact values correctly rounded to float32 within
    1 ulp where the tail is summed accurately (one term, or the pairwise / wide trees over
    equal terms). A sequential sum of 112 equal terms drifts by several float32 ulps: there
    the check is the derived bound (float32 u = 2**-24, float32 exp within 2 ulps, see
    ``test_libm_accuracy_assumption``), which is still ~1e-5 relative, i.e. no collapse.
    """
    z = gap_row(30.0, C)
    loss, cache = loss_forward(z, [0], kind="softmax_stable", fmt="float32", order=order)
    g = loss_backward(cache, 1.0)
    ex_loss = ex.cross_entropy(z, [0])
    ex_g = ex.cross_entropy_grad(z, [0])
    assert loss[0] > 0 and g[0, 0] < 0 and cache.normaliser[0] > 0
    if C == 2 or order in ("pairwise", "wide"):
        rl, rg = exact_round(ex_loss, "float32")[0], exact_round(ex_g, "float32")[0, 0]
        assert abs(loss[0] - rl) <= ulp(rl, "float32")
        assert abs(g[0, 0] - rg) <= ulp(rg, "float32")
    u32 = 2.0**-24
    z64 = z.astype(np.float64)
    loss_err, grad_err = softmax_stable_bounds(z64, np.array([0]), 1.0, U=u32, EXP=4 * u32)
    assert mp_abs_err(loss, ex_loss)[0] <= SLACK * loss_err[0]
    assert mp_abs_err(g, ex_g)[0, 0] <= SLACK * grad_err[0, 0]
    assert loss_err[0] < 1e-4 * loss[0]  # the bound is tight enough to mean "no collapse"
    # The softmax sum of the same row is still 1: collapse_mask measures softmax's sum.
    assert collapse_mask(z, "float32", kind="softmax_stable", order=order)[0]


def independent_terms(z, fmt, kind):
    """The normaliser's terms recomputed here (not via collapse_mask): max-shifted exps, or
    StableMax s(z)/s(max z), each operation rounded to ``fmt``; exp correctly rounded by
    mpmath (np.exp is not, in float32)."""
    zq = quantize(z, fmt)
    if kind == "softmax":
        d = quantize(zq - zq.max(axis=1, keepdims=True), fmt)
        return el_exact_round("exp", round_to(d, fmt), fmt).astype(zq.dtype)
    one = zq.dtype.type(1)
    s = np.where(zq >= 0, quantize(zq + one, fmt), quantize(one / quantize(one - zq, fmt), fmt))
    return quantize(s / s.max(axis=1, keepdims=True), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@given(
    order=st.sampled_from(ORDERS),
    C=st.integers(2, 130),
    gap=st.floats(2.0, 48.0),
    seed=st.integers(0, 2**16),
)
@example(order="sequential", C=113, gap=16.7, seed=0)  # design-note thresholds (float32)
@example(order="sequential", C=113, gap=16.6, seed=0)
@example(order="pairwise", C=113, gap=20.7, seed=0)
@example(order="sorted", C=113, gap=21.4, seed=0)
@example(order="pairwise", C=113, gap=12.4, seed=0)  # float16
@example(order="sorted", C=113, gap=41.5, seed=0)  # float64
@example(order="wide", C=113, gap=36.8, seed=0)
@example(order="sequential", C=2, gap=40.0, seed=1)
def test_collapse_verdict_matches_independent_sum(fmt, order, C, gap, seed):
    """Each order gives one verdict, ``ordered_sum(terms) == 1`` recomputed here, and
    loss_forward / loss_backward / collapse_mask all agree with it: a collapsed row (target
    at the max) has loss exactly 0 and target gradient exactly 0, any other has both
    non-zero."""
    if order == "wide" and fmt == "float64" and not HAS_LD:
        pytest.skip("order 'wide' for float64 needs x87 longdouble")
    rng = np.random.default_rng(seed)
    rows = 6
    z = -gap * (1 + 0.05 * rng.random((rows, C))) - np.arange(rows)[:, None] * 0.4
    z[:, 0] = 0.0
    y = np.zeros(rows, dtype=np.int64)
    verdict = ordered_sum(independent_terms(z, fmt, "softmax"), fmt, order) == 1
    np.testing.assert_array_equal(collapse_mask(z, fmt, order=order), verdict)
    loss, cache = loss_forward(z, y, kind="softmax", fmt=fmt, order=order)
    g = loss_backward(cache, 1.0)
    np.testing.assert_array_equal(cache.normaliser == 1, verdict)
    np.testing.assert_array_equal(loss == 0, verdict)
    np.testing.assert_array_equal(g[:, 0] == 0, verdict)
    assert not np.any(np.signbit(loss))
    # StableMax's own collapse: Σ s(z)/s(max z) == 1.
    zs = z * 1e3 if fmt != "float16" else z * 30  # StableMax needs much larger gaps
    v_s = ordered_sum(independent_terms(zs, fmt, "stablemax"), fmt, order) == 1
    np.testing.assert_array_equal(collapse_mask(zs, fmt, kind="stablemax", order=order), v_s)


# --- reductions, scaling, special values ---------------------------------------------------


def test_reduce_loss_mean_and_none():
    rng = np.random.default_rng(8)
    loss = quantize(rng.exponential(size=1000), "float32")
    m = reduce_loss(loss)
    exact = math.fsum(loss.astype(np.float64).tolist()) / loss.size
    # float64 pairwise mean of non-negative terms: γ_1000·mean, plus the division.
    assert abs(m - exact) <= gamma(1001) * exact
    assert reduce_loss(loss, "none") is loss
    with pytest.raises(ValueError, match="'sum'.*mean.*none"):
        reduce_loss(loss, "sum")


@pytest.mark.parametrize(("kind", "eps"), LOSS_CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_mean_upstream_gradient_is_exact_scaling_for_power_of_two_batch(kind, eps, fmt):
    """dloss = 1/N with N a power of two: every rounding commutes with the exact scaling
    (no subnormals here), so the gradient is loss_backward(cache, 1) / N bit for bit."""
    rng = np.random.default_rng(9)
    N = 8
    z = rng.standard_normal((N, 6))
    y = rng.integers(0, 6, N)
    _, cache = loss_forward(z, y, kind=kind, fmt=fmt, eps=eps)
    g_mean = loss_backward(cache, 1.0 / N)
    g_sum = loss_backward(cache, 1.0)
    # Premise: every scaled intermediate (probabilities, gradients) stays a normal number.
    tiny = float(get_format(fmt).tiny)
    assert np.all(np.abs(cache.probs) / N >= tiny) and np.all(np.abs(g_sum[g_sum != 0]) / N >= tiny)
    np.testing.assert_array_equal(bits(g_mean), bits(g_sum / g_sum.dtype.type(N)))
    # A per-sample upstream array equals the scalar.
    np.testing.assert_array_equal(bits(loss_backward(cache, np.full(N, 1.0 / N))), bits(g_mean))


def test_loss_rejects_unknown_kind_and_order():
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match="'sparsemax'.*" + ".*".join(LOSS_KINDS)):
        loss_forward(z, [0, 1], kind="sparsemax")
    with pytest.raises(ValueError, match="'backwards'"):
        loss_forward(z, [0, 1], order="backwards")
    with pytest.raises(ValueError, match="'sparsemax'"):
        collapse_mask(z, "float32", kind="sparsemax")


SPECIAL_ROWS = np.array(
    [
        [np.nan, 0.0, 1.0],  # NaN anywhere: NaN loss and NaN gradient row
        [1.0, np.nan, 0.0],
        [-np.inf, 0.0, 1.0],  # target at -inf: +inf loss
        [np.inf, 0.0, 1.0],  # +inf: the loss is not finite
        [0.0, np.inf, 1.0],
        [np.inf, np.inf, 0.0],
        [0.5, -np.inf, 1.0],  # -inf off target: a finite loss, as without that class
        [2.0, 0.25, -1.0],  # finite rows must not be affected by the others
        [0.0, -3.0, 4.0],
    ]
)
SPECIAL_Y = np.zeros(len(SPECIAL_ROWS), dtype=np.int64)


@pytest.mark.parametrize(("kind", "eps"), LOSS_CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_special_values_give_nan_or_inf_without_exceptions(kind, eps, fmt):
    z = SPECIAL_ROWS.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning may escape either
        loss, cache = loss_forward(z, SPECIAL_Y, kind=kind, fmt=fmt, eps=eps)
        g = loss_backward(cache, 1.0)
    np.testing.assert_array_equal(z, SPECIAL_ROWS, err_msg="logits were mutated")
    assert np.all(np.isnan(loss[:2])) and np.all(np.isnan(g[:2]))
    assert loss[2] == np.inf
    assert not np.any(np.isfinite(loss[3:6]))
    assert np.all(np.isfinite(loss[6:])) and np.all(np.isfinite(g[6:]))
    # The -inf class contributes nothing: same loss as the row without it.
    l2, _ = loss_forward(z[6:7, [0, 2]], [0], kind=kind, fmt=fmt, eps=eps)
    assert loss[6] == l2[0]
    # Finite rows are computed row by row: bit-identical to a batch without the others.
    lf, cf = loss_forward(z[7:], SPECIAL_Y[7:], kind=kind, fmt=fmt, eps=eps)
    np.testing.assert_array_equal(bits(loss[7:]), bits(lf))
    np.testing.assert_array_equal(bits(g[7:]), bits(loss_backward(cf, 1.0)))


@pytest.mark.parametrize(("kind", "eps"), LOSS_CASES)
def test_backward_does_not_mutate_its_cache(kind, eps):
    rng = np.random.default_rng(11)
    z = rng.standard_normal((4, 5))
    _, cache = loss_forward(z, [0, 1, 2, 3], kind=kind, fmt="float32", eps=eps)
    probs, norm = cache.probs.copy(), cache.normaliser.copy()
    dl = np.full(4, 0.25)
    g1 = loss_backward(cache, dl)
    g2 = loss_backward(cache, dl)
    np.testing.assert_array_equal(bits(g1), bits(g2))
    np.testing.assert_array_equal(bits(cache.probs), bits(probs))
    np.testing.assert_array_equal(bits(cache.normaliser), bits(norm))
    np.testing.assert_array_equal(dl, 0.25)


@pytest.mark.parametrize(("kind", "eps"), LOSS_CASES)
@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
@given(
    zy=logit_batches(lo=-200.0, hi=200.0, max_classes=20),
    scale=st.sampled_from([1, 1e-3]),
    order=st.sampled_from(ORDERS),
)
@example(zy=(np.array([[0.0, -30.0, -30.0, -30.0]]), np.array([0])), scale=1, order="sequential")
@example(zy=(np.array([[6e4, -6e4, 1e-7, -1e-8]]), np.array([1])), scale=1, order="pairwise")
@example(
    zy=(np.array([[np.inf, 0.0, 1.0], [np.nan, 1.0, 2.0]]), np.array([1, 0])),
    scale=1,
    order="sorted",
)
def test_16_bit_outputs_are_representable(kind, eps, fmt, zy, scale, order):
    """Every output of the 16-bit losses is a value of the format, carried in float32."""
    z, y = zy
    z = z * scale
    loss, cache = loss_forward(z, y, kind=kind, fmt=fmt, order=order, eps=eps)
    g = loss_backward(cache, 1.0 / len(y))
    for out in (loss, cache.normaliser, cache.probs, g):
        assert out.dtype == np.float32
        assert representable(out, fmt)


# --- the target entry of the gradient: one rounding of the exact value ----------------------

TARGET_FORMATS = FORMATS + (["longdouble"] if HAS_LD else [])

# Pairs (p_y, dl) where the former two-rounding formula RN(RN(p_y·dl) - dl) differs from the
# single rounding RN(dl·(p_y - 1)) (found by a random search, checked with fractions).
DOUBLE_ROUNDING_TRAPS = {
    "float32": [("0x1.9a40a6p-1", "0x1.950892p-1"), ("0x1.2305a2p-2", "0x1.a60730p-1")],
    "float16": [("0x1.c88p-1", "0x1.95cp-1"), ("0x1.71cp-1", "0x1.38p-1")],
    "float64": [("0x1.5d97d186026aep-1", "0x1.d1f07bff39a12p-1")],
}


def as_fraction(v) -> Fraction:
    """The exact binary rational of a float of any of the five formats."""
    t = ex.to_exact(np.asarray(v))
    man, e = int(t.man), int(t.exp)
    return Fraction(man) * Fraction(2) ** e


def target_cases(fmt, rng):
    """(p_y, dloss) in ``fmt``: random, near 1 and 0, ties, tiny products, and the traps."""
    f = get_format(fmt)
    n = 300
    p = np.concatenate(
        [
            rng.uniform(0, 1, n),
            1 - 2.0 ** -rng.integers(1, f.precision + 2, 60),
            2.0 ** -rng.integers(1, 60, 40),
            [0.0, 1.0, 0.5, 0.25, 0.75],
        ]
    )
    dl = np.concatenate(
        [
            rng.uniform(0.5, 1, p.size - 45) * 2.0 ** rng.integers(-30, 4, p.size - 45),
            2.0 ** -rng.integers(f.precision, 2 * f.precision, 45) * rng.uniform(1, 2, 45),
        ]
    )
    traps = DOUBLE_ROUNDING_TRAPS.get(fmt, [])
    p = np.concatenate([p, [float.fromhex(a) for a, _ in traps]])
    dl = np.concatenate([dl, [float.fromhex(b) for _, b in traps]])
    dt = np.longdouble if fmt == "longdouble" else np.float64
    return quantize(np.asarray(p, dt), fmt), quantize(np.asarray(dl, dt), fmt)


def _cache(kind, fmt, p):
    """A LossCache whose target column (0) holds ``p`` (label 0 for every row)."""
    f = get_format(fmt)
    n = p.shape[0]
    probs = np.stack([p, np.zeros_like(p)], axis=1).astype(f.carrier)
    labels = np.zeros(n, dtype=np.int64)
    extra = (np.ones(n, dtype=np.int64), np.ones(n, dtype=f.carrier)) if kind != "softmax" else ()
    return LossCache(
        kind=kind, fmt=f, order="pairwise", labels=labels, normaliser=np.ones(n), probs=probs,
        state=extra,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["softmax", "softmax_stable"])
@pytest.mark.parametrize("fmt", TARGET_FORMATS)
def test_target_gradient_is_one_rounding_of_the_exact_value(fmt, kind):
    """``g_y = RN(dl·(p_y - 1))`` exactly (fractions), for random and nasty ``(p_y, dl)``: ties,
    ``p_y`` near 1 and 0, products in the subnormal range, and pairs where rounding ``p_y·dl``
    first gives another value (softmax_stable: a target that is not the argmax)."""
    rng = np.random.default_rng(11)
    p, dl = target_cases(fmt, rng)
    if fmt == "longdouble":
        dl = dl.astype(np.float64).astype(np.longdouble)  # dloss arrives as float64
    g = loss_backward(_cache(kind, fmt, p), dl.astype(np.float64))[:, 0]
    want = ex.round_exact(
        np.array(
            [as_fraction(d) * (as_fraction(q) - 1) for q, d in zip(p, dl, strict=True)],
            dtype=object,
        ),
        fmt,
    )
    got = np.asarray(g).astype(get_format(fmt).dtype)
    bad = ~((got == want) & (np.signbit(got) == np.signbit(want)))
    assert not bad.any(), (fmt, p[bad][:4], dl[bad][:4], got[bad][:4], want[bad][:4])


def test_near_collapse_softmax_gradient_regression():
    """Logits [0, -16] in float32 (a row about to collapse: S = 1 + 2**-23). The declared
    arithmetic, each operation correctly rounded (evaluated here step by step with mpmath),
    gives g_0 = -2**-23; the libm exp gave p_0 = 1 - 2**-24 and half that gradient. The exact
    gradient is -1.1254e-07: |g_0 - exact| stays within one float32 ulp of p_0 (2**-24)."""
    z = np.array([[0.0, -16.0]], dtype=np.float32)
    _, cache = loss_forward(z, np.array([0]), kind="softmax", fmt="float32")
    g = loss_backward(cache, 1.0)
    ctx = ex.context(200)

    def rn(v):
        return ctx.mpf(float(ex.round_exact(v, "float32")))

    e1 = rn(ctx.exp(-16))
    total = rn(1 + e1)
    lse = rn(ctx.log(total))
    p0 = rn(ctx.exp(-lse))
    want = float(ex.round_exact(p0 - 1, "float32"))
    assert want == -(2.0**-23)
    assert g[0, 0] == np.float32(want)
    exact = float(ex.cross_entropy_grad(z, np.array([0]))[0, 0])
    assert abs(float(g[0, 0]) - exact) <= 2.0**-24


@pytest.mark.parametrize(("fmt", "big"), [("float32", -1e23), ("float64", -1e160)])
def test_stablemax_backward_keeps_tiny_gradients_regression(fmt, big):
    """Three equal logits far below zero: s = 1/(1 - z) ~ 1e-23 (float32), 1e-160 (float64),
    p = 1/3, exact gradient s·(p - δ) = (-2s/3, s/3, s/3). Forming s**2 first underflowed to
    0 (-0 at the target). Bound: ``stablemax_bounds`` in the format's unit roundoff
    (s: 2u, S: 2u more, p: u, t: u, the product: u; first order)."""
    z = np.full((1, 3), big, dtype=get_format(fmt).dtype)
    y = np.array([0])
    _, cache = loss_forward(z, y, kind="stablemax", fmt=fmt)
    g = loss_backward(cache, 1.0)
    want = ex.stablemax_cross_entropy_grad(z.astype(np.float64), y)
    u = get_format(fmt).unit_roundoff
    _, grad_err = stablemax_bounds(z.astype(np.float64), y, 1.0, 0.0, U=u, EXP=u)
    assert np.all(g != 0)
    assert np.all(mp_abs_err(g, want) <= SLACK * grad_err)


@pytest.mark.parametrize(("kind", "eps"), LOSS_CASES)
@given(zy=logit_batches(lo=-60.0, hi=60.0))
def test_float32_loss_and_gradient_match_exact(kind, eps, zy):
    """float32 with correctly rounded exp/log/log1p: loss and gradient within the same
    first-order bounds in float32's unit roundoff (``EXP = u``), plus float32's subnormal
    quantum for results that underflow."""
    z, y = zy
    z = z.astype(np.float32).astype(np.float64)  # the exact inputs the float32 loss sees
    u = 2.0**-24
    eta32 = 4 * 2.0**-149
    loss, cache = loss_forward(z.astype(np.float32), y, kind=kind, fmt="float32", eps=eps)
    g = loss_backward(cache, 1.0)
    ex_loss, ex_grad = exact_loss_and_grad(kind, eps, z, y)
    loss_err, grad_err = bounds_for(kind, eps, z, y, 1.0, U=u, EXP=u)
    assert np.all(mp_abs_err(loss, ex_loss) <= SLACK * (loss_err + u * np.abs(loss)) + eta32)
    assert np.all(mp_abs_err(g, ex_grad) <= SLACK * grad_err + eta32)


def test_libm_mode_reproduces_the_former_softmax_forward():
    """``elementary="libm"``: the forward is NumPy's float32 exp/log rounded as before, bit for
    bit (formula written out here)."""
    rng = np.random.default_rng(5)
    z = (rng.standard_normal((50, 13)) * 8).astype(np.float32)
    y = rng.integers(0, 13, 50)
    loss, cache = loss_forward(z, y, kind="softmax", fmt="float32", elementary="libm")
    d = z - z.max(axis=1, keepdims=True)
    total = np.sum(np.exp(d), axis=1)
    lsm = d - np.log(total)[:, None]
    np.testing.assert_array_equal(loss, 0.0 - lsm[np.arange(50), y])
    np.testing.assert_array_equal(cache.probs, np.exp(lsm))
    np.testing.assert_array_equal(cache.normaliser, total)
    assert cache.elementary == "libm"
    with pytest.raises(ValueError, match="unknown elementary mode"):
        loss_forward(z, y, elementary="exact")
