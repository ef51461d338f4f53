"""Per-step training metrics: pure functions over logits, labels and parameter dicts.

Everything here is a measurement, computed in float64 from the run's own arrays (which are
exact in float64 for every format but longdouble, whose norms are taken in longdouble), so the
metrics themselves add no rounding that could be mistaken for the phenomenon.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "cosine",
    "logit_gaps",
    "param_cosines",
    "param_norms",
]


def accuracy(logits, labels) -> float:
    """Fraction of rows whose argmax is the label: an integer count divided once.

    Ties count as wrong unless the label is the first maximum (NumPy's ``argmax``).
    A row with NaN logits counts as wrong.

    Parameters
    ----------
    logits : ndarray, shape (N, C); labels : int ndarray, shape (N,)
    """
    n = labels.shape[0]
    if n == 0:
        return float("nan")
    ok = np.argmax(logits, axis=-1) == labels
    ok &= ~np.isnan(logits).any(axis=-1)
    return int(np.count_nonzero(ok)) / n


def logit_gaps(logits, labels):
    """Margin of the correct logit over the best other one, per row (float64).

    ``gap_i = z_{i,y} - max_{k≠y} z_{i,k}``; positive when the row is classified correctly.
    One class gives ``+inf``.
    """
    z = logits.astype(np.float64)
    rows = np.arange(z.shape[0])
    correct = z[rows, labels].copy()
    z[rows, labels] = -np.inf
    with np.errstate(invalid="ignore"):
        return correct - z.max(axis=-1)


def _flat64(a):
    return np.asarray(a).astype(np.longdouble if a.dtype == np.longdouble else np.float64).ravel()


def cosine(a, b) -> float:
    """``⟨a, b⟩ / (‖a‖ ‖b‖)`` in float64 (longdouble for longdouble input); NaN if either is 0."""
    a, b = _flat64(a), _flat64(b)
    na, nb = np.sqrt(a @ a), np.sqrt(b @ b)
    if na == 0 or nb == 0 or not np.isfinite(na * nb):
        return float("nan")
    return float((a @ b) / (na * nb))


def param_norms(params: dict) -> dict:
    """L2 norm of each tensor and of their concatenation (key ``"global"``)."""
    out = {k: float(np.sqrt(_flat64(v) @ _flat64(v))) for k, v in params.items()}
    out["global"] = float(np.sqrt(sum(v * v for v in out.values())))
    return out


def param_cosines(params: dict, other: dict, *, sign: float = 1.0) -> dict:
    """Cosine between ``params`` and ``sign · other``, per tensor and globally.

    With ``other`` the gradient and ``sign = -1`` this is the NLM alignment ``cos(θ, -∇L)``;
    with ``other`` the applied update ``Δθ`` it is ``cos(θ, Δθ)``.
    """
    out = {}
    dot_total = nt = no = 0.0
    for k, v in params.items():
        a, b = _flat64(v), sign * _flat64(other[k])
        d, na2, nb2 = float(a @ b), float(a @ a), float(b @ b)
        out[k] = d / np.sqrt(na2 * nb2) if na2 > 0 and nb2 > 0 else float("nan")
        dot_total += d
        nt += na2
        no += nb2
    out["global"] = dot_total / np.sqrt(nt * no) if nt > 0 and no > 0 else float("nan")
    return out
