"""Mean squared error on one-hot targets, as ``torch.nn.functional.mse_loss(z, onehot(y))``.

Forward, every step one rounding ``RN`` to the loss format (``C`` classes)::

    d_k = z_k (k ≠ y),  d_y = RN(z_y - 1)    q = RN(d·d)    S = Σ_k q (ordered)    loss = RN(S / C)

so the mean of the per-sample losses is PyTorch's mean over all ``N·C`` entries (exactly, in
exact arithmetic). Backward, with ``dl`` the upstream per-sample gradient (``RN(1/N)`` for the
mean)::

    c = RN(2·dl / C)    g_k = RN(d_k · c)

(``2·dl`` is exact; ``c`` is exact when ``C`` is a power of two). There is no normaliser:
the cache's ``normaliser`` is ``S``, its ``probs`` the residuals ``d``, and Softmax Collapse
is measured on the softmax of the logits (:func:`collapse_terms`), the diagnostic the paper's
Fig. 13 compares.
"""

from __future__ import annotations

from numstab.backend import put_at, take_at
from numstab.losses import softmax

__all__ = ["backward", "collapse_terms", "forward"]


def forward(z, labels, r, eps):
    """``(loss (N,), S (N,), d (N, C), state ())``; ``eps`` is not used."""
    xp = r.xp
    d = put_at(xp.asarray(z, copy=True), labels, r.sub(take_at(z, labels), 1.0))
    total = r.sum(r.mul(d, d))
    loss = r.div(total, float(z.shape[1]))
    return loss, total, d, ()


def backward(cache, dl, r):
    """Logit gradient ``(N, C)`` from the cache and ``dl`` of shape (N, 1)."""
    c = r.div(2.0 * dl, float(cache.probs.shape[1]))
    return r.mul(cache.probs, c)


def collapse_terms(z, r, eps):
    """The softmax terms of the logits (MSE has no normaliser of its own)."""
    return softmax.terms(z, r)[1]
