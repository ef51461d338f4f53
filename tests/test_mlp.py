"""Tests for numstab.mlp: configuration, initialisation, forward and backward.

References: float64 central finite differences along a random direction (HIPS/autograd
``check_grads`` style), an mpmath (256-bit) forward and backward of a tiny network written
here, the Euler identity and exact homogeneity of bias-free ReLU networks, and a plain NumPy
float64 forward/backward written here (used for activation patterns and error bounds).

Error model: ``u = 2**-53``; ``+ - * /`` correctly rounded; NumPy float64 ``exp``/``log``
within 2 ulps (``EXP = 4u``, checked in ``tests/test_functional.py``). A value computed by a
network of additions and multiplications along paths of at most ``m`` roundings is within
``γ_m = m u / (1 - m u)`` times the same expression evaluated on absolute values (the "abs
network": ``|θ|``, ``|x|``, ``|α|``, no ReLU -- an upper bound for any activation pattern). For a
network with widths ``n_0 .. n_L`` the forward path has at most
``m_f = Σ_l (n_{l-1} + 1) + 2`` roundings (dot product, bias, ``α``, and the final product
with an upstream vector), the backward adds ``m_b = Σ_l (n_l + 1) + 2N + 2`` (the weight
gradient sums over the ``N`` samples, twice for index inputs with two slots). Bounds are
first order; ``SLACK = 1.01`` covers second-order terms and the float64 evaluation of the
bound itself.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from helpers import (
    abs_dot,
    bits,
    dyadic,
    fsum_dot,
    gamma,
    modular_idx,
    onehot_counts,
    representable,
)
from hypothesis import example, given
from hypothesis import strategies as st

from numstab import exact as ex
from numstab.functional import GatherPlan, loss_backward, loss_forward
from numstab.mlp import MLPConfig, backward, forward, init_params, param_names
from numstab.precision import PrecisionPolicy, get_format, quantize
from numstab.testing import check_vjp

U = 2.0**-53
EXP = 4 * U
SLACK = 1.01
P64 = PrecisionPolicy.uniform("float64")
FORMATS = ["float16", "bfloat16", "float32", "float64"]


# --- an independent float64 reference network -----------------------------------------------


def ref_forward(params, x_dense, config, alpha=None, masks=None):
    """Plain NumPy float64 forward: returns (pre-activations of every layer, activations
    [x, relu(a_1), ...], logits). ``alpha`` overrides ``config.alpha``; with ``masks`` the
    hidden layers multiply by the given 0/1 patterns instead of applying ReLU."""
    alpha = config.alpha if alpha is None else alpha
    acts, pre = [x_dense], []
    h = x_dense
    for i in range(1, config.n_layers + 1):
        a = h @ params[f"W{i}"] + params.get(f"b{i}", 0.0)
        pre.append(a)
        if i < config.n_layers:
            h = np.maximum(a, 0.0) if masks is None else a * masks[i - 1]
            acts.append(h)
    return pre, acts, alpha * pre[-1]


def ref_backward(params, acts, masks, dz, config, alpha):
    """Plain NumPy float64 backward through fixed ReLU masks."""
    grads = {}
    g = alpha * dz
    for i in range(config.n_layers, 0, -1):
        grads[f"W{i}"] = acts[i - 1].T @ g
        if config.bias:
            grads[f"b{i}"] = g.sum(axis=0)
        if i > 1:
            g = (g @ params[f"W{i}"].T) * masks[i - 2]
    return grads


def abs_params(params):
    return {k: np.abs(v) for k, v in params.items()}


def abs_network(params, x_dense, config):
    """Pre-activations, activations and logits of the abs network (|θ|, |x|, |α|, no ReLU:
    every value is >= 0, so ReLU is the identity there)."""
    return ref_forward(abs_params(params), np.abs(x_dense), config, alpha=abs(config.alpha))


def abs_backward(params, x_dense, masks, dz_abs, config):
    """Backward of the abs network through the real masks: the bound on backward rounding."""
    _, acts, _ = abs_network(params, x_dense, config)
    return ref_backward(abs_params(params), acts, masks, dz_abs, config, abs(config.alpha))


def path_lengths(config, n_samples):
    w = config.widths
    first = 2 if config.input_kind == "index" else w[0] + 1
    m_f = first + sum(w[l - 1] + 1 for l in range(2, len(w))) + 2
    m_b = sum(n + 1 for n in w[1:]) + 2 * n_samples + 2
    return m_f, m_b


def make_problem(seed, input_kind, bias, alpha, hidden=(5, 4), n_classes=3, dyadic_params=False):
    """A small network and its inputs: index inputs (p = 5 modular pairs) or dense inputs."""
    rng = np.random.default_rng(seed)
    if input_kind == "index":
        p = 5
        x = modular_idx(p)
        n_in = 2 * p
        x_dense = onehot_counts(x, n_in)
        plan = GatherPlan.build(x, n_in)
    else:
        n_in = 6
        x = dyadic(rng, (10, n_in))
        x_dense = x
        plan = None
    config = MLPConfig(
        n_inputs=n_in,
        n_classes=n_classes,
        hidden=hidden,
        bias=bias,
        alpha=alpha,
        input_kind=input_kind,
    )
    params = init_params(config, seed, "float64")
    if dyadic_params:
        params = {k: dyadic(rng, v.shape, scale=0.6) for k, v in params.items()}
    return config, params, x, x_dense, plan, rng


INPUTS = [("index", False), ("index", True), ("dense", False), ("dense", True)]


def pattern_is_stable(params, v, h, x_dense, config, m):
    """Proof that no hidden pre-activation changes sign on [θ - h v, θ + h v].

    By induction over layers: with the patterns of layers < l fixed, a_l(θ + t v) - a_l(θ)
    is a polynomial in t whose coefficients are bounded, in absolute value, by those of the
    masked abs network evaluated at |θ| + t|v|, so ``|a_l(θ + t v) - a_l(θ)| <=
    A_l(|θ| + h|v|) - A_l(|θ|)`` for |t| <= h. A unit is stable if |a_l(θ)| exceeds that plus
    the rounding error of the float64 evaluations (γ_m of the abs network each), or if all
    its paths are blocked (a_l and its bound are exactly 0: a dead row without bias).
    """
    pre, _, _ = ref_forward(params, x_dense, config)
    masks = [a > 0 for a in pre[:-1]]
    big = {k: np.abs(params[k]) + h * np.abs(v[k]) for k in params}
    alpha = abs(config.alpha)
    pre_big, _, _ = ref_forward(big, np.abs(x_dense), config, alpha, masks)
    pre_abs, _, _ = ref_forward(abs_params(params), np.abs(x_dense), config, alpha, masks)
    for a, hi, lo in zip(pre[:-1], pre_big[:-1], pre_abs[:-1], strict=True):
        clear = np.abs(a) > (hi - lo) + 3 * gamma(m) * hi
        blocked = (a == 0) & (hi == 0)
        if not np.all(clear | blocked):
            return False
    return True


# --- finite differences ---------------------------------------------------------------------


@pytest.mark.parametrize(("input_kind", "bias"), INPUTS)
@pytest.mark.parametrize("alpha", [1.0, 1.5, -0.625])
def test_backward_matches_finite_differences(input_kind, bias, alpha):
    """F(θ) = ⟨f(θ), R⟩ along a random direction v, with two hidden layers (L = 3).

    With the activation pattern fixed on [θ - h v, θ + h v], F is a cubic in t, so the
    central difference is ``F'(0) + a_3 h²`` exactly, ``|a_3| <= ⟨|R|, abs-network(v)⟩``
    (the t³ term uses v in all three layers; only the first layer's bias enters it). The
    pattern is *proved* unchanged: every hidden pre-activation satisfies
    ``|a_l(θ)| > A_l(|θ| + h|v|) - A_l(|θ|)`` (the abs network bounds every coefficient of
    the polynomial a_l(θ + t v) - a_l(θ)) plus its rounding error (``pattern_is_stable``); a
    draw that fails is redrawn, and the test fails if none is found.
    """
    config, params, x, x_dense, plan, rng = make_problem(
        3, input_kind, bias, alpha, dyadic_params=True
    )
    h = 2.0**-16
    m_f, m_b = path_lengths(config, x_dense.shape[0])
    for _attempt in range(20):
        v = {k: dyadic(rng, p.shape) for k, p in params.items()}
        if pattern_is_stable(params, v, h, x_dense, config, m_f):
            break
        params = {k: dyadic(rng, p.shape, scale=0.6) for k, p in params.items()}  # redraw θ
    else:
        pytest.fail("no draw keeps the activation pattern on [θ - h v, θ + h v]")
    pre, _, _ = ref_forward(params, x_dense, config)
    masks = [a > 0 for a in pre[:-1]]
    R = dyadic(rng, (x_dense.shape[0], config.n_classes))

    def f(p):
        z, _ = forward(p, x, config, P64)
        assert z.dtype == np.float64
        return z

    def vjp(p, R):
        _, caches = forward(p, x, config, P64)
        grads = backward(R, caches, config, P64, plan)
        assert list(grads) == param_names(config)
        return grads

    def third(v, R):
        # F(θ + t v) is a cubic: F'''/6 = a_3, |a_3| <= <|R|, abs network at |v| (b1 only)>.
        v3 = {k: (np.abs(d) if not k.startswith("b") or k == "b1" else 0 * d) for k, d in v.items()}
        _, _, top = ref_forward(v3, np.abs(x_dense), config, alpha=abs(alpha))
        return 6 * abs_dot(R, top)

    g_abs = abs_backward(params, x_dense, masks, np.abs(R), config)
    check_vjp(
        f,
        vjp,
        params,
        direction=v,
        cotangent=R,
        h=h,
        f_err=lambda p: gamma(m_f) * abs_network(p, x_dense, config)[2],
        vjp_err=lambda R: {k: gamma(m_f + m_b) * g_abs[k] for k in params},
        third=third,
    )


# --- against an exact (mpmath) backprop ---------------------------------------------------


def exact_network(params, idx, config, ctx):
    """Forward and backward of the tiny index-input network in mpmath (256 bits): object
    arrays of mpf, every operation exact to ~2**-256 relative (far beyond float64)."""
    P = {k: ex.to_exact(v) for k, v in params.items()}
    alpha = ex.to_exact(config.alpha)
    zero = ctx.mpf(0)
    relu = np.vectorize(lambda t: t if t > 0 else zero, otypes=[object])
    h = P["W1"][idx[:, 0]] + P["W1"][idx[:, 1]]
    if config.bias:
        h = h + P["b1"]
    pre, acts = [h], []
    for i in range(2, config.n_layers + 1):
        a = relu(h)
        acts.append(a)
        h = a @ P[f"W{i}"]
        if config.bias:
            h = h + P[f"b{i}"]
        pre.append(h)
    return P, alpha, pre, acts, h * alpha


def exact_grads(P, alpha, pre, acts, dz, idx, config, ctx):
    grads = {}
    g = dz * alpha
    for i in range(config.n_layers, 1, -1):
        grads[f"W{i}"] = acts[i - 2].T @ g
        if config.bias:
            grads[f"b{i}"] = g.sum(axis=0)
        mask = np.vectorize(lambda t: 1 if t > 0 else 0, otypes=[object])(pre[i - 2])
        g = (g @ P[f"W{i}"].T) * mask
    dW1 = np.full(P["W1"].shape, ctx.mpf(0), dtype=object)
    for i, row in enumerate(idx):
        for r in row:
            dW1[r] = dW1[r] + g[i]
    grads["W1"] = dW1
    if config.bias:
        grads["b1"] = g.sum(axis=0)
    return grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_mean_cross_entropy_gradient_matches_exact_backprop(bias, alpha):
    """p = 5 modular addition, index inputs, hidden (4, 4): float64 forward, softmax
    cross-entropy (mean), loss_backward and backward against an mpmath backprop using the
    exact CE gradient ``numstab.exact.cross_entropy_grad``.

    Bound per gradient entry: ``B(γ_{m_f+m_b}·|dz| + e_dz)`` where B is the abs-network
    backward through the (verified identical) ReLU masks and ``e_dz`` bounds the error of the
    float logit gradient: logit errors ``E_i = γ_{m_f}·max_k z_abs[i, k]`` move softmax by a
    factor within ``exp(±2E_i)``; the float64 softmax path adds ``p_k(Δ_k + EXP + u)`` (see
    ``softmax_bounds`` in tests/test_functional.py, with ``Δ_k = 2u·gap_k + ρ + (EXP+u)
    log C``); the target subtraction and ``dl = fl(1/N)`` add ``2u|dz|``.
    """
    p = 5
    idx = modular_idx(p)
    y = (idx[:, 0] + idx[:, 1] - p) % p
    N = len(y)
    config = MLPConfig(n_inputs=2 * p, n_classes=p, hidden=(4, 4), bias=bias, alpha=alpha)
    params = init_params(config, 11, "float64")
    ctx = ex.context()
    P, a_e, pre_e, acts_e, z_e = exact_network(params, idx, config, ctx)
    dz_e = ex.cross_entropy_grad(z_e, y) / N
    g_e = exact_grads(P, a_e, pre_e, acts_e, dz_e, idx, config, ctx)

    plan = GatherPlan.build(idx, 2 * p)
    z, caches = forward(params, idx, config, P64)
    _, lcache = loss_forward(z, y, kind="softmax", fmt="float64")
    dz = loss_backward(lcache, 1.0 / N)
    grads = backward(dz, caches, config, P64, plan)

    # The ReLU masks agree: every exact pre-activation is far from 0 next to float64 errors.
    x_dense = onehot_counts(idx, 2 * p)
    pre, _, _ = ref_forward(params, x_dense, config)
    for a_f, a_x in zip(pre[:-1], pre_e[:-1], strict=True):
        a_x = a_x.astype(float)
        np.testing.assert_array_equal(a_f == 0, a_x == 0)  # dead rows (no bias): exact zeros
        assert np.all(np.abs(a_x[a_x != 0]) > 1e-9)
        np.testing.assert_array_equal(a_f > 0, a_x > 0)
    masks = [a > 0 for a in pre[:-1]]

    m_f, m_b = path_lengths(config, N)
    _, _, z_abs = abs_network(params, x_dense, config)
    z_x = z_e.astype(float)
    gap = z_x.max(axis=1, keepdims=True) - z_x
    prob = np.exp(-gap)
    prob /= prob.sum(axis=1, keepdims=True)
    C = p
    rho = EXP + U * gap.max(axis=1, keepdims=True) + (C - 1) * U
    delta = 2 * U * gap + rho + (EXP + U) * math.log(C)
    E = gamma(m_f) * z_abs.max(axis=1, keepdims=True)
    dz_x = dz_e.astype(float)
    e_dz = prob * (2 * E + delta + EXP + U) / N + 2 * U * np.abs(dz_x)
    bound = abs_backward(params, x_dense, masks, gamma(m_f + m_b) * np.abs(dz_x) + e_dz, config)

    scale = abs_backward(params, x_dense, masks, np.abs(dz_x), config)
    for k in param_names(config):
        assert grads[k].dtype == np.float64 and grads[k].shape == params[k].shape
        err = np.array(
            [
                float(abs(ex.to_exact(a) - b))
                for a, b in zip(grads[k].ravel(), g_e[k].ravel(), strict=True)
            ]
        ).reshape(grads[k].shape)
        assert np.all(err <= SLACK * bound[k]), (k, np.max(err / bound[k]))
        # Float64 accuracy: the bound is ~1e-14 of the entry's abs-network scale.
        assert np.all(bound[k] <= 1e-12 * scale[k])


# --- Euler identity and homogeneity -------------------------------------------------------


def euler_sides(params, x, config, policy, dz):
    z, caches = forward(params, x, config, policy)
    plan = GatherPlan.build(x, config.n_inputs) if config.input_kind == "index" else None
    grads = backward(dz, caches, config, policy, plan)
    lhs = math.fsum(fsum_dot(params[k], grads[k]) for k in params)
    rhs = config.n_layers * fsum_dot(z, dz)
    return lhs, rhs, z, grads


@given(
    seed=st.integers(0, 2**20),
    hidden=st.lists(st.integers(1, 7), min_size=0, max_size=3),
    alpha=st.sampled_from([1.0, 0.3, -2.0, 7.25]),
    input_kind=st.sampled_from(["index", "dense"]),
)
@example(seed=0, hidden=[], alpha=1.0, input_kind="index")  # a single linear layer: L = 1
@example(seed=1, hidden=[1, 1, 1], alpha=-2.0, input_kind="dense")  # width-1 bottlenecks
def test_euler_identity_for_bias_free_relu_mlps(seed, hidden, alpha, input_kind):
    """⟨θ, ∇θ L⟩ = L_layers · Σ_i ⟨z_i, ∂L/∂z_i⟩, with ∂L/∂z from the mean cross-entropy.

    The identity holds exactly for the network with the *computed* activation pattern (it is
    homogeneous of degree L), so only rounding separates the sides: the gradient entries are
    within ``γ_{m_f+m_b}`` of the abs-network backward, the logits within ``γ_{m_f}`` of the
    abs-network logits, plus the products and fsums (``u`` each)."""
    config, params, x, x_dense, _, rng = make_problem(
        seed, input_kind, False, alpha, hidden=tuple(hidden), n_classes=4
    )
    y = rng.integers(0, 4, x_dense.shape[0])
    z, _ = forward(params, x, config, P64)
    _, lcache = loss_forward(z, y, kind="softmax", fmt="float64")
    dz = loss_backward(lcache, 1.0 / len(y))
    lhs, rhs, z, grads = euler_sides(params, x, config, P64, dz)
    m_f, m_b = path_lengths(config, x_dense.shape[0])
    pre, _, _ = ref_forward(params, x_dense, config)
    masks = [a > 0 for a in pre[:-1]]
    g_abs = abs_backward(params, x_dense, masks, np.abs(dz), config)
    _, _, z_abs = abs_network(params, x_dense, config)
    L = config.n_layers
    tol = SLACK * (
        gamma(m_f + m_b) * sum(abs_dot(params[k], g_abs[k]) for k in params)
        + L * gamma(m_f) * abs_dot(z_abs, dz)
        + U * sum(abs_dot(params[k], grads[k]) for k in params)
        + L * U * abs_dot(z, dz)
        + 2 * U * (abs(lhs) + abs(rhs))
    )
    assert abs(lhs - rhs) <= tol, (lhs, rhs, tol)


@pytest.mark.parametrize("input_kind", ["index", "dense"])
def test_euler_identity_is_sharp_enough_to_catch_a_wrong_gradient(input_kind):
    """The same identity on a fixed network, checking that the tolerance is tiny next to the
    sides, and that the identity fails for a gradient with one layer scaled by 1 + 1e-9."""
    config, params, x, x_dense, _, rng = make_problem(7, input_kind, False, 1.5, hidden=(6, 5))
    dz = rng.standard_normal((x_dense.shape[0], config.n_classes))
    lhs, rhs, z, grads = euler_sides(params, x, config, P64, dz)
    m_f, m_b = path_lengths(config, x_dense.shape[0])
    pre, _, _ = ref_forward(params, x_dense, config)
    g_abs = abs_backward(params, x_dense, [a > 0 for a in pre[:-1]], np.abs(dz), config)
    _, _, z_abs = abs_network(params, x_dense, config)
    tol = SLACK * (
        gamma(m_f + m_b) * sum(abs_dot(params[k], g_abs[k]) for k in params)
        + 3 * gamma(m_f) * abs_dot(z_abs, dz)
        + 2 * U * sum(abs_dot(params[k], grads[k]) for k in params)
        + 2 * U * (abs(lhs) + abs(rhs) + 3 * abs_dot(z, dz))
    )
    assert abs(lhs - rhs) <= tol
    assert tol < 1e-11 * abs(rhs)
    wrong = lhs + 1e-9 * fsum_dot(params["W2"], grads["W2"])
    assert abs(wrong - rhs) > tol


@pytest.mark.parametrize("fmt", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("input_kind", ["index", "dense"])
@pytest.mark.parametrize("c", [2.0**-3, 0.5, 2.0, 2.0**4])
def test_homogeneity_is_bit_exact_for_powers_of_two(fmt, input_kind, c):
    """f(cθ) = c^L f(θ) and ∇f(cθ)ᵀv = c^(L-1) ∇f(θ)ᵀv bit for bit: scaling by a power of two
    commutes with every rounding while nothing overflows or becomes subnormal (float16 is
    left out: its subnormal range starts at 6e-5, where products of small weights land)."""
    config, params, x, _, plan, rng = make_problem(
        5, input_kind, False, 1.75, hidden=(6, 5), n_classes=4
    )
    params = {k: quantize(v, fmt) for k, v in params.items()}
    policy = PrecisionPolicy.uniform(fmt)
    L = config.n_layers
    z, caches = forward(params, x, config, policy)
    scaled = {k: v * v.dtype.type(c) for k, v in params.items()}
    z_c, caches_c = forward(scaled, x, config, policy)
    np.testing.assert_array_equal(bits(z_c), bits(z * z.dtype.type(c**L)))
    dz = quantize(rng.standard_normal(z.shape), fmt)
    g = backward(dz, caches, config, policy, plan)
    g_c = backward(dz, caches_c, config, policy, plan)
    tiny = float(get_format(fmt).tiny)
    for k in g:
        nz = g[k][g[k] != 0]
        assert np.all(np.abs(nz) * min(1.0, c ** (L - 1)) > 2**8 * tiny)  # premise
        np.testing.assert_array_equal(bits(g_c[k]), bits(g[k] * g[k].dtype.type(c ** (L - 1))))


@pytest.mark.parametrize("input_kind", ["index", "dense"])
@pytest.mark.parametrize("c", [3.0, 0.7, 1.1])
def test_homogeneity_for_other_factors(input_kind, c):
    """f(fl(cθ)) vs c^L f(θ) in float64: fl(cθ) perturbs every degree-L monomial by at most
    γ_L; each forward adds γ_{m_f} of the abs network; c**L and the product 2u more."""
    config, params, x, x_dense, _, _ = make_problem(6, input_kind, False, -1.25, hidden=(6, 5))
    L = config.n_layers
    z, _ = forward(params, x, config, P64)
    z_c, _ = forward({k: c * v for k, v in params.items()}, x, config, P64)
    _, _, z_abs = abs_network(params, x_dense, config)
    m_f, _ = path_lengths(config, x_dense.shape[0])
    ref = c**L * z
    tol = SLACK * (c**L * (2 * gamma(m_f) + gamma(L)) * z_abs + 3 * U * np.abs(ref))
    assert np.all(np.abs(z_c - ref) <= tol)
    assert np.any(z_c != ref) or c == 1  # really not bit-exact here: the test is not vacuous


# --- index inputs vs dense inputs, formats ------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [False, True])
def test_index_inputs_equal_dense_onehot_inputs(fmt, bias):
    """The gather fast path gives the dense one-hot network's logits bit for bit; the
    gradients of layers >= 2 are then identical, and W1's differs only by summation order:
    each side within γ_{n_r}(compute)·Σ|dh| of the exact segment sum, plus one storage ulp
    for the two final roundings of 16-bit formats."""
    p = 7
    idx = modular_idx(p)
    cfg_i = MLPConfig(n_inputs=2 * p, n_classes=p, hidden=(8, 6), bias=bias, alpha=1.25)
    cfg_d = dataclasses.replace(cfg_i, input_kind="dense")
    policy = PrecisionPolicy.uniform(fmt)
    params = init_params(cfg_i, 2, fmt)
    x_dense = onehot_counts(idx, 2 * p)
    z_i, c_i = forward(params, idx, cfg_i, policy)
    z_d, c_d = forward(params, x_dense, cfg_d, policy)
    np.testing.assert_array_equal(bits(z_i), bits(z_d))
    dz = quantize(np.random.default_rng(3).standard_normal(z_i.shape) / len(idx), fmt)
    g_i = backward(dz, c_i, cfg_i, policy, GatherPlan.build(idx, 2 * p))
    g_d = backward(dz, c_d, cfg_d, policy)
    for k in param_names(cfg_i):
        assert g_i[k].dtype == get_format(fmt).carrier and representable(g_i[k], fmt)
        if k != "W1":
            np.testing.assert_array_equal(bits(g_i[k]), bits(g_d[k]))
    # W1's gradient is onehotᵀ dh in both paths, with the same dh (layers >= 2 agree bit for
    # bit). |dh| is bounded by the mask-free abs chain |α|·|dz|·|W_L|ᵀ···|W_2|ᵀ, inflated by
    # (1 + u_s)^(2L) for the storage roundings along it (one per product, one for α, and
    # the casts). Each path sums the p terms of a row's segment in the compute format
    # (γ_p(u_c) each) and rounds once to storage (one storage ulp between the two results).
    f = get_format(fmt)
    u_c = policy.compute.unit_roundoff
    g = np.abs(dz.astype(np.float64)) * abs(cfg_i.alpha)
    for i in range(cfg_i.n_layers, 1, -1):
        g = g @ np.abs(params[f"W{i}"].astype(np.float64)).T
    A = x_dense.T @ g * (1 + f.unit_roundoff) ** (2 * cfg_i.n_layers) * 1.001
    ulp_s = np.ldexp(1.0, (np.floor(np.log2(np.maximum(A, 1e-300))) - f.precision + 1).astype(int))
    extra = ulp_s if f.is_emulated else 0
    diff = np.abs(g_i["W1"].astype(np.float64) - g_d["W1"].astype(np.float64))
    assert np.all(diff <= 2 * gamma(p, u_c) * A + extra)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
@pytest.mark.parametrize("input_kind", ["index", "dense"])
def test_16_bit_network_outputs_and_gradients_are_representable(fmt, input_kind):
    config, params, x, _, plan, rng = make_problem(4, input_kind, True, 0.9)
    params = {k: quantize(v, fmt) for k, v in params.items()}
    policy = PrecisionPolicy.uniform(fmt)
    before = {k: v.copy() for k, v in params.items()}
    x_before = x.copy()
    z, caches = forward(params, x, config, policy)
    assert z.dtype == np.float32 and representable(z, fmt)
    grads = backward(rng.standard_normal(z.shape), caches, config, policy, plan)
    for k, g in grads.items():
        assert g.dtype == np.float32 and g.shape == params[k].shape and representable(g, fmt)
        np.testing.assert_array_equal(params[k], before[k])  # nothing mutated
    np.testing.assert_array_equal(x, x_before)


def test_index_backward_needs_a_plan():
    config, params, x, _, _, _ = make_problem(0, "index", False, 1.0)
    z, caches = forward(params, x, config, P64)
    with pytest.raises(ValueError, match="GatherPlan"):
        backward(np.ones_like(z), caches, config, P64)


# --- initialisation -----------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_param_names_and_shapes(bias):
    config = MLPConfig(n_inputs=10, n_classes=5, hidden=(7, 3), bias=bias)
    names = param_names(config)
    expected = ["W1", "b1", "W2", "b2", "W3", "b3"] if bias else ["W1", "W2", "W3"]
    assert names == expected
    params = init_params(config, 0)
    assert list(params) == names
    widths = (10, 7, 3, 5)
    for i in range(3):
        assert params[f"W{i + 1}"].shape == (widths[i], widths[i + 1])
        if bias:
            assert params[f"b{i + 1}"].shape == (widths[i + 1],)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [False, True])
def test_init_bounds_stream_and_representability(fmt, bias):
    """U(-1/√fan_in, 1/√fan_in) drawn in float64 from default_rng(seed), layer by layer
    (weight then bias), rounded to the format: reproduced here draw for draw. Rounding is
    monotone, so |w| <= fl(1/√fan_in). The bound is really the one used: over 2000+ draws the
    largest |w| exceeds 0.99 bound (probability of failure 0.99**2000 < 1e-8) and the sample
    variance is within 5 standard errors of bound²/3 (Var of U² is bound⁴·4/45)."""
    config = MLPConfig(n_inputs=40, n_classes=50, hidden=(60,), bias=bias)
    params = init_params(config, 123, fmt)
    rng = np.random.default_rng(123)
    for i, (fan_in, fan_out) in enumerate([(40, 60), (60, 50)], start=1):
        bound = 1 / math.sqrt(fan_in)
        w = params[f"W{i}"]
        assert w.dtype == get_format(fmt).carrier and representable(w, fmt)
        np.testing.assert_array_equal(
            w, quantize(rng.uniform(-bound, bound, (fan_in, fan_out)), fmt)
        )
        if bias:
            b = params[f"b{i}"]
            assert representable(b, fmt)
            np.testing.assert_array_equal(b, quantize(rng.uniform(-bound, bound, fan_out), fmt))
            assert np.all(np.abs(b) <= quantize(np.array(bound), fmt))
        assert np.all(np.abs(w) <= quantize(np.array(bound), fmt))
        assert np.abs(w).max() > 0.99 * bound
        n = w.size
        var = float(np.mean(w.astype(np.float64) ** 2))
        se = math.sqrt(4 / 45 * bound**4 / n)
        assert abs(var - bound**2 / 3) < 5 * se + 2 * float(get_format(fmt).eps) * bound**2


def test_init_determinism_and_seeds():
    config = MLPConfig(n_inputs=12, n_classes=4, hidden=(9, 9), bias=True)
    a = init_params(config, 7)
    b = init_params(config, 7)
    c = init_params(config, np.random.default_rng(7))
    d = init_params(config, 8)
    for k in a:
        np.testing.assert_array_equal(bits(a[k]), bits(b[k]))
        np.testing.assert_array_equal(bits(a[k]), bits(c[k]))
        assert not np.array_equal(a[k], d[k])


# --- configuration ------------------------------------------------------------------------


def test_config_properties():
    config = MLPConfig(n_inputs=226, n_classes=113, hidden=[200, 200])
    assert config.hidden == (200, 200)
    assert config.widths == (226, 200, 200, 113)
    assert config.n_layers == 3
    assert config.to_dict()["hidden"] == (200, 200)
    assert MLPConfig(n_inputs=np.int64(3), n_classes=2, hidden=()).n_layers == 1


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("n_inputs", 0, r"n_inputs.*\b0\b"),
        ("n_inputs", -3, r"n_inputs.*-3"),
        ("n_inputs", 2.5, r"n_inputs.*2\.5"),
        ("n_inputs", "7", r"n_inputs.*'7'"),
        ("n_classes", 0, r"n_classes.*\b0\b"),
        ("n_classes", 3.0, r"n_classes.*3\.0"),
        ("hidden", (4, 0), r"hidden.*\(4, 0\)"),
        ("hidden", (4, -2), r"hidden.*-2"),
        ("input_kind", "onehot", r"'onehot'.*index.*dense"),
        ("alpha", 0.0, r"alpha.*0\.0"),
        ("alpha", float("nan"), r"alpha.*nan"),
        ("alpha", float("inf"), r"alpha.*inf"),
    ],
)
def test_config_rejects_bad_values(field, value, match):
    kwargs = {"n_inputs": 4, "n_classes": 3, "hidden": (5,), field: value}
    with pytest.raises(ValueError, match=match):
        MLPConfig(**kwargs)


@pytest.mark.parametrize("hidden", [(2.5,), (0.5,), ("3",)])
def test_config_rejects_non_integer_hidden_widths(hidden):
    with pytest.raises(ValueError, match=re.escape(repr(hidden[0]))):
        MLPConfig(n_inputs=4, n_classes=3, hidden=hidden)


@pytest.mark.parametrize("field", ["n_inputs", "n_classes", "hidden"])
def test_config_rejects_bool_widths(field):
    kwargs = {"n_inputs": 4, "n_classes": 3, "hidden": (5,)}
    kwargs[field] = (True,) if field == "hidden" else True
    with pytest.raises(ValueError, match="True"):
        MLPConfig(**kwargs)
