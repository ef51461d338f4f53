"""Dropout with a counter-based mask: a pure function of (seed, step, site, element).

The mask of one dropout site at one training step is drawn from its own stream,
``default_rng(SeedSequence(seed, spawn_key=(1, step, site)))`` (the run's seed; ``site`` the
index of the site in :data:`SITES`), as ``u = rng.random(shape)`` in C order: element ``i``
(the flat index in the site's array) is dropped when ``u[i] < p``. No state is carried from
step to step, so a resumed run draws the same masks as an uninterrupted one. (The data
stream of :mod:`numstab.data` is ``spawn_key=(0,)``: the streams never meet.)

A kept element is multiplied by ``RN(1 / (1 - p))`` (the float64 quotient rounded to the
storage format), a dropped one by 0, as PyTorch's dropout does
(``x * (bernoulli(1 - p) / (1 - p))``): one rounding per element. The backward multiplies the
gradient by the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from numstab.precision import Format, quantize

__all__ = ["SITES", "DropoutKey", "apply", "multiplier"]

#: Dropout sites of the encoder layer, in PyTorch's order: the attention weights
#: (``self_attn.dropout``), the attention output (``dropout1``), the feed-forward hidden layer
#: (``dropout``) and the feed-forward output (``dropout2``).
SITES = ("attention", "attention_out", "feedforward", "feedforward_out")

_STREAM = 1  # spawn_key[0] of the dropout streams (the data stream is 0)
_CHUNK = 1 << 16  # uniform numbers drawn at a time


@dataclass(frozen=True)
class DropoutKey:
    """Which masks a training forward pass draws: the run's seed and the step."""

    seed: int
    step: int


def multiplier(key: DropoutKey, site: str, shape, p: float, fmt: Format, xp=None):
    """The mask of ``site`` at ``key.step``: ``RN(1/(1 - p))`` where kept, 0 where dropped.

    Parameters
    ----------
    key : DropoutKey
    site : one of :data:`SITES`
    shape : tuple of int
    p : float in (0, 1)
    fmt : Format
        Storage format (the multiplier is in its carrier dtype).
    xp : array namespace, optional (default NumPy)

    Returns
    -------
    array of ``shape``
    """
    ss = np.random.SeedSequence(key.seed, spawn_key=(_STREAM, key.step, SITES.index(site)))
    rng = np.random.default_rng(ss)
    scale = quantize(np.asarray(1.0 / (1.0 - p)), fmt)
    m = np.empty(shape, dtype=scale.dtype)
    flat = m.reshape(-1)
    # the stream in cache-sized pieces: consecutive draws continue one sequence, so the
    # pieces are the numbers of one ``rng.random(shape)``, without its large float64 array
    u = np.empty(min(_CHUNK, flat.size))
    for start in range(0, flat.size, _CHUNK):
        piece = u[: min(_CHUNK, flat.size - start)]
        rng.random(out=piece)
        np.multiply(piece >= p, scale, out=flat[start : start + piece.size])  # u < p: +0
    return m if xp is None or xp is np else xp.asarray(m)


def apply(x, m, r):
    """``RN(x · m)`` with the :class:`~numstab.losses.rounding.Rounding` ``r`` (``m`` from
    :func:`multiplier`; None: no dropout, ``x`` itself). Forward and backward alike."""
    return x if m is None else r.mul(x, m)
