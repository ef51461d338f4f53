"""Softmax Collapse under stochastic rounding: how likely the normaliser is 1, and the bias.

Under stochastic rounding (SR) the computed normaliser ``S = Σ_k e_k`` is a random variable:
every rounding of the loss (``d_k = SR(z_k - m)``, ``e_k = SR(exp d_k)``, each partial sum)
picks the upper neighbour ``hi`` of its carrier (float32) result ``c`` with probability

    P(hi) = (2**32 - ceil(fl64(1 - f)·2**32)) / 2**32,   f = (c - lo) / (hi - lo),

which is ``f`` itself (distance / gap) whenever ``f`` is a multiple of ``2**-32`` (every float32
``c`` from ``2**-9`` quanta up), and the draws of distinct roundings and elements come from
distinct counter-based words (:func:`numstab.rounding_modes.stochastic_words`): independent
Bernoulli variables. The carrier results themselves (float32 ``z_k - m``, float32 of NumPy's
float64 ``exp``, float32 sums) are deterministic functions of their operands.

Exact probability (:func:`collapse_probability`)
------------------------------------------------
For a left-to-right sum the normaliser is a Markov chain: the distribution of the partial sum
after term ``j`` follows from the one before and the (independent) two- to four-point law of
``e_j``. All terms are ``>= 0``, so a partial sum above 1 never comes back to 1 (its lower
neighbour is ``>= 1``, and 1 is on the grid): those states are merged, and the chain stays
small: the partial sums before the largest term, then ``{1, above}``. ``P(S = 1)`` is the
chain's final mass at 1, exact (a rational with a power-of-two denominator). The orders
that add left to right are :data:`exact_orders`: ``sequential`` always; ``pairwise`` for
rows of fewer than 8 classes (NumPy's tree starts with 8 interleaved partial sums), except
float16, whose pairwise sum is float32's rounded once. Other orders (and rows whose chain
exceeds :data:`MAX_STATES` states, StableMax, non-finite rows) get the Monte Carlo estimate.

Monte Carlo (:func:`stochastic_rows`)
-------------------------------------
``samples`` independent SR streams (the rows tiled ``samples`` times, one key per block of
streams and of rows: ``(seed, block, tensor_id("audit_stochastic/<first row>") + n)``): the
fraction ``k / R`` of
streams whose normaliser is 1, with its **Wilson score interval** (:func:`wilson_interval`),
and the sample mean of the loss and of the target-class gradient with their standard errors
``sd / √R``; the bias is the mean minus the exact (mpmath-certified) value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist

import numpy as np

from numstab.functional import collapse_mask, loss_backward, loss_forward
from numstab.precision import Format, get_format
from numstab.rounding_modes import stochastic_scope

__all__ = [
    "MAX_STATES",
    "StochasticAudit",
    "collapse_probability",
    "exact_orders",
    "stochastic_rows",
    "wilson_interval",
]

#: Largest number of partial-sum states the exact chain may hold (beyond: Monte Carlo).
MAX_STATES = 4096
_ONE32 = 1 << 32
_BLOCK_ELEMENTS = 1 << 22  # logits per Monte Carlo block (tiled rows x classes)


def exact_orders(fmt, n_classes: int) -> tuple[str, ...]:
    """The orders whose normaliser :func:`collapse_probability` computes exactly for rows of
    ``n_classes`` in ``fmt``: ``sequential``, and ``pairwise`` below 8 classes (not float16)."""
    fmt = get_format(fmt)
    short = n_classes < 8 and fmt.plain.name != "float16"
    return ("sequential", "pairwise") if short else ("sequential",)


def wilson_interval(hits, n: int, confidence: float = 0.95):
    """Wilson score interval of a binomial proportion ``hits / n`` (arrays broadcast).

    ``p̂ = k/n``, ``z`` the ``(1 + confidence)/2`` normal quantile:
    ``(p̂ + z²/2n ± z √(p̂(1-p̂)/n + z²/4n²)) / (1 + z²/n)``: within [0, 1], the lower end 0
    exactly at ``k = 0`` and the upper end 1 at ``k = n``.
    """
    k = np.asarray(hits, dtype=np.float64)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # k = 0 and k = n give 0 and 1 exactly (the formula's cancellation leaves ~1e-19)
    low = np.where(k == 0, 0.0, np.clip(centre - half, 0.0, 1.0))
    high = np.where(k == n, 1.0, np.clip(centre + half, 0.0, 1.0))
    return low, high


# --- the exact chain ---------------------------------------------------------------------------


class _Inexact(Exception):
    """The exact chain cannot be formed (overflow, non-finite values, too many states)."""


def _sr_outcomes(c: np.ndarray, fmt: Format):
    """Neighbours and up-probabilities of stochastic rounding of carrier values ``c``.

    Returns ``(lo, hi, up)``: float64 arrays (values of ``fmt``, signed like ``c``, flushed
    under FTZ) and int64 numerators of ``P(hi)`` over ``2**32``, as
    :func:`numstab.rounding_modes.round_to_grid` draws them.
    """
    a = np.abs(c)
    if not np.isfinite(a).all():
        raise _Inexact
    _, e = np.frexp(a)
    q = np.ldexp(1.0, np.maximum(e - 1, fmt.emin) - (fmt.precision - 1))
    t = a / q
    fl = np.floor(t)
    f = t - fl
    up = _ONE32 - np.ceil((1.0 - f) * _ONE32).astype(np.int64)
    lo, hi = fl * q, (fl + 1) * q
    if (hi[up > 0] > float(fmt.max)).any() or (lo > float(fmt.max)).any():
        raise _Inexact
    if fmt.subnormals in ("ftz", "ftz_daz"):
        tiny = float(fmt.tiny)
        lo, hi = np.where(lo < tiny, 0.0, lo), np.where(hi < tiny, 0.0, hi)
    return np.copysign(lo, c), np.copysign(hi, c), up


def _daz(v: np.ndarray, fmt: Format) -> np.ndarray:
    if fmt.subnormals in ("daz", "ftz_daz"):
        return np.where(np.abs(v) < float(fmt.tiny), 0.0 * v, v)
    return v


def _laws(values: np.ndarray, weights: list[int], fmt: Format):
    """``{rounded value: weight · P · 2**32}`` of SR of each carrier value (weights ints)."""
    lo, hi, up = _sr_outcomes(values, fmt)
    out: dict[float, int] = {}
    for i, w in enumerate(weights):
        u = int(up[i])
        if u < _ONE32:
            out[float(lo[i])] = out.get(float(lo[i]), 0) + w * (_ONE32 - u)
        if u:
            out[float(hi[i])] = out.get(float(hi[i]), 0) + w * u
    return out


def _term_laws(row: np.ndarray, fmt: Format) -> list[dict[float, int]]:
    """The law of each ``e_k = SR(exp SR(z_k - m))`` (numerators over ``2**64``)."""
    m = np.max(row)
    z32, m32 = _daz(row, fmt).astype(np.float32), _daz(np.asarray(m), fmt).astype(np.float32)
    d = (z32 - m32).astype(np.float64)
    laws = []
    for k in range(row.size):
        dk = _laws(d[k : k + 1], [1], fmt)
        vals = _daz(np.array(list(dk), dtype=np.float64), fmt)
        with np.errstate(under="ignore"):
            w = np.exp(vals).astype(np.float32).astype(np.float64)
        laws.append(_laws(w, list(dk.values()), fmt))
    return laws


def _add_term(state: dict[float, int], law: dict[float, int], fmt: Format):
    """One step ``acc <- SR(acc + e)`` of the chain; states above 1 merge into ``inf``."""
    vals = np.array([v for v in state if v != math.inf], dtype=np.float64)
    out: dict[float, int] = {}
    above = state.get(math.inf, 0) << 96
    if above:
        out[math.inf] = above
    for t, pt in law.items():
        c = (vals.astype(np.float32) + np.float32(t)).astype(np.float64)
        got = _laws(c, [state[v] * pt for v in vals.tolist()], fmt)
        for v, p in got.items():
            key = math.inf if v > 1 else v
            out[key] = out.get(key, 0) + p
    if len(out) > MAX_STATES:
        raise _Inexact
    return out


def collapse_probability(row, fmt, order: str = "sequential") -> Fraction | None:
    """Exact probability that the softmax normaliser of one row is exactly 1 under SR.

    Parameters
    ----------
    row : array_like, shape (C,)
        Logits already in ``fmt`` (values of the format, finite).
    fmt : str or Format
        A format in stochastic rounding (``float16@stochastic``, ``e3m2@sr@ftz``).
    order : str
        One of :func:`exact_orders`; any other gives None.

    Returns
    -------
    Fraction or None
        ``P(S = 1)`` over the SR draws (module docstring: the chain); None where the order,
        a non-finite logit, overflow or more than :data:`MAX_STATES` states leave it to the
        Monte Carlo estimate.
    """
    fmt = get_format(fmt)
    row = np.asarray(row, dtype=np.float64).reshape(-1)
    if fmt.rounding != "stochastic" or order not in exact_orders(fmt, row.size):
        return None
    if row.size == 0 or not np.isfinite(row).all():
        return None
    try:
        laws = _term_laws(row, fmt)
        if order == "sequential":  # acc = e_0, then SR(acc + e_j)
            state, denom, rest = dict(laws[0]), 64, laws[1:]
            state = {(math.inf if v > 1 else v): p for v, p in state.items()}
        else:  # NumPy's short pairwise leaf: from -0.0, every term added
            state, denom, rest = {-0.0: 1}, 0, laws
        for law in rest:
            state = _add_term(state, law, fmt)
            denom += 96
    except _Inexact:
        return None
    return Fraction(state.get(1.0, 0), 1 << denom)


# --- Monte Carlo and the per-row record -----------------------------------------------------


@dataclass(frozen=True)
class StochasticAudit:
    """Per-row figures of the loss under stochastic rounding (arrays of the rows' shape).

    Attributes
    ----------
    collapse_probability : float64
        ``P(S = 1)``: exact where ``collapse_exact``, else the Monte Carlo fraction.
    collapse_low, collapse_high : float64
        Its confidence interval (Wilson score, ``confidence``); the value itself where exact.
    collapse_exact : bool
        The probability is exact (the chain of :func:`collapse_probability`).
    collapse_hits : int64
        Streams (of ``samples``) whose normaliser was exactly 1.
    loss_mean, loss_se, loss_bias : float64
        Mean loss over the streams, its standard error, and mean minus the exact loss.
    target_grad_mean, target_grad_se, target_grad_bias : float64
        The same for the target-class logit gradient.

    Other attributes: ``samples``, ``seed``, ``confidence``, ``interval`` (``"wilson"``).
    """

    collapse_probability: np.ndarray
    collapse_low: np.ndarray
    collapse_high: np.ndarray
    collapse_exact: np.ndarray
    collapse_hits: np.ndarray
    loss_mean: np.ndarray
    loss_se: np.ndarray
    loss_bias: np.ndarray
    target_grad_mean: np.ndarray
    target_grad_se: np.ndarray
    target_grad_bias: np.ndarray
    samples: int
    seed: int
    confidence: float
    interval: str = "wilson"

    def summary(self) -> dict:
        """Means over rows (JSON-ready): the expected SC fraction, the biases and their
        standard errors (rows use independent streams: ``√Σ se² / n``)."""
        n = int(self.loss_mean.size)

        def mean_se(mean, se):
            ok = np.isfinite(mean) & np.isfinite(se)
            k = int(ok.sum())
            if not k:
                return None, None
            return float(mean[ok].mean()), float(np.sqrt((se[ok] ** 2).sum()) / k)

        lb, lse = mean_se(self.loss_bias, self.loss_se)
        gb, gse = mean_se(self.target_grad_bias, self.target_grad_se)
        return {
            "sr_samples": self.samples,
            "sr_interval": self.interval,
            "sr_confidence": self.confidence,
            "sr_collapse_probability_mean": float(self.collapse_probability.mean()) if n else None,
            "sr_collapse_exact_rows": int(np.count_nonzero(self.collapse_exact)),
            "sr_loss_bias_mean": lb,
            "sr_loss_bias_se": lse,
            "sr_target_grad_bias_mean": gb,
            "sr_target_grad_bias_se": gse,
        }


def _streams(zq, y, kind, fmt, order, eps, samples, seed, first_row):
    """``(samples, N)`` arrays of collapse flags, losses and target gradients of independent
    SR streams (keys: seed, block of streams, and the phase ``audit_stochastic/<first_row>``,
    so that the rows of every block of an audit draw their own words)."""
    n, c = zq.shape
    per = max(1, min(samples, _BLOCK_ELEMENTS // max(1, n * c)))
    flags, losses, grads = [], [], []
    for block, start in enumerate(range(0, samples, per)):
        r = min(per, samples - start)
        zr, yr = np.tile(zq, (r, 1)), np.tile(y, r)
        with stochastic_scope(seed, block, f"audit_stochastic/{first_row}"):
            loss, cache = loss_forward(zr, yr, kind=kind, fmt=fmt, order=order, eps=eps)
            g = loss_backward(cache, 1.0)
            hit = (cache.normaliser == 1) if kind == "softmax" else collapse_mask(
                zr, fmt, kind=kind, order=order, eps=eps
            )  # StableMax: its own normaliser, summed once more (another draw)
        flags.append(np.asarray(hit).reshape(r, n))
        losses.append(loss.astype(np.float64).reshape(r, n))
        grads.append(g[np.arange(r * n), yr].astype(np.float64).reshape(r, n))
    return np.concatenate(flags), np.concatenate(losses), np.concatenate(grads)


def stochastic_rows(zq, y, kind, fmt, order, eps, loss_exact, grad_exact, *, samples: int,
                    seed: int, confidence: float, first_row: int = 0) -> dict:
    """The per-row arrays of :class:`StochasticAudit` for checked 2-D logits ``zq`` (values
    of ``fmt``) and labels ``y``; ``loss_exact``/``grad_exact`` the exact values per row;
    ``first_row`` the index of ``zq[0]`` in the audit (its streams' key)."""
    flags, losses, grads = _streams(zq, y, kind, fmt, order, eps, samples, seed, first_row)
    hits = flags.sum(axis=0).astype(np.int64)
    prob = hits / samples
    low, high = wilson_interval(hits, samples, confidence)
    exact_rows = np.zeros(zq.shape[0], dtype=bool)
    if kind == "softmax":
        for i, row in enumerate(zq):
            p = collapse_probability(row, fmt, order)
            if p is not None:
                exact_rows[i] = True
                prob[i] = low[i] = high[i] = float(p)
    se = np.sqrt(1.0 / samples) if samples > 1 else math.nan
    with np.errstate(invalid="ignore"):
        lm, gm = losses.mean(axis=0), grads.mean(axis=0)
        lse = losses.std(axis=0, ddof=1) * se if samples > 1 else np.full_like(lm, math.nan)
        gse = grads.std(axis=0, ddof=1) * se if samples > 1 else np.full_like(gm, math.nan)
    return {
        "collapse_probability": prob,
        "collapse_low": low,
        "collapse_high": high,
        "collapse_exact": exact_rows,
        "collapse_hits": hits,
        "loss_mean": lm,
        "loss_se": lse,
        "loss_bias": lm - np.asarray(loss_exact, dtype=np.float64),
        "target_grad_mean": gm,
        "target_grad_se": gse,
        "target_grad_bias": gm - np.asarray(grad_exact, dtype=np.float64),
    }
