"""Tests for numstab.transformer: the one-layer encoder's forward and backward.

References, none sharing code with numstab.transformer:

* PyTorch (float64): ``nn.Embedding`` -> ``nn.TransformerEncoderLayer`` -> ``nn.Linear`` at the
  last position, with the same weights; its forward and its autograd gradients. With dropout,
  the masks are shared by replacing ``torch.nn.functional.dropout`` with a function that
  multiplies by the next mask (the layer runs its attention with ``need_weights=True``, the
  path that calls ``dropout`` on the attention weights); for StableMax attention that path's
  ``softmax`` is replaced by StableMax written here in torch.
* ``numstab.testing.check_vjp`` (float64 central differences along a random direction).
* ``numstab.exact`` (mpmath) for the attention softmax rows and their collapse.

Error model (the tolerances)
----------------------------
The class :class:`Bd` below is a running error bound: a value with a bound on its absolute
distance to the exact value of the same formula, propagated through each operation with
rigorous rules (``u`` the unit roundoff of the evaluation): ``a ± b``: ``e_a + e_b + u|v|``;
``a·b``: ``|a| e_b + e_a |b| + e_a e_b + u|v|``; ``a / b``: ``(e_a + |v| e_b) / (|b| - e_b) +
u|v|``; ``exp``: ``v·expm1(e) + 2u·v`` (correctly rounded in numstab, within 1 ulp in
PyTorch); ``sqrt``: ``e / (√v + √(v - e)) + u√v``; a sum or dot product of ``k`` terms:
``Σ e + γ_k Σ|terms|`` (any order); ``max`` and ReLU are 1-Lipschitz. The twin network
evaluates numstab's formulas with these rules (forward and a hand-written backward), so
``E`` bounds the distance of a float evaluation of those formulas from the exact network.
PyTorch's float64 kernels evaluate the same quantities with sums in other orders (the same
``γ_k`` bound) and ``q·√s, k·√s`` instead of ``(q·k)·s`` (covered: the twin counts the scaling
as one more rounding on each score), so each side is within ``E`` of the exact value and the
test allows ``2E`` (times ``SLACK = 1.01`` for the float64 evaluation of the bound itself).
A ReLU argument within its bound of 0 could take either branch: the draws keep them away,
and the tests assert it.
"""

from __future__ import annotations

import math
import types

import mpmath
import numpy as np
import pytest
from helpers import dyadic, gamma

from numstab import exact as ex
from numstab.fidelity import op_fidelity
from numstab.losses.rounding import recording
from numstab.precision import PrecisionPolicy, quantize
from numstab.testing import check_vjp
from numstab.transformer import (
    DropoutKey,
    TransformerConfig,
    attention_collapse,
    audit_attention,
    backward,
    forward,
    init_params,
    param_names,
)
from numstab.transformer.attention import attention_forward
from numstab.transformer.dropout import SITES, multiplier
from numstab.transformer.torch_twin import TORCH_NAMES, torch_grads, torch_modules

torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch")

U = 2.0**-53
SLACK = 1.01
P64 = PrecisionPolicy.uniform("float64")


# --- a value with a running error bound -----------------------------------------------------


class Bd:
    """``v`` (float64 array) and ``e >= |v - exact|`` entrywise; ``u``: the unit roundoff of
    every operation that produced it."""

    def __init__(self, v, e=None, u=U):
        self.v = np.asarray(v, dtype=np.float64)
        self.e = np.zeros_like(self.v) if e is None else np.asarray(e, dtype=np.float64)
        self.u = u

    def _new(self, v, e):
        return Bd(v, e + self.u * np.abs(v) + _eta(self.u), self.u)

    def __add__(self, o):
        o = _bd(o, self.u)
        return self._new(self.v + o.v, self.e + o.e)

    def __sub__(self, o):
        o = _bd(o, self.u)
        return self._new(self.v - o.v, self.e + o.e)

    def __mul__(self, o):
        o = _bd(o, self.u)
        e = np.abs(self.v) * o.e + self.e * np.abs(o.v) + self.e * o.e
        return self._new(self.v * o.v, e)

    def __truediv__(self, o):
        o = _bd(o, self.u)
        assert np.all(o.e < np.abs(o.v)), "divisor within its error bound of 0"
        v = self.v / o.v
        return self._new(v, (self.e + np.abs(v) * o.e) / (np.abs(o.v) - o.e))

    def __getitem__(self, i):
        return Bd(self.v[i], self.e[i], self.u)

    def reshape(self, *shape):
        return Bd(self.v.reshape(*shape), self.e.reshape(*shape), self.u)

    @property
    def T(self):
        return Bd(self.v.T, self.e.T, self.u)

    def exp(self):
        v = np.exp(self.v)
        e = v * np.expm1(self.e) * (1 + 2 * self.u) + 2 * self.u * v + _eta(self.u)
        return Bd(v, e, self.u)

    def sqrt(self):
        v = np.sqrt(self.v)
        lo = np.sqrt(np.maximum(self.v - self.e, 0))
        return self._new(v, self.e / (v + lo))

    def sum(self, axis=-1):
        k = self.v.shape[axis]
        e = self.e.sum(axis) + gamma(k, self.u) * np.abs(self.v).sum(axis)
        return Bd(self.v.sum(axis), e, self.u)

    def max(self, axis=-1):
        return Bd(self.v.max(axis), self.e.max(axis), self.u)

    def relu(self):
        assert np.all((np.abs(self.v) > self.e) | (self.v == 0) & (self.e == 0)), (
            "a ReLU argument lies within its error bound of 0"
        )
        return Bd(np.maximum(self.v, 0), self.e * (self.v > 0), self.u)


def _eta(u):
    """Largest absolute rounding error of a subnormal result (half the subnormal spacing) in
    the format of unit roundoff ``u``: float16, bfloat16, float32, float64."""
    return {2.0**-11: 2.0**-25, 2.0**-8: 2.0**-134, 2.0**-24: 2.0**-150}.get(u, 2.0**-1075)


def _bd(x, u):
    return x if isinstance(x, Bd) else Bd(x, None, u)


def bein(spec, a, b):
    """``einsum(spec, a, b)`` with its bound; ``k`` = the number of terms of each sum."""
    a, b = _bd(a, U if not isinstance(b, Bd) else b.u), _bd(b, a.u if isinstance(a, Bd) else U)
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    k = math.prod(
        dict(zip(sa, a.v.shape, strict=True)).get(c, 1) for c in set(sa) & set(sb) if c not in out
    )
    ab = np.abs
    v = np.einsum(spec, a.v, b.v)
    e = (
        np.einsum(spec, ab(a.v), b.e)
        + np.einsum(spec, a.e, ab(b.v))
        + np.einsum(spec, a.e, b.e)
        + gamma(k, a.u) * np.einsum(spec, ab(a.v), ab(b.v))
    )
    return Bd(v, e, a.u)


def blinear(x, w, b):
    return bein("ij,jk->ik", x, w) + b


# --- the twin: numstab's formulas, with bounds ----------------------------------------------


def twin_softmax(a, kind):
    if kind == "softmax":
        t = (a - a.max()[..., None]).exp()
        return t, t.sum()[..., None], None
    pos = a.v >= 0
    # s(x) = x + 1 (x >= 0), 1 / (1 - x) (x < 0); both branches 1-Lipschitz, s(0) = 1.
    s_neg = Bd(1.0, None, a.u) / (Bd(1.0, None, a.u) - Bd(np.minimum(a.v, 0), a.e, a.u))
    s_pos = a + 1.0
    s = Bd(np.where(pos, s_pos.v, s_neg.v), np.where(pos, s_pos.e, s_neg.e), a.u)
    return s, s.sum()[..., None], s


def twin_layernorm(x, w, b, eps):
    n = x.v.shape[-1]
    xm = x - (x.sum() / float(n)).reshape(-1, 1)
    eps = Bd(eps, x.u * eps, x.u)  # numstab rounds eps to the compute format
    sd = ((xm * xm).sum() / float(n) + eps).sqrt().reshape(-1, 1)
    xhat = xm / sd
    return xhat * w + b, (xhat, sd, w)


def twin_layernorm_backward(dy, cache):
    xhat, sd, w = cache
    n = float(dy.v.shape[-1])
    g = dy * w
    mg = (g.sum() / n).reshape(-1, 1)
    mgx = ((g * xhat).sum() / n).reshape(-1, 1)
    dx = (g - mg - xhat * mgx) / sd
    return dx, (dy * xhat).sum(0), dy.sum(0)


def twin(params, x, cfg, R, masks, u=U):
    """Bounded logits and gradients of the network (numstab's formulas), every operation
    rounded with unit roundoff ``u`` (a uniform policy: storage = compute)."""
    p = {k: Bd(quantize(v, "float64"), None, u) for k, v in params.items()}

    def ln(z, name):
        return twin_layernorm(z, p[name + "_w"], p[name + "_b"], 1e-5)

    def lin(z, name):
        return blinear(z, p[name + "_w"], p[name + "_b"])

    n, t = x.shape
    d, h = cfg.d_model, cfg.heads
    dh = d // h
    post = cfg.norm_placement == "post"
    ones = {"attention": 1.0, "attention_out": 1.0, "feedforward": 1.0, "feedforward_out": 1.0}
    m = {k: (1.0 if masks[k] is None else np.asarray(masks[k], np.float64)) for k in ones}
    emb = Bd(p["embed"].v[x.reshape(-1)], None, u)  # (n t, d), exact
    a_in, ln1 = (emb, None) if post else ln(emb, "ln1")
    qkv = lin(a_in, "attn_in").reshape(n, t, 3, h, dh)
    q, k, v = qkv[:, t - 1, 0], qkv[:, :, 1], qkv[:, :, 2]
    scale = 1.0 / math.sqrt(dh)
    a = bein("nhd,nthd->nht", q, k) * scale
    a = Bd(a.v, a.e + u * np.abs(a.v), u)  # the scale's own rounding
    terms, total, s = twin_softmax(a, cfg.attention)
    probs = terms / total
    pk = probs * m["attention"].reshape(n, h, t) if masks["attention"] is not None else probs
    ctx = bein("nht,nthd->nhd", pk, v).reshape(n, d)
    out = lin(ctx, "attn_out") * m["attention_out"]
    h1 = emb.reshape(n, t, d)[:, t - 1] + out
    if post:
        h1, ln1 = ln(h1, "ln1")
    fin, ln2 = (h1, None) if post else ln(h1, "ln2")
    pre_relu = lin(fin, "ff1")
    act = pre_relu.relu() * m["feedforward"]
    f = lin(act, "ff2") * m["feedforward_out"]
    h2 = h1 + f
    if post:
        h2, ln2 = ln(h2, "ln2")
    z = lin(h2, "unembed")

    # backward
    R = Bd(R, None, u)
    g = {}
    dh2 = bein("ic,jc->ij", R, p["unembed_w"])
    g["unembed_w"], g["unembed_b"] = bein("ni,nc->ic", h2, R), R.sum(0)
    if post:
        dh2, g["ln2_w"], g["ln2_b"] = twin_layernorm_backward(dh2, ln2)
    df = dh2 * m["feedforward_out"]
    dact = bein("nj,ij->ni", df, p["ff2_w"])
    g["ff2_w"], g["ff2_b"] = bein("ni,nj->ij", act, df), df.sum(0)
    dpre = dact * m["feedforward"] * (pre_relu.v > 0)
    dfin = bein("nj,ij->ni", dpre, p["ff1_w"])
    g["ff1_w"], g["ff1_b"] = bein("ni,nj->ij", fin, dpre), dpre.sum(0)
    if not post:
        dfin, g["ln2_w"], g["ln2_b"] = twin_layernorm_backward(dfin, ln2)
    dh1 = dh2 + dfin
    if post:
        dh1, g["ln1_w"], g["ln1_b"] = twin_layernorm_backward(dh1, ln1)
    dout = dh1 * m["attention_out"]
    dctx = bein("nj,ij->ni", dout, p["attn_out_w"])
    g["attn_out_w"], g["attn_out_b"] = bein("ni,nj->ij", ctx, dout), dout.sum(0)
    dctx = dctx.reshape(n, h, dh)
    dpk = bein("nhd,nthd->nht", dctx, v)
    dv = bein("nht,nhd->nthd", pk, dctx)
    dp = dpk * m["attention"].reshape(n, h, t) if masks["attention"] is not None else dpk
    inner = (probs * dp).sum()[..., None]
    ga = probs * (dp - inner)
    if s is not None:
        neg = a.v < 0
        gm, gd = ga * s, ga / s
        ga = Bd(np.where(neg, gm.v, gd.v), np.where(neg, gm.e, gd.e), u)
    da = ga * scale
    da = Bd(da.v, da.e + u * np.abs(da.v), u)
    dq = bein("nht,nthd->nhd", da, k)
    dk = bein("nht,nhd->nthd", da, q)
    dqkv_v = np.zeros((n, t, 3, h, dh))
    dqkv_e = np.zeros((n, t, 3, h, dh))
    for j, part in ((1, dk), (2, dv)):
        dqkv_v[:, :, j], dqkv_e[:, :, j] = part.v, part.e
    dqkv_v[:, t - 1, 0], dqkv_e[:, t - 1, 0] = dq.v, dq.e
    dqkv = Bd(dqkv_v.reshape(n * t, 3 * d), dqkv_e.reshape(n * t, 3 * d), u)
    dx = bein("nj,ij->ni", dqkv, p["attn_in_w"])
    g["attn_in_w"], g["attn_in_b"] = bein("ni,nj->ij", a_in, dqkv), dqkv.sum(0)
    if not post:
        dx, g["ln1_w"], g["ln1_b"] = twin_layernorm_backward(dx, ln1)
    dx = dx.reshape(n, t, d)
    last = dx[:, t - 1] + dh1
    dxv, dxe = dx.v.copy(), dx.e.copy()
    dxv[:, t - 1], dxe[:, t - 1] = last.v, last.e
    onehot = np.eye(cfg.vocab)[x.reshape(-1)]
    g["embed"] = bein("ni,nj->ij", onehot, Bd(dxv.reshape(n * t, d), dxe.reshape(n * t, d), u))
    return z, g


# --- the PyTorch reference ------------------------------------------------------------------

torch_model = torch_modules  # the float64 modules of the reference


def _torch_stablemax(x, dim=-1, **_):
    s = torch.where(x >= 0, x + 1, 1 / (1 - torch.clamp(x, max=0)))
    return s / s.sum(dim, keepdim=True)


def _sa_block_with_weights(self, x, attn_mask, key_padding_mask, is_causal=False):
    # TransformerEncoderLayer._sa_block with need_weights=True: the attention path that calls
    # torch.nn.functional.dropout (and softmax) by name, so that both can be intercepted.
    x = self.self_attn(
        x,
        x,
        x,
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        need_weights=True,
        is_causal=is_causal,
    )[0]
    return self.dropout1(x)


def torch_run(mods, x, cfg, R, masks, monkeypatch):
    """PyTorch logits at the last position and the gradients of ``<R, logits>``.

    ``masks`` (numstab's, last position only) are applied at PyTorch's four dropout calls in
    order; elsewhere (positions that do not reach the output) the mask is 1.
    """
    n, t = x.shape
    layer = mods["layer"]
    layer.train()
    dropped = any(m is not None for m in masks.values())
    if dropped or cfg.attention == "stablemax":
        layer._sa_block = types.MethodType(_sa_block_with_weights, layer)
    if cfg.attention == "stablemax":
        monkeypatch.setattr(torch.nn.functional, "softmax", _torch_stablemax)
    queue = []
    if dropped:
        full = {
            "attention": (n * cfg.heads, t, t),
            "attention_out": (n, t, cfg.d_model),
            "feedforward": (n, t, cfg.d_ff),
            "feedforward_out": (n, t, cfg.d_model),
        }
        for site in SITES:
            m = torch.ones(full[site], dtype=torch.float64)
            m[..., t - 1, :] = torch.tensor(np.asarray(masks[site], np.float64))
            queue.append(m)

        def fake_dropout(inp, p=0.5, training=True, inplace=False):
            m = queue.pop(0)
            assert tuple(inp.shape) == tuple(m.shape)
            return inp * m

        monkeypatch.setattr(torch.nn.functional, "dropout", fake_dropout)
    z = mods["un"](layer(mods["emb"](torch.tensor(x)))[:, -1])
    (z * torch.tensor(R)).sum().backward()
    assert not queue, "PyTorch called dropout fewer times than it has sites"
    return z.detach().numpy(), torch_grads(mods)


def small_case(seed, *, norm="post", attention="softmax", dropout=0.0, t=2, spread=1.0):
    """A small network with dyadic weights near PyTorch's scale, tokens, a cotangent."""
    cfg = TransformerConfig(
        vocab=7,
        n_classes=5,
        d_model=8,
        heads=2,
        d_ff=12,
        dropout=dropout,
        norm_placement=norm,
        attention=attention,
    )
    rng = np.random.default_rng(seed)
    base = init_params(cfg, seed, "float64")
    params = {}
    for name, v in base.items():
        jitter = dyadic(rng, v.shape, scale=0.25 * spread)  # LayerNorm/bias not all 1 and 0
        params[name] = np.round((v + jitter) * 2.0**20) / 2.0**20
    x = rng.integers(0, cfg.vocab, (6, t))
    R = dyadic(rng, (6, cfg.n_classes))
    return cfg, params, x, R


CASES = [
    dict(norm="post"),
    dict(norm="pre"),
    dict(norm="post", dropout=0.3),
    dict(norm="pre", dropout=0.3),
    dict(norm="post", attention="stablemax"),
    dict(norm="pre", attention="stablemax", dropout=0.3),
    dict(norm="post", t=3),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", range(2))
def test_matches_pytorch_in_float64(case, seed, monkeypatch):
    """Logits and every parameter gradient against nn.TransformerEncoderLayer and autograd,
    within 2E (module docstring); with dropout the masks are shared."""
    cfg, params, x, R = small_case(seed, **case)
    key = DropoutKey(seed, 5) if cfg.dropout else None
    z, cache = forward(params, x, cfg, P64, dropout=key)
    grads = backward(R, cache, cfg, P64)
    masks = cache["masks"]
    zt, gt = torch_run(torch_model(params, cfg), x, cfg, R, masks, monkeypatch)
    zb, gb = twin(params, x, cfg, R, masks)
    tol = SLACK * 2 * zb.e
    assert np.all(np.abs(z - zt) <= tol), np.max(np.abs(z - zt) - tol)
    assert list(grads) == param_names(cfg)
    for name in grads:
        tol = SLACK * 2 * gb[name].e
        diff = np.abs(grads[name] - gt[name])
        assert np.all(diff <= tol), (name, float(np.max(diff - tol)))
        # Sharp enough to see a wrong gradient (check_vjp's criterion: 100·√u of its size).
        assert np.max(tol) <= 100 * math.sqrt(U) * np.max(np.abs(gt[name])), name


def test_float32_policy_within_its_bound_of_pytorch(monkeypatch):
    """numstab in float32 (every operation one float32 rounding) against PyTorch in float64:
    within ``E32 + E64`` (the twin at u = 2**-24 and 2**-53), logits and gradients."""
    cfg, params, x, R = small_case(3)
    params = {k: quantize(v, "float32") for k, v in params.items()}
    R = quantize(R, "float32")
    p32 = PrecisionPolicy.uniform("float32")
    z, cache = forward(params, x, cfg, p32)
    grads = backward(R, cache, cfg, p32)
    assert z.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    masks = cache["masks"]
    zt, gt = torch_run(torch_model(params, cfg), x, cfg, R, masks, monkeypatch)
    z32, g32 = twin(params, x, cfg, R, masks, u=2.0**-24)
    z64, g64 = twin(params, x, cfg, R, masks)
    assert np.all(np.abs(z - zt) <= SLACK * (z32.e + z64.e))
    for name in grads:
        diff = np.abs(grads[name].astype(np.float64) - gt[name])
        assert np.all(diff <= SLACK * (g32[name].e + g64[name].e)), name


@pytest.mark.parametrize("attention", ["softmax", "stablemax"])
@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "float32"])
def test_every_elementwise_operation_is_correctly_rounded(fmt, attention):
    """Each operation of the forward and backward outside the matrix products (score scaling,
    the attention normalisation with its exp, dropout, residual sums, LayerNorm in the compute
    format), recorded and judged against the exact operation on its own operands with mpmath
    (``numstab.fidelity.op_fidelity``): all correctly rounded to their declared format. Every
    result is a value of the storage format."""
    cfg, params, x, R = small_case(4, dropout=0.3, attention=attention)
    policy = PrecisionPolicy.uniform(fmt)
    params = {k: quantize(v, fmt) for k, v in params.items()}
    with recording() as ops:
        z, cache = forward(params, x, cfg, policy, dropout=DropoutKey(4, 2))
        grads = backward(quantize(R, fmt), cache, cfg, policy)
    for a in (z, *grads.values()):
        np.testing.assert_array_equal(quantize(a, fmt), a)
    reports = op_fidelity(ops, samples=64)
    assert {"add", "sub", "mul", "div"} <= set(reports)
    assert ("exp" in reports) == (attention == "softmax")
    for name, rep in reports.items():
        assert rep.n > 0 and rep.n_correct == rep.n, (name, rep)
    assert {op.fmt.name for op in ops} == {fmt, policy.compute.name}


# --- finite differences ---------------------------------------------------------------------

FF_TENSORS = ("ff1_w", "ff1_b", "ff2_w", "ff2_b", "unembed_w", "unembed_b")


@pytest.mark.parametrize("seed", range(2))
def test_backward_matches_finite_differences(seed):
    """check_vjp along a direction in the feed-forward and unembedding tensors of a pre-LN
    network: there the logits are a cubic in t (h1 and LN2(h1) do not move), so
    ``F''' = 6·<R, ((relu'·(LN2(h1) V1 + vb1)) V2) Vu>``, bounded with absolute values. The
    ReLU pattern is asserted fixed on [θ - h v, θ + h v]. Forward and backward error bounds:
    the twin's E (module docstring)."""
    cfg, params, x, R = small_case(10 + seed, norm="pre")
    rng = np.random.default_rng(seed)
    v = {
        k: (dyadic(rng, a.shape, scale=2.0**-4) if k in FF_TENSORS else np.zeros_like(a))
        for k, a in params.items()
    }
    h = 2.0**-12  # truncation ~h²·F''' and evaluation ~E/h balance near 1e-8 of the scale
    _, cache = forward(params, x, cfg, P64)
    fin = cache["ff1"][0]  # LN2(h1), which the direction does not move
    pre = fin @ params["ff1_w"] + params["ff1_b"]
    slope = np.abs(fin) @ np.abs(v["ff1_w"]) + np.abs(v["ff1_b"])
    assert np.all(np.abs(pre) > h * slope), "the ReLU pattern changes on the segment"
    masks = cache["masks"]

    def third(v, R):
        a = (np.abs(fin) @ np.abs(v["ff1_w"]) + np.abs(v["ff1_b"])) * (pre > 0)
        return 6 * float(np.sum(np.abs(R) * ((a @ np.abs(v["ff2_w"])) @ np.abs(v["unembed_w"]))))

    check_vjp(
        lambda p: forward(p, x, cfg, P64)[0],
        lambda p, R: backward(R, forward(p, x, cfg, P64)[1], cfg, P64),
        params,
        direction=v,
        cotangent=R,
        h=h,
        f_err=lambda p: twin(p, x, cfg, R, masks)[0].e,
        vjp_err=lambda R: {k: b.e for k, b in twin(params, x, cfg, R, masks)[1].items()},
        third=third,
    )


# --- the attention softmax against the exact reference --------------------------------------


def _attention_case(seed, spread, n=300, kind="softmax"):
    rng = np.random.default_rng(seed)
    d, heads, t = 4, 2, 2
    params = {
        "attn_in_w": quantize(rng.standard_normal((d, 3 * d)) * spread, "float32"),
        "attn_in_b": quantize(rng.standard_normal(3 * d), "float32"),
        "attn_out_w": quantize(rng.standard_normal((d, d)), "float32"),
        "attn_out_b": quantize(rng.standard_normal(d), "float32"),
    }
    x = quantize(rng.standard_normal((n, t, d)) * spread, "float32")
    policy = PrecisionPolicy.uniform("float32")
    _, cache = attention_forward(x, params, heads, kind, policy)
    return cache, policy


def test_attention_rows_against_exact_softmax():
    """Every attention probability against mpmath's softmax of the same float32 scores.

    With ``d = RN(a - m)``, ``e = RN(exp d)`` (correctly rounded), ``S`` a sum of ``T`` terms
    and ``P = RN(e / S)``: ``P_i`` is within ``(|a_i - m| + 1)u + max_j (|a_j - m| + 1)u +
    γ_{T-1} + u`` of the exact ``softmax(a)_i`` relative (first order; ``SLACK``), ``u = 2**-24``,
    as long as nothing is subnormal (asserted)."""
    cache, _ = _attention_case(0, 1.0)  # gaps up to ~50: nothing subnormal
    a = cache.scores.astype(np.float64)
    P = cache.probs.astype(np.float64)
    assert np.all(P >= np.finfo(np.float32).tiny)
    exact = ex.softmax(a)
    u = 2.0**-24
    gap = a.max(axis=1, keepdims=True) - a
    rel = (gap + 1) * u + (gap.max(axis=1, keepdims=True) + 1) * u + gamma(a.shape[1] - 1, u) + u
    ref = np.vectorize(float)(exact)
    assert np.all(np.abs(P - ref) <= SLACK * rel * ref)


def test_attention_collapse_flags_against_exact():
    """A two-key row collapses (``S == 1``) exactly when the other term ``RN(exp RN(a_o - m))``,
    computed here with mpmath and ``exact.round_exact``, is at most ``u = 2**-24`` (``1 + u``
    is a tie that rounds to the even 1). Both outcomes occur in the draw."""
    cache, policy = _attention_case(1, 2.5)
    flags = attention_collapse(cache, policy).reshape(-1)
    a = cache.scores.astype(np.float64)
    other = np.argmin(a, axis=1)
    m = a.max(axis=1)
    want = []
    for i in range(a.shape[0]):
        diff = ex.round_exact(ex.to_exact(a[i, other[i]]) - ex.to_exact(m[i]), "float32")
        e_o = ex.round_exact(mpmath.exp(ex.to_exact(float(diff), prec=200)), "float32")
        want.append(float(e_o) <= 2.0**-24)
    want = np.array(want)
    assert 0 < want.sum() < want.size
    np.testing.assert_array_equal(flags, want)


def _s_exact(t):
    return t + 1 if t >= 0 else 1 / (1 - t)


@pytest.mark.parametrize("kind", ["softmax", "stablemax"])
def test_attention_rows_through_the_audit_api(kind):
    """``audit_attention``: its measured collapse is the model's, and its exact verdict is
    the exact tail at most ``u = 2**-24``: ``exp(a_o - m)`` (softmax) or ``s(a_o) / s(m)``
    (StableMax), computed here with mpmath on the two-key rows."""
    cache, policy = _attention_case(1, 2.5 if kind == "softmax" else 60.0, kind=kind)
    rep = audit_attention(cache, policy)
    np.testing.assert_array_equal(rep.collapsed, attention_collapse(cache, policy).reshape(-1))
    a = cache.scores.astype(np.float64)
    with mpmath.workprec(200):
        tail = [
            (
                _s_exact(mpmath.mpf(row.min())) / _s_exact(mpmath.mpf(row.max()))
                if kind == "stablemax"
                else mpmath.exp(mpmath.mpf(row.min()) - mpmath.mpf(row.max()))
            )
            for row in a
        ]
    want = np.array([t <= mpmath.mpf(2) ** -24 for t in tail])
    assert 0 < want.sum() < want.size
    np.testing.assert_array_equal(rep.collapsed_exact, want)


# --- dropout masks, configuration, initialisation -------------------------------------------


def test_dropout_mask_is_a_pure_function_of_seed_step_site():
    fmt = P64.storage
    a = multiplier(DropoutKey(3, 7), "feedforward", (200, 50), 0.1, fmt)
    multiplier(DropoutKey(3, 6), "feedforward", (200, 50), 0.1, fmt)  # no hidden state
    np.testing.assert_array_equal(
        a, multiplier(DropoutKey(3, 7), "feedforward", (200, 50), 0.1, fmt)
    )
    for other in (DropoutKey(3, 8), DropoutKey(4, 7)):
        assert not np.array_equal(a, multiplier(other, "feedforward", (200, 50), 0.1, fmt))
    assert not np.array_equal(a, multiplier(DropoutKey(3, 7), "attention", (200, 50), 0.1, fmt))
    assert set(np.unique(a)) == {0.0, 1 / 0.9}
    # 10 000 Bernoulli(0.1) draws: the dropped count is within 5 standard deviations (30).
    assert abs(np.count_nonzero(a == 0) - 1000) <= 5 * math.sqrt(10_000 * 0.1 * 0.9)
    f16 = multiplier(
        DropoutKey(3, 7), "feedforward", (4,), 0.1, PrecisionPolicy.uniform("float16").storage
    )
    assert set(np.unique(f16)) <= {0.0, float(np.float16(1 / 0.9))}


def test_dropout_off_in_evaluation_and_at_zero():
    cfg, params, x, _ = small_case(0, dropout=0.3)
    z_eval, c = forward(params, x, cfg, P64)
    assert all(m is None for m in c["masks"].values())
    z_train, c = forward(params, x, cfg, P64, dropout=DropoutKey(0, 1))
    assert all(m is not None for m in c["masks"].values())
    assert not np.array_equal(z_eval, z_train)
    cfg0 = TransformerConfig(**{**cfg.to_dict(), "dropout": 0.0})
    z0, c = forward(params, x, cfg0, P64, dropout=DropoutKey(0, 1))
    np.testing.assert_array_equal(z0, z_eval)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 10, "heads": 4}, "heads must divide d_model"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_placement": "middle"}, "norm_placement"),
        ({"attention": "sparsemax"}, "attention"),
        ({"d_ff": 0}, "d_ff"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**kwargs)


def test_init_matches_pytorch_defaults():
    """Names, shapes, the constant tensors, and the ranges of PyTorch's initialisers."""
    cfg = TransformerConfig()
    p = init_params(cfg, 0, "float32")
    assert list(p) == param_names(cfg)
    mods = torch_model({k: v.astype(np.float64) for k, v in p.items()}, cfg)
    for name, (mod, attr, transposed) in TORCH_NAMES.items():
        shape = tuple(mods[mod].get_parameter(attr).shape)
        assert p[name].shape == (shape[::-1] if transposed else shape), name
        assert p[name].dtype == np.float32
    for name in ("attn_in_b", "attn_out_b", "ln1_b", "ln2_b"):
        assert not p[name].any()
    assert np.all(p["ln1_w"] == 1) and np.all(p["ln2_w"] == 1)
    assert abs(p["embed"].std() - 1) < 0.02  # N(0, 1): 14 464 draws, std error 0.006
    assert np.abs(p["attn_in_w"]).max() <= math.sqrt(6 / (4 * 128))
    assert np.abs(p["ff2_w"]).max() <= 1 / math.sqrt(2048)
    assert np.abs(p["unembed_b"]).max() <= 1 / math.sqrt(128)
