"""The same network in PyTorch: the authors' modules holding numstab's parameters.

``nn.Embedding(V, d)``, ``nn.TransformerEncoderLayer(d, h, d_ff, dropout, batch_first=True,
norm_first=<pre-LN>)`` and ``nn.Linear(d, C)``, read at the last position: the reference of
the gradient tests and the PyTorch side of the transformer benchmark. numstab stores weights
``(n_in, n_out)`` (``x @ W``), PyTorch ``(n_out, n_in)``: the matrices are transposed on the
way. PyTorch is an optional dependency, imported on use.
"""

from __future__ import annotations

import numpy as np

from numstab.transformer.model import TransformerConfig

__all__ = ["TORCH_NAMES", "torch_grads", "torch_modules"]

#: numstab parameter -> (module, PyTorch parameter name, stored transposed).
TORCH_NAMES = {
    "embed": ("emb", "weight", False),
    "attn_in_w": ("layer", "self_attn.in_proj_weight", True),
    "attn_in_b": ("layer", "self_attn.in_proj_bias", False),
    "attn_out_w": ("layer", "self_attn.out_proj.weight", True),
    "attn_out_b": ("layer", "self_attn.out_proj.bias", False),
    "ln1_w": ("layer", "norm1.weight", False),
    "ln1_b": ("layer", "norm1.bias", False),
    "ff1_w": ("layer", "linear1.weight", True),
    "ff1_b": ("layer", "linear1.bias", False),
    "ff2_w": ("layer", "linear2.weight", True),
    "ff2_b": ("layer", "linear2.bias", False),
    "ln2_w": ("layer", "norm2.weight", False),
    "ln2_b": ("layer", "norm2.bias", False),
    "unembed_w": ("un", "weight", True),
    "unembed_b": ("un", "bias", False),
}


def torch_modules(params, config: TransformerConfig, dtype: str = "float64") -> dict:
    """``{"emb", "layer", "un"}``: PyTorch modules in ``dtype`` holding ``params``.

    Parameters
    ----------
    params : dict of name -> array, numstab's layout (:func:`numstab.transformer.init_params`)
    config : TransformerConfig
    dtype : {"float64", "float32"}
        The modules' dtype; ``params`` are converted to it (exactly from float32 storage).

    Returns
    -------
    dict of ``torch.nn.Module``; the logits are ``un(layer(emb(x))[:, -1])``.
    """
    import torch

    tdt = getattr(torch, dtype)
    mods = {
        "emb": torch.nn.Embedding(config.vocab, config.d_model, dtype=tdt),
        "layer": torch.nn.TransformerEncoderLayer(
            config.d_model,
            config.heads,
            config.d_ff,
            dropout=config.dropout,
            batch_first=True,
            norm_first=config.norm_placement == "pre",
            layer_norm_eps=config.layer_norm_eps,
            dtype=tdt,
        ),
        "un": torch.nn.Linear(config.d_model, config.n_classes, dtype=tdt),
    }
    with torch.no_grad():
        for name, (mod, attr, transposed) in TORCH_NAMES.items():
            a = torch.tensor(np.asarray(params[name], dtype=np.dtype(dtype)))
            mods[mod].get_parameter(attr).copy_(a.T if transposed else a)
    return mods


def torch_grads(mods: dict) -> dict:
    """The modules' parameter gradients in numstab's names and layout (NumPy arrays)."""
    out = {}
    for name, (mod, attr, transposed) in TORCH_NAMES.items():
        g = mods[mod].get_parameter(attr).grad.numpy()
        out[name] = g.T if transposed else g
    return out
