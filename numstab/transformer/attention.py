"""Multi-head self-attention read at the last position, forward and backward.

PyTorch's ``nn.MultiheadAttention`` (``in_proj`` of width ``3d``, heads of width
``dh = d / h``, ``out_proj``), evaluated for the query of the last position only: in a
one-layer model nothing else reaches the output. With ``x`` (N, T, d) and every matrix
product accumulated in the compute format and rounded once to storage (``RN``)::

    [q | k | v] = x W_in + b_in                      (all positions; q used at the last)
    a = RN(RN(q · kᵀ) · RN(1/√dh))                    scores of each head, (N·h, T)
    P = softmax(a) or StableMax(a) over the keys     (the policy's storage format and order)
    c = RN(dropout(P) · v)                          (heads concatenated, head-major)
    out = c W_out + b_out                            (N, d)

Softmax: ``e = RN(exp RN(a - max a))``, ``S = Σ e`` (ordered), ``P = RN(e / S)``; the row has
collapsed when ``S == 1`` exactly. StableMax: ``S = Σ s(a)`` (ordered), ``P = RN(s / S)``.
Backward of both: ``ι = Σ RN(P · dP)`` (ordered), ``g = RN(P · RN(dP - ι))``; StableMax then
``RN(g · s)`` (``a < 0``) or ``RN(g / s)`` (``a >= 0``), as its loss does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from numstab.audit import CrossEntropyAudit, audit_cross_entropy
from numstab.backend import errstate, namespace, to_numpy, xp_dtype
from numstab.functional import linear_forward
from numstab.losses import collapse_mask, softmax, stablemax
from numstab.losses.rounding import Rounding
from numstab.precision import PrecisionPolicy, quantize
from numstab.transformer.colsum import linear_backward
from numstab.transformer.dropout import apply as apply_dropout

__all__ = [
    "ATTENTION_KINDS",
    "AttentionCache",
    "attention_backward",
    "attention_collapse",
    "attention_forward",
    "audit_attention",
]

#: Normalisations of the attention scores.
ATTENTION_KINDS = ("softmax", "stablemax")


@dataclass(frozen=True)
class AttentionCache:
    """What the backward and the collapse metric need from :func:`attention_forward`."""

    kind: str
    heads: int
    scale: float
    q: object  # (N, h, 1, dh)
    k: object  # (N, h, T, dh)
    v: object  # (N, h, T, dh)
    scores: object  # (N·h, T)
    probs: object  # (N·h, T), before dropout
    normaliser: object  # (N·h,)
    state: tuple  # StableMax: (s(a),)
    mask: object  # (N·h, T) dropout multiplier or None
    in_cache: tuple
    out_cache: tuple


def _bmm(a, b, policy: PrecisionPolicy):
    """Batched ``a @ b`` accumulated in the compute format, rounded once to storage."""
    xp = namespace(a, b)
    c = xp_dtype(xp, policy.compute.carrier)
    with errstate(xp, over="ignore", invalid="ignore"):
        return quantize(xp.astype(a, c, copy=False) @ xp.astype(b, c, copy=False), policy.storage)


def _storage(policy: PrecisionPolicy, xp) -> Rounding:
    return Rounding(policy.storage, policy.order, policy.elementary, xp)


def attention_forward(x, params, heads: int, kind: str, policy: PrecisionPolicy, mask=None):
    """Self-attention output at the last position.

    Parameters
    ----------
    x : array (N, T, d), storage carrier dtype
    params : dict with ``attn_in_w`` (d, 3d), ``attn_in_b`` (3d,), ``attn_out_w`` (d, d),
        ``attn_out_b`` (d,)
    heads : int, dividing d
    kind : {"softmax", "stablemax"}
    mask : array (N·h, T) or None
        Dropout multiplier of the attention weights
        (:func:`numstab.transformer.dropout.multiplier`).

    Returns
    -------
    out : array (N, d), storage carrier dtype
    cache : AttentionCache
    """
    xp = namespace(x)
    n, t, d = x.shape
    dh = d // heads
    r = _storage(policy, xp)
    qkv, in_cache = linear_forward(
        xp.reshape(x, (n * t, d)), params["attn_in_w"], params["attn_in_b"], policy
    )
    qkv = xp.reshape(qkv, (n, t, 3, heads, dh))
    q = qkv[:, t - 1, 0][:, :, None, :]
    k = xp.permute_dims(qkv[:, :, 1], (0, 2, 1, 3))
    v = xp.permute_dims(qkv[:, :, 2], (0, 2, 1, 3))
    scale = float(quantize(np.asarray(1.0 / math.sqrt(dh)), policy.storage))
    with errstate(xp, over="ignore", invalid="ignore", divide="ignore"):
        scores = r.mul(xp.reshape(_bmm(q, xp.matrix_transpose(k), policy), (n * heads, t)), scale)
        if kind == "softmax":
            terms = softmax.terms(scores, r)[1]
            state = ()
        else:
            terms = stablemax.s(scores, r)[0]
            state = (terms,)
        total = r.sum(terms)
        probs = r.div(terms, total[:, None])
        kept = apply_dropout(probs, mask, r)
    ctx = _bmm(xp.reshape(kept, (n, heads, 1, t)), v, policy)
    out, out_cache = linear_forward(
        xp.reshape(ctx, (n, d)), params["attn_out_w"], params["attn_out_b"], policy
    )
    cache = AttentionCache(
        kind, heads, scale, q, k, v, scores, probs, total, state, mask, in_cache, out_cache
    )
    return out, cache


def attention_backward(dout, cache: AttentionCache, policy: PrecisionPolicy):
    """Gradients of :func:`attention_forward`.

    Returns
    -------
    dx : array (N, T, d), storage carrier dtype
    grads : dict with the four parameter gradients
    """
    xp = namespace(dout)
    r = _storage(policy, xp)
    q, k, v = cache.q, cache.k, cache.v
    n, h, t, dh = v.shape
    dctx, dw_out, db_out = linear_backward(dout, cache.out_cache, policy)
    dctx = xp.reshape(dctx, (n, h, 1, dh))
    kept = apply_dropout(cache.probs, cache.mask, r)
    dv = _bmm(xp.matrix_transpose(xp.reshape(kept, (n, h, 1, t))), dctx, policy)
    with errstate(xp, over="ignore", invalid="ignore", divide="ignore"):
        dp = apply_dropout(
            xp.reshape(_bmm(dctx, xp.matrix_transpose(v), policy), (n * h, t)), cache.mask, r
        )
        p = cache.probs
        inner = r.sum(r.mul(p, dp))
        g = r.mul(p, r.sub(dp, inner[:, None]))
        if cache.kind == "stablemax":
            (s,) = cache.state
            g = xp.where(cache.scores < 0, r.mul(g, s), r.div(g, s))
        da = xp.reshape(r.mul(g, cache.scale), (n, h, 1, t))
    dq = _bmm(da, k, policy)  # (N, h, 1, dh)
    dk = _bmm(xp.matrix_transpose(da), q, policy)  # (N, h, T, dh)
    dqkv = xp.zeros((n, t, 3, h, dh), dtype=dq.dtype)
    dqkv[:, t - 1, 0] = dq[:, :, 0]
    dqkv[:, :, 1] = xp.permute_dims(dk, (0, 2, 1, 3))
    dqkv[:, :, 2] = xp.permute_dims(dv, (0, 2, 1, 3))
    dx, dw_in, db_in = linear_backward(
        xp.reshape(dqkv, (n * t, 3 * h * dh)), cache.in_cache, policy
    )
    grads = {"attn_in_w": dw_in, "attn_in_b": db_in, "attn_out_w": dw_out, "attn_out_b": db_out}
    return xp.reshape(dx, (n, t, h * dh)), grads


def attention_collapse(cache: AttentionCache, policy: PrecisionPolicy):
    """Rows of the attention normalisation that have collapsed, per head: (N, h) bool.

    Softmax: the forward's normaliser ``Σ exp(a - max a) == 1`` exactly (every other key
    absorbed). StableMax: ``Σ s(a_k) / max s == 1`` (:func:`numstab.losses.collapse_mask`).
    """
    xp = namespace(cache.scores)
    if cache.kind == "softmax":
        flags = cache.normaliser == 1
    else:
        flags = collapse_mask(
            cache.scores,
            policy.storage,
            kind="stablemax",
            order=policy.order,
            elementary=policy.elementary,
        )
    return xp.reshape(flags, (-1, cache.heads))


def audit_attention(cache: AttentionCache, policy: PrecisionPolicy) -> CrossEntropyAudit:
    """Exact audit of the attention rows (:func:`numstab.audit.audit_cross_entropy`).

    Each row of scores (N·h rows, head-minor) is audited as a cross-entropy row whose label is
    its attended key (the row's first maximum), in the storage format and ``policy.order``:
    ``collapsed`` is the measured collapse (:func:`attention_collapse`), ``collapsed_exact``
    the exact verdict (the exact tail ``Σ_{k≠k*} e^{a_k - max}``, or its StableMax analogue, at
    most the unit roundoff). The audit's ``elementary`` functions are correctly rounded, as
    the default policy's are.
    """
    scores = to_numpy(cache.scores)
    return audit_cross_entropy(
        scores,
        np.argmax(scores, axis=1),
        dtype=policy.storage.name,
        kind=cache.kind,
        order=policy.order,
    )
