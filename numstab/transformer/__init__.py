"""A hand-written one-layer transformer (the paper's Fig. 6a), forward and backward.

One concept per module: :mod:`~numstab.transformer.dropout` (seeded, resumable masks),
:mod:`~numstab.transformer.layernorm`, :mod:`~numstab.transformer.attention` (multi-head
self-attention with softmax or StableMax over the keys) and
:mod:`~numstab.transformer.model` (the network: the same four functions as
:mod:`numstab.mlp`). docs/transformer.md describes the model, its options and its checks.
"""

from __future__ import annotations

from numstab.transformer.attention import ATTENTION_KINDS, attention_collapse, audit_attention
from numstab.transformer.dropout import DropoutKey
from numstab.transformer.model import (
    NORM_PLACEMENTS,
    TransformerConfig,
    backward,
    forward,
    gather_plan,
    init_params,
    param_names,
)

__all__ = [
    "ATTENTION_KINDS",
    "NORM_PLACEMENTS",
    "DropoutKey",
    "TransformerConfig",
    "attention_collapse",
    "audit_attention",
    "backward",
    "forward",
    "gather_plan",
    "init_params",
    "param_names",
]
