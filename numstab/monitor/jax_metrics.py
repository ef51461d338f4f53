"""The monitor's metrics from JAX arrays: a pure function, no state, no files.

jax is imported only when :func:`jax_step_metrics` runs (to flatten the parameter pytrees).
"""

from __future__ import annotations

import numpy as np

from numstab.checks import check_choice, check_eps
from numstab.metrics import DOT_ORDERS
from numstab.monitor.core import batch_metrics, param_metrics, update_metrics
from numstab.precision import REDUCTION_ORDERS, get_format

__all__ = ["jax_step_metrics"]


def _leaves(tree) -> dict:
    """``{path: host array}`` of a pytree's leaves (path as ``jax.tree_util.keystr``)."""
    import jax  # optional dependency

    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def jax_step_metrics(
    params,
    grads,
    logits,
    labels,
    *,
    new_params=None,
    loss_format=None,
    kind="softmax",
    order="pairwise",
    eps=0.0,
    norm_order="lanes8",
) -> dict:
    """The metrics dict of one step (the same keys as :class:`~numstab.monitor.Monitor`'s rows).

    Parameters
    ----------
    params, grads : pytrees of arrays (same structure)
        ``θ_t`` and ``∇L(θ_t)``.
    logits : array, shape (N, C); labels : int array, shape (N,)
    new_params : pytree, optional
        ``θ_{t+1}``: adds ``absorbed_update_fraction`` (an update is taken as due where the
        gradient is non-zero).
    loss_format : optional
        Format of the loss; default the logits' dtype (``jnp.bfloat16`` is ml_dtypes').
    kind, order, eps, norm_order : as in :class:`~numstab.monitor.Monitor`

    Returns
    -------
    dict of metric -> float, or -> {leaf path: float, "global": float}

    Notes
    -----
    XLA on CPU flushes subnormals inside its computations; these metrics are computed by
    NumPy from the arrays JAX produced, so they measure the logits JAX computed, with the
    loss in numstab's IEEE arithmetic.
    """
    check_choice(kind, ("softmax", "stablemax"), "loss")
    check_choice(order, REDUCTION_ORDERS, "order")
    check_eps(eps)
    check_choice(norm_order, DOT_ORDERS, "norm_order")
    z, y = np.asarray(logits), np.asarray(labels)
    if loss_format is None:
        loss_format = z.dtype
    fmt = get_format(loss_format if isinstance(loss_format, str) else np.dtype(loss_format))
    theta, g = _leaves(params), _leaves(grads)
    out = batch_metrics(z, y, fmt, kind=kind, order=order, eps=eps)
    out.update(param_metrics(theta, g, order=norm_order))
    if new_params is not None:
        out.update(update_metrics(theta, _leaves(new_params), {k: v != 0 for k, v in g.items()}))
    return out
