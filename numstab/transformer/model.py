"""The one-layer transformer of the paper's Fig. 6a: configuration, initialisation, forward,
backward.

``nn.Embedding(V, d)``, one ``nn.TransformerEncoderLayer(d, h, d_ff, dropout)`` (ReLU,
post-LayerNorm by default, pre-LayerNorm as ``norm_first=True``), no positional encoding, and
``nn.Linear(d, C)`` read at the last position. Only the last position reaches the output in
one layer, so after the keys and values the layer is evaluated there alone (the same values
PyTorch computes at that position). Post-LN::

    x = E[tokens]                      (N, T, d)
    h1 = LN1(RN(x_T + drop1(attn(x))))
    h2 = LN2(RN(h1 + drop2(drop(relu(h1 W1 + b1)) W2 + b2)))
    logits = h2 W_u + b_u

Pre-LN: ``h1 = RN(x_T + drop1(attn(LN1(x))))``, ``h2 = RN(h1 + drop2(FF(LN2(h1))))``.
Parameters and activations are in ``policy.storage``, matrix products accumulated in
``policy.compute`` and rounded once (:mod:`numstab.functional`), elementwise operations one
rounding each; the attention normalisation in the storage format and ``policy.order``
(:mod:`~numstab.transformer.attention`), LayerNorm statistics in the compute format
(:mod:`~numstab.transformer.layernorm`). Weights are stored ``(n_in, n_out)`` (``x @ W``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from numstab.backend import namespace
from numstab.functional import (
    GatherPlan,
    gather_backward,
    gather_forward,
    linear_forward,
    relu_backward,
    relu_forward,
)
from numstab.losses.rounding import Rounding
from numstab.precision import PrecisionPolicy, get_format, quantize
from numstab.transformer.attention import (
    ATTENTION_KINDS,
    attention_backward,
    attention_forward,
)
from numstab.transformer.colsum import linear_backward
from numstab.transformer.dropout import DropoutKey, multiplier
from numstab.transformer.dropout import apply as apply_dropout
from numstab.transformer.layernorm import layernorm_backward, layernorm_forward

__all__ = [
    "NORM_PLACEMENTS",
    "TransformerConfig",
    "backward",
    "forward",
    "gather_plan",
    "init_params",
    "param_names",
]

#: Where LayerNorm sits: after each residual sum (PyTorch's default) or before each block.
NORM_PLACEMENTS = ("post", "pre")


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of the network (defaults: the authors' Fig. 6a model for p = 113).

    Attributes
    ----------
    vocab : int
        Token count of the embedding (``p``).
    n_classes : int
        Output width (``p``).
    d_model, heads, d_ff : int
        Width, attention heads (dividing ``d_model``), feed-forward width.
    dropout : float in [0, 1)
        Dropout probability at every site while training (0: none).
    norm_placement : {"post", "pre"}
    attention : {"softmax", "stablemax"}
    layer_norm_eps : float
        The ``eps`` of both LayerNorms (PyTorch: 1e-5).
    """

    vocab: int = 113
    n_classes: int = 113
    d_model: int = 128
    heads: int = 4
    d_ff: int = 2048
    dropout: float = 0.1
    norm_placement: str = "post"
    attention: str = "softmax"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab", "n_classes", "d_model", "heads", "d_ff"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.d_model % self.heads:
            raise ValueError(
                f"heads must divide d_model, got d_model={self.d_model}, heads={self.heads}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(
                f"norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}"
            )
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if not (math.isfinite(self.layer_norm_eps) and self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps must be finite and > 0, got {self.layer_norm_eps!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def param_names(config: TransformerConfig) -> list[str]:
    """The parameter tensors, in initialisation order."""
    del config  # one architecture: the names do not depend on the sizes
    return [
        "embed",
        "attn_in_w",
        "attn_in_b",
        "attn_out_w",
        "attn_out_b",
        "ln1_w",
        "ln1_b",
        "ff1_w",
        "ff1_b",
        "ff2_w",
        "ff2_b",
        "ln2_w",
        "ln2_b",
        "unembed_w",
        "unembed_b",
    ]


def _shapes(c: TransformerConfig) -> dict:
    d, f = c.d_model, c.d_ff
    return {
        "embed": (c.vocab, d),
        "attn_in_w": (d, 3 * d),
        "attn_in_b": (3 * d,),
        "attn_out_w": (d, d),
        "attn_out_b": (d,),
        "ln1_w": (d,),
        "ln1_b": (d,),
        "ff1_w": (d, f),
        "ff1_b": (f,),
        "ff2_w": (f, d),
        "ff2_b": (d,),
        "ln2_w": (d,),
        "ln2_b": (d,),
        "unembed_w": (d, c.n_classes),
        "unembed_b": (c.n_classes,),
    }


def init_params(config: TransformerConfig, seed, fmt="float32", *, xp=None) -> dict:
    """PyTorch's default initialisation of the modules, rounded to ``fmt``.

    Drawn in float64 from ``np.random.default_rng(seed)`` in :func:`param_names` order:
    ``embed ~ N(0, 1)``; ``attn_in_w`` Xavier-uniform ``U(±√(6 / 4d))``; ``attn_out_w``,
    ``ff1_w``, ``ff1_b``, ``ff2_w``, ``ff2_b``, ``unembed_w``, ``unembed_b``
    ``U(±1/√fan_in)`` (``nn.Linear``); the attention biases 0; LayerNorm weights 1, biases 0.
    The distributions are PyTorch's; the random stream is not. ``xp`` as in
    :func:`numstab.mlp.init_params`.
    """
    fmt = get_format(fmt)
    move = (lambda a: a) if xp is None or xp is np else xp.asarray
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    d = config.d_model
    params = {}
    for name, shape in _shapes(config).items():
        if name == "embed":
            a = rng.standard_normal(shape)
        elif name == "attn_in_w":
            bound = math.sqrt(6.0 / (d + 3 * d))
            a = rng.uniform(-bound, bound, shape)
        elif name in ("attn_in_b", "attn_out_b", "ln1_b", "ln2_b"):
            a = np.zeros(shape)
        elif name in ("ln1_w", "ln2_w"):
            a = np.ones(shape)
        else:
            fan_in = config.d_ff if name.startswith("ff2") else d
            bound = 1.0 / math.sqrt(fan_in)
            a = rng.uniform(-bound, bound, shape)
        params[name] = quantize(move(a), fmt)
    return params


def gather_plan(x, config: TransformerConfig, *, like=None) -> GatherPlan:
    """The segment-sum plan of the embedding's backward for tokens ``x`` (N, T)."""
    x = np.asarray(x)
    return GatherPlan.build(x.reshape(-1, 1), config.vocab, like=like)


def _masks(config: TransformerConfig, key: DropoutKey | None, n: int, t: int, policy, xp):
    """Site -> dropout multiplier of this forward pass (None everywhere without dropout)."""
    shapes = {
        "attention": (n * config.heads, t),
        "attention_out": (n, config.d_model),
        "feedforward": (n, config.d_ff),
        "feedforward_out": (n, config.d_model),
    }
    if key is None or config.dropout == 0:
        return dict.fromkeys(shapes)
    return {
        site: multiplier(key, site, shape, config.dropout, policy.storage, xp)
        for site, shape in shapes.items()
    }


def forward(params, x, config: TransformerConfig, policy: PrecisionPolicy, *, dropout=None):
    """Logits at the last position.

    Parameters
    ----------
    params : dict of name -> array (storage carrier dtype)
    x : int array (N, T), tokens in ``[0, vocab)``
    config : TransformerConfig
    policy : PrecisionPolicy
    dropout : DropoutKey, optional
        Draw the training masks of this seed and step (:mod:`numstab.transformer.dropout`);
        None: evaluation (no dropout).

    Returns
    -------
    logits : array (N, n_classes), storage carrier dtype
    cache : dict, for :func:`backward`
    """
    emb = params["embed"]
    xp = namespace(emb)
    x = xp.asarray(x)
    n, t = x.shape
    d = config.d_model
    r = Rounding(policy.storage, policy.order, policy.elementary, xp)
    masks = _masks(config, dropout, n, t, policy, xp)
    e, emb_cache = gather_forward(xp.reshape(x, (n * t, 1)), emb, None, policy)
    cache = {"masks": masks, "emb": emb_cache, "t": t}
    post = config.norm_placement == "post"
    a_in = e
    if not post:
        a_in, cache["ln1"] = layernorm_forward(
            e, params["ln1_w"], params["ln1_b"], config.layer_norm_eps, policy
        )
    a, cache["attn"] = attention_forward(
        xp.reshape(a_in, (n, t, d)),
        params,
        config.heads,
        config.attention,
        policy,
        masks["attention"],
    )
    h1 = r.add(xp.reshape(e, (n, t, d))[:, t - 1], apply_dropout(a, masks["attention_out"], r))
    if post:
        h1, cache["ln1"] = layernorm_forward(
            h1, params["ln1_w"], params["ln1_b"], config.layer_norm_eps, policy
        )
    f_in = h1
    if not post:
        f_in, cache["ln2"] = layernorm_forward(
            h1, params["ln2_w"], params["ln2_b"], config.layer_norm_eps, policy
        )
    u, cache["ff1"] = linear_forward(f_in, params["ff1_w"], params["ff1_b"], policy)
    u, cache["relu"] = relu_forward(u)
    f, cache["ff2"] = linear_forward(
        apply_dropout(u, masks["feedforward"], r), params["ff2_w"], params["ff2_b"], policy
    )
    h2 = r.add(h1, apply_dropout(f, masks["feedforward_out"], r))
    if post:
        h2, cache["ln2"] = layernorm_forward(
            h2, params["ln2_w"], params["ln2_b"], config.layer_norm_eps, policy
        )
    logits, cache["unembed"] = linear_forward(h2, params["unembed_w"], params["unembed_b"], policy)
    return logits, cache


def backward(dlogits, cache, config: TransformerConfig, policy: PrecisionPolicy, plan=None):
    """Parameter gradients given the logit gradient.

    Parameters
    ----------
    dlogits : array (N, n_classes)
        Rounded to the storage format first (as for the MLP).
    cache : from :func:`forward`
    plan : GatherPlan, optional
        :func:`gather_plan` of the tokens (built here when None).

    Returns
    -------
    dict of name -> array, in :func:`param_names` order. Where two paths meet (the residual
    sums) their gradients are added with one rounding.
    """
    xp = namespace(dlogits)
    r = Rounding(policy.storage, policy.order, policy.elementary, xp)
    masks, t = cache["masks"], cache["t"]
    post = config.norm_placement == "post"
    grads = {}
    g = quantize(dlogits, policy.storage)
    g, grads["unembed_w"], grads["unembed_b"] = linear_backward(g, cache["unembed"], policy)
    if post:
        g, grads["ln2_w"], grads["ln2_b"] = layernorm_backward(g, cache["ln2"], policy)
    df = apply_dropout(g, masks["feedforward_out"], r)
    du, grads["ff2_w"], grads["ff2_b"] = linear_backward(df, cache["ff2"], policy)
    du = relu_backward(apply_dropout(du, masks["feedforward"], r), cache["relu"])
    dh, grads["ff1_w"], grads["ff1_b"] = linear_backward(du, cache["ff1"], policy)
    if not post:
        dh, grads["ln2_w"], grads["ln2_b"] = layernorm_backward(dh, cache["ln2"], policy)
    g = r.add(g, dh)  # the residual path and the feed-forward path
    if post:
        g, grads["ln1_w"], grads["ln1_b"] = layernorm_backward(g, cache["ln1"], policy)
    da = apply_dropout(g, masks["attention_out"], r)
    de, attn_grads = attention_backward(da, cache["attn"], policy)
    grads.update(attn_grads)
    n, _, d = de.shape
    de = xp.reshape(de, (n * t, d))
    if not post:
        de, grads["ln1_w"], grads["ln1_b"] = layernorm_backward(de, cache["ln1"], policy)
    de = xp.reshape(de, (n, t, d))
    de[:, t - 1] = r.add(de[:, t - 1], g)  # the residual path from the last position
    idx = cache["emb"][0]
    if plan is None:
        plan = GatherPlan.build(idx, config.vocab, like=de)
    grads["embed"], _ = gather_backward(xp.reshape(de, (n * t, d)), cache["emb"], plan, policy)
    return {k: grads[k] for k in param_names(config)}
