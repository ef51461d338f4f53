"""numstab.optim on array_api_strict (float32, float64): the NumPy code path, the same bits.

Every optimizer runs a few steps on strict arrays and on NumPy arrays from the same inputs.
Element-wise arithmetic is IEEE round-to-nearest in one dtype on both (array_api_strict wraps
NumPy), so SGD, Adam and AdamW must agree bit for bit: parameters, state and ``last_update``.

The dot products of ⊥Grad and of the normalized learning rate go through the backend hook
``vdot``: NumPy's ``einsum`` loop on NumPy, ``sum(a * b)`` (NumPy's pairwise sum underneath)
on strict. Those optimizers are checked three ways:

* with the NumPy hook replaced by the strict hook's own order (``numpy.sum(a * b)``), every
  step agrees bit for bit: all other arithmetic is the same;
* with inputs whose dot products are exact in any order (few-bit dyadic values), the real
  hooks agree bit for bit;
* on general inputs, the difference obeys the error bound derived in :func:`perp_tensor_bound`
  (and its global / norm counterparts), a first-order forward-error bound in float64.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest

import numstab.optim as optim
from numstab.backend import vdot as backend_vdot
from numstab.optim import (
    SGD,
    Adam,
    AdamW,
    NormalizedLR,
    PerpGrad,
    global_grad_norm,
    perp_grad_global,
    perp_grad_tensor,
    state_arrays,
)

xs = pytest.importorskip("array_api_strict")

STRICT_ARRAY = type(xs.asarray(0.0))
FORMATS = ["float32", "float64"]
U = 2.0**-53  # unit roundoff of float64, the accumulation dtype of every dot product here
SHAPES = {"W1": (9, 7), "W2": (7, 5), "w3": (5,)}
PAPER_SHAPES = {"W1": (226, 200), "W2": (200, 200), "W3": (200, 113)}
STEPS = 4


def gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: ``|fl(a . b) - a . b| <= gamma_n sum |a_i b_i|``
    for an ``n``-term dot product summed in any order (with or without fused multiply-add)."""
    return n * U / (1 - n * U)


# --- helpers ----------------------------------------------------------------------------------


def to_strict(d: dict) -> dict:
    return {k: xs.asarray(np.array(v, copy=True)) for k, v in d.items()}


def host(a) -> np.ndarray:
    return np.from_dlpack(a) if isinstance(a, STRICT_ARRAY) else np.asarray(a)


def assert_bits_equal(a, b, what: str):
    a, b = host(a), host(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), (
        f"{what}: {np.count_nonzero(a != b)} of {a.size} elements differ, max |diff| "
        f"{np.max(np.abs(a - b))}"
    )


def assert_strict(a, fmt: str, what: str):
    assert isinstance(a, STRICT_ARRAY), f"{what} is {type(a).__module__}.{type(a).__name__}"
    assert a.dtype == getattr(xs, fmt), f"{what} has dtype {a.dtype}"


def make_inputs(fmt: str, seed: int = 0):
    """Parameters and a gradient sequence with a few special values: a -0.0 parameter, a
    gradient entry that is 0 at every step (``v`` stays 0: Adam's denominator is ``eps``), a
    -0.0 gradient."""
    rng = np.random.default_rng(seed)
    params = {k: (0.5 * rng.standard_normal(s)).astype(fmt) for k, s in SHAPES.items()}
    params["W1"][0, 0] = -0.0
    grads = []
    for _ in range(STEPS):
        g = {k: (0.05 * rng.standard_normal(s)).astype(fmt) for k, s in SHAPES.items()}
        g["W1"][0, 1] = 0.0
        g["W2"][1, 1] = -0.0
        grads.append(g)
    return params, grads


def run(opt, params: dict, grads: list, convert):
    """``len(grads)`` steps from copies of ``params``; returns (params, state, last updates)."""
    p = convert(params)
    state = opt.init_state(p)
    updates = []
    for g in grads:
        opt.step(p, convert(g), state)
        updates.append(dict(state.last_update))
    return p, state, updates


def numpy_copy(d: dict) -> dict:
    return {k: np.array(v, copy=True) for k, v in d.items()}


def compare_runs(opt, fmt: str, params: dict, grads: list, *, check_updates: bool = True):
    """Run on NumPy and on strict; assert strict outputs and bit-identical values."""
    pn, sn, un = run(opt, params, grads, numpy_copy)
    ps, ss, us = run(opt, params, grads, to_strict)
    assert ss.step == sn.step == len(grads)
    for k in pn:
        assert_strict(ps[k], fmt, f"params[{k!r}]")
        assert_bits_equal(ps[k], pn[k], f"params[{k!r}]")
    assert ss.tensors.keys() == sn.tensors.keys()
    state_fmt = ss.state_format
    for k, tensors in ss.tensors.items():
        assert tensors.keys() == sn.tensors[k].keys()
        for t, arr in tensors.items():
            assert_strict(arr, state_fmt, f"state {k}/{t}")
            assert_bits_equal(arr, sn.tensors[k][t], f"state {k}/{t}")
    if check_updates:
        for step, (a, b) in enumerate(zip(us, un, strict=True)):
            assert a.keys() == b.keys()
            for k in a:
                assert isinstance(a[k], STRICT_ARRAY)
                assert_bits_equal(a[k], b[k], f"last_update[{k!r}] of step {step + 1}")
    return (pn, sn), (ps, ss)


# --- optimizers without dot products: bit for bit ---------------------------------------------

BIT_EXACT = {
    "sgd": lambda f: SGD(0.05, storage_format=f),
    "sgd_momentum_dampening_wd": lambda f: SGD(
        0.05, momentum=0.9, dampening=0.25, weight_decay=0.01, storage_format=f
    ),
    "sgd_nesterov_wd": lambda f: SGD(
        0.05, momentum=0.9, nesterov=True, weight_decay=0.01, storage_format=f
    ),
    "sgd_momentum_state_float64": lambda f: SGD(
        0.05, momentum=0.9, storage_format=f, state_format="float64"
    ),
    "adam_l2": lambda f: Adam(
        lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, storage_format=f
    ),
    "adamw_paper": lambda f: AdamW(
        lr=0.01, betas=(0.9, 0.99), eps=1e-25, weight_decay=0.5, storage_format=f
    ),
    # 1 - beta1 >= 0.5: lerp's other formula, end - (end - self) * (1 - weight)
    "adamw_small_beta1": lambda f: AdamW(lr=0.01, betas=(0.3, 0.9), storage_format=f),
    "adamw_state_float64": lambda f: AdamW(
        lr=0.01, betas=(0.9, 0.99), eps=1e-25, storage_format=f, state_format="float64"
    ),
}


@pytest.mark.parametrize("name", list(BIT_EXACT))
@pytest.mark.parametrize("fmt", FORMATS)
def test_optimizer_bit_identical_to_numpy(fmt, name):
    params, grads = make_inputs(fmt)
    compare_runs(BIT_EXACT[name](fmt), fmt, params, grads)


@pytest.mark.parametrize("fmt", FORMATS)
def test_special_values_propagate_identically(fmt):
    """NaN, ±inf and huge gradients give the same bits (NaN payloads included) on both."""
    params, grads = make_inputs(fmt, seed=1)
    grads[1]["W1"][2, 3] = np.nan
    grads[2]["W2"][0, 0] = np.inf
    grads[2]["W2"][0, 1] = -np.inf
    grads[0]["w3"][0] = np.finfo(fmt).max
    grads[0]["w3"][1] = np.finfo(fmt).smallest_subnormal
    for opt in (
        AdamW(lr=0.01, betas=(0.9, 0.99), eps=1e-25, storage_format=fmt),
        SGD(0.05, momentum=0.9, nesterov=True, storage_format=fmt),
    ):
        with np.errstate(all="ignore"):
            (pn, _), _ = compare_runs(opt, fmt, params, grads)
        assert np.isnan(pn["W1"][2, 3]) and not np.isfinite(pn["W2"][0, 0])


# --- ⊥Grad and the normalized learning rate ---------------------------------------------------

DOT = {
    "perp_tensor_adamw": lambda f: PerpGrad(
        AdamW(lr=0.01, betas=(0.9, 0.99), eps=1e-25, storage_format=f)
    ),
    "perp_global_sgd": lambda f: PerpGrad(
        SGD(0.05, momentum=0.9, storage_format=f), scope="global"
    ),
    "normalized_sgd": lambda f: NormalizedLR(SGD(0.05, momentum=0.9, storage_format=f), 0.05),
    "normalized_perp_adamw": lambda f: NormalizedLR(
        PerpGrad(AdamW(lr=0.01, betas=(0.9, 0.99), eps=1e-25, storage_format=f)), 0.01
    ),
}


def numpy_pairwise_vdot(a, b):
    """The strict hook's summation order on NumPy: ``numpy.sum(a * b)`` (pairwise)."""
    if isinstance(a, np.ndarray):
        return np.sum(a * b, dtype=a.dtype)
    return backend_vdot(a, b)


@pytest.mark.parametrize("name", list(DOT))
@pytest.mark.parametrize("fmt", FORMATS)
def test_dot_optimizers_bit_identical_with_the_same_summation(fmt, name, monkeypatch):
    """With NumPy's dot product summed in strict's order, every step agrees bit for bit: the
    only difference between the backends is the summation order of ``vdot``."""
    monkeypatch.setattr(optim, "vdot", numpy_pairwise_vdot)
    params, grads = make_inputs(fmt, seed=2)
    compare_runs(DOT[name](fmt), fmt, params, grads)


def exact_dot_inputs(fmt: str, seed: int = 3):
    """Dyadic parameters ``w`` and gradients ``g = w / 8 + h`` with ``h ⟂ w`` exactly.

    Every product and partial sum of the dot products ⊥Grad and the norm take is exact in
    float64 (few-bit integers times powers of two), so the projection is exactly ``1/8``,
    ``g⊥ = h`` and ``||g⊥||`` is exact: any summation order gives the same bits.
    """
    rng = np.random.default_rng(seed)
    params, grads = {}, {}
    for k, s in SHAPES.items():
        w = rng.integers(-4, 5, size=s).astype(np.int64)
        w.flat[0] = 3  # never all zero
        h = rng.integers(-4, 5, size=s).astype(np.int64)
        h = int((w * w).sum()) * h - int((w * h).sum()) * w  # integer, orthogonal to w
        params[k] = (w * 2.0**-3).astype(fmt)
        grads[k] = (w * 2.0**-6 + h * 2.0**-24).astype(fmt)
        assert np.array_equal(grads[k].astype(np.float64), w * 2.0**-6 + h * 2.0**-24)
    return params, grads


@pytest.mark.parametrize("name", list(DOT))
@pytest.mark.parametrize("fmt", FORMATS)
def test_dot_optimizers_bit_identical_when_dots_are_exact(fmt, name):
    """The real hooks (einsum vs pairwise sum) agree bit for bit when the sums are exact.

    After one step the parameters are no longer few-bit dyadic, so ⊥Grad is compared on one
    step; the normalized SGD's norm depends on the gradients only: several steps.
    """
    params, grads = exact_dot_inputs(fmt)
    rng = np.random.default_rng(4)
    seq = [grads] + [
        {k: (g * rng.integers(1, 4)).astype(fmt) for k, g in grads.items()}
        for _ in range(STEPS - 1)
    ]
    steps = seq if name == "normalized_sgd" else seq[:1]
    compare_runs(DOT[name](fmt), fmt, params, steps)


def perp_tensor_bound(w, g, eps: float = 1e-30):
    """Per-element bound on ``|perp_grad_tensor on backend A - on backend B|`` (float64
    arithmetic) when only the summation order of the dot products differs.

    Each backend's result is within ``err`` of the exact-arithmetic value ``out``; ``2 err``
    bounds the difference. First order in ``u = 2**-53``, with ``n`` elements and
    ``gamma = gamma_n`` (any summation order; see :func:`gamma`)::

        dots:   |ΔD_wg| <= gamma S_wg,  S_wg = sum|w_i g_i|;  D_ww, D_gg: relative gamma
        p = D_wg / (D_ww + eps):          dp = gamma S_wg / den + |p| (gamma + 2u)
        o_i = g_i - p w_i (two roundings): do_i = dp |w_i| + u |p w_i| + u |o_i|
        Q = o . o:                         dQ = 2 sum |o_i| do_i + gamma Q
        scale = sqrt(D_gg) / (sqrt(Q) + eps):  rho = gamma / 2 + dQ / (2 Q) + 4u
                                           (two square roots, + eps, the division)
        out_i = o_i * scale:               err_i = scale (do_i + |o_i| rho) + u |out_i|

    The ingredients are evaluated in float64 (``math.fsum`` sums), which perturbs the bound by
    a relative ``O(n u)``; the factor ``1 + 1e-6`` covers that and the neglected second-order
    terms (relative size ``(n u)**2``).
    """
    w = np.asarray(w, dtype=np.float64).ravel()
    g = np.asarray(g, dtype=np.float64).ravel()
    gm = gamma(w.size)
    s_wg = math.fsum(np.abs(w * g))
    den = math.fsum(w * w) + eps
    p = math.fsum(w * g) / den
    o = g - p * w
    q = math.fsum(o * o)
    scale = math.sqrt(math.fsum(g * g)) / (math.sqrt(q) + eps)
    out = o * scale
    dp = gm * s_wg / den + abs(p) * (gm + 2 * U)
    do = dp * np.abs(w) + U * np.abs(p * w) + U * np.abs(o)
    dq = 2 * math.fsum(np.abs(o) * do) + gm * q
    rho = gm / 2 + dq / (2 * q) + 4 * U
    err = scale * (do + np.abs(o) * rho) + U * np.abs(out)
    return 2 * err * (1 + 1e-6)


def paper_inputs(fmt: str, seed: int = 5):
    rng = np.random.default_rng(seed)
    params = {k: (0.1 * rng.standard_normal(s)).astype(fmt) for k, s in PAPER_SHAPES.items()}
    # a gradient with a large component along w: the projection removes most of it
    grads = {
        k: (0.3 * params[k] + 1e-3 * rng.standard_normal(s)).astype(fmt)
        for k, s in PAPER_SHAPES.items()
    }
    return params, grads


@pytest.mark.parametrize("fmt", FORMATS)
def test_perp_grad_tensor_dot_order_bound(fmt):
    """Per tensor, ⊥Grad in float64 on NumPy and on strict differ by at most the bound of
    :func:`perp_tensor_bound`; rounded to the storage format (``PerpGrad.project``), by at
    most one ulp of that format beyond it.

    The bound is the worst case over summation orders (``gamma_n`` grows like ``n``); on
    these inputs the observed differences reach ~6e-4 of it (rounding errors of a real sum
    grow like ``sqrt(n)``, and the pairwise sum's like ``log n``)."""
    params, grads = paper_inputs(fmt)
    differs = 0
    for k in params:
        a = perp_grad_tensor(params[k], grads[k])
        b = perp_grad_tensor(xs.asarray(params[k]), xs.asarray(grads[k]))
        assert isinstance(b, STRICT_ARRAY) and b.dtype == xs.float64
        b = host(b)
        bound = perp_tensor_bound(params[k], grads[k]).reshape(a.shape)
        assert np.all(np.abs(a - b) <= bound), float(np.max(np.abs(a - b) / bound))
        differs += int(np.count_nonzero(a != b))
    assert differs > 0  # the two summation orders really differ on these inputs

    opt = PerpGrad(AdamW(lr=0.01, storage_format=fmt))
    state = opt.init_state(params)
    pn = opt.project(params, grads, state)
    sp = to_strict(params)
    ps = opt.project(sp, to_strict(grads), opt.init_state(sp))
    for k in params:
        assert_strict(ps[k], fmt, f"g⊥[{k!r}]")
        a, b = pn[k].astype(np.float64), host(ps[k]).astype(np.float64)
        bound = perp_tensor_bound(params[k], grads[k]).reshape(a.shape)
        ulp = np.spacing(np.maximum(np.abs(pn[k]), np.abs(host(ps[k])))).astype(np.float64)
        assert np.all(np.abs(a - b) <= bound + ulp)


def perp_global_bound(params: dict, grads: dict):
    """Per-element bound for the global ⊥Grad (no rescaling), as :func:`perp_tensor_bound`:
    ``tg`` and ``tt`` are sums of all ``N`` products (per tensor, then across tensors: one
    order among all), so ``|Δtg| <= gamma_N S_wg``, ``tt`` relative ``gamma_N``; then
    ``dc = gamma_N S_wg / tt + |c| (gamma_N + u)`` and ``err_i = dc |w_i| + u |c w_i| +
    u |o_i|``."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    g = {k: np.asarray(v, dtype=np.float64) for k, v in grads.items()}
    n = sum(v.size for v in w.values())
    gm = gamma(n)
    s_wg = math.fsum(math.fsum(np.abs(w[k] * g[k]).ravel()) for k in w)
    tt = math.fsum(math.fsum((w[k] * w[k]).ravel()) for k in w)
    c = math.fsum(math.fsum((w[k] * g[k]).ravel()) for k in w) / tt
    dc = gm * s_wg / tt + abs(c) * (gm + U)
    out = {}
    for k in w:
        o = g[k] - c * w[k]
        out[k] = 2 * (dc * np.abs(w[k]) + U * np.abs(c * w[k]) + U * np.abs(o)) * (1 + 1e-6)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_perp_grad_global_dot_order_bound(fmt):
    params, grads = paper_inputs(fmt, seed=6)
    a = perp_grad_global(params, grads)
    b = perp_grad_global(to_strict(params), to_strict(grads))
    bound = perp_global_bound(params, grads)
    for k in params:
        assert isinstance(b[k], STRICT_ARRAY)
        d = np.abs(a[k] - host(b[k]))
        assert np.all(d <= bound[k]), float(np.max(d / bound[k]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_global_grad_norm_and_normalized_lr_dot_order_bound(fmt):
    """``||g||`` from ``sqrt(T) / s`` with ``T`` a sum of ``N`` squares (relative error
    ``gamma_N``, any order) and ``s`` a power of two: the backends differ by at most
    ``(gamma_N + 2u)`` relative (two square roots' roundings), the learning rate
    ``lr0 / ||g||`` by ``gamma_N + 4u``. The result is a host NumPy scalar on both."""
    _, grads = paper_inputs(fmt, seed=7)
    n = sum(g.size for g in grads.values())
    a = global_grad_norm(grads)
    b = global_grad_norm(to_strict(grads))
    assert isinstance(b, np.float64)
    assert abs(a - b) <= (gamma(n) + 2 * U) * a * (1 + 1e-6)
    opt = NormalizedLR(SGD(0.1, storage_format=fmt), 0.05)
    la, lb = opt.lr_for(grads), opt.lr_for(to_strict(grads))
    assert isinstance(lb, float)
    assert abs(la - lb) <= (gamma(n) + 4 * U) * la * (1 + 1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_perp_grad_global_zero_weights_returns_g(fmt):
    """``θᵀθ = 0``: strict takes the branch-free path (``where``, as on a GPU) and returns
    ``g`` exactly (signed zeros included), like NumPy's branch."""
    params = {k: np.zeros(s, dtype=fmt) for k, s in SHAPES.items()}
    params["W1"][0, 0] = -0.0
    _, grads = make_inputs(fmt)
    grads = grads[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the masked 0/0 must not warn
        b = perp_grad_global(to_strict(params), to_strict(grads))
    a = perp_grad_global(params, grads)
    for k in params:
        assert_bits_equal(b[k], a[k], k)
        assert_bits_equal(b[k], grads[k].astype(np.float64), k)


# --- checkpoints and backend errors -----------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda f: AdamW(lr=0.01, betas=(0.9, 0.99), eps=1e-25, storage_format=f),
        lambda f: SGD(0.05, momentum=0.9, nesterov=True, storage_format=f),
    ],
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_state_arrays_round_trip_on_strict(fmt, build):
    """``state_arrays`` gives host NumPy copies (savable without pickle);
    ``load_state_arrays(..., like=params)`` puts them back on strict, and the restored run
    continues bit for bit."""
    opt = build(fmt)
    params, grads = make_inputs(fmt, seed=8)
    p, state, _ = run(opt, params, grads[:2], to_strict)
    arrays = state_arrays(state)
    for key, arr in arrays.items():
        pname, tname = key.split("/")
        assert type(arr) is np.ndarray and arr.dtype == np.dtype(fmt)
        assert_bits_equal(arr, state.tensors[pname][tname], key)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as f:
        loaded = {k: f[k] for k in f.files}

    restored = opt.load_state_arrays(loaded, state.step, like=p)
    for ts in restored.tensors.values():
        for arr in ts.values():
            assert_strict(arr, fmt, "restored state")
            assert arr.device == next(iter(p.values())).device
    p2 = {k: xs.asarray(host(v).copy()) for k, v in p.items()}
    for g in grads[2:]:
        opt.step(p, to_strict(g), state)
        opt.step(p2, to_strict(g), restored)
    for k in p:
        assert_bits_equal(p2[k], p[k], k)
    assert state_arrays(restored).keys() == state_arrays(state).keys()
    for key, arr in state_arrays(restored).items():
        assert_bits_equal(arr, state_arrays(state)[key], key)

    # strict arrays in: the state stays on strict, as copies
    src = {k: xs.asarray(v) for k, v in arrays.items()}
    again = opt.load_state_arrays(src, 2)
    key = next(iter(src))
    pname, tname = key.split("/")
    assert isinstance(again.tensors[pname][tname], STRICT_ARRAY)
    src[key][...] = xs.asarray(7.0, dtype=src[key].dtype)
    assert not np.any(host(again.tensors[pname][tname]) == 7.0)


def test_host_state_with_strict_params_is_a_clear_error():
    opt = AdamW(lr=0.01, storage_format="float32")
    params, grads = make_inputs("float32")
    p, state, _ = run(opt, params, grads[:1], to_strict)
    host_state = opt.load_state_arrays(state_arrays(state), state.step)  # no like=
    with pytest.raises(TypeError, match="like=params"):
        opt.step(p, to_strict(grads[1]), host_state)


def test_load_state_arrays_checks_dtype_on_strict():
    opt = AdamW(lr=0.01, storage_format="float32")
    bad = {"W/exp_avg": xs.zeros(3, dtype=xs.float64), "W/exp_avg_sq": xs.zeros(3)}
    with pytest.raises(ValueError, match="dtype"):
        opt.load_state_arrays(bad, 1)


@pytest.mark.parametrize(
    "build",
    [
        lambda: SGD(0.05, storage_format="float16"),
        lambda: AdamW(lr=0.01, storage_format="bfloat16", state_format="float32"),
        lambda: AdamW(lr=0.01, storage_format="float32", state_format="bfloat16"),
    ],
)
def test_emulated_formats_need_numpy_or_cupy(build):
    """float16/bfloat16 round on bit patterns (no views in the standard): TypeError up front,
    before any parameter is touched."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # construction-time hazard reports are not the point
        opt = build()
    params = to_strict({"W": np.ones((2, 3), dtype=np.float32)})
    with pytest.raises(TypeError, match="NumPy or CuPy"):
        opt.init_state(params)
