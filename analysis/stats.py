"""Small statistics over seeds: per-step aggregates of series and summaries of scalars."""

from __future__ import annotations

import math
import statistics

import numpy as np

__all__ = ["aggregate", "first_step", "max_after", "summarize_values", "value_at"]


def aggregate(series) -> dict:
    """Per-step mean, sample std, min and max over several ``(steps, values)`` series.

    Steps are the union of the series' steps; at each step only the series that logged it
    count (``n``), so a run that stopped early (divergence) shortens nothing else. NaN values
    are left out. ``std`` is the sample standard deviation (ddof = 1), 0 where ``n < 2``.

    Returns
    -------
    dict of ndarray: ``steps``, ``mean``, ``std``, ``min``, ``max``, ``n``
    """
    series = [(np.asarray(s), np.asarray(v, dtype=np.float64)) for s, v in series]
    series = [(s, v) for s, v in series if s.size]
    if not series:
        empty = np.zeros(0)
        return {
            "steps": np.zeros(0, dtype=np.int64),
            "mean": empty,
            "std": empty,
            "min": empty,
            "max": empty,
            "n": np.zeros(0, dtype=np.int64),
        }
    steps = np.unique(np.concatenate([s for s, _v in series]))
    table = np.full((len(series), steps.size), np.nan)
    for i, (s, v) in enumerate(series):
        table[i, np.searchsorted(steps, s)] = v
    ok = ~np.isnan(table)
    n = ok.sum(axis=0)
    filled0 = np.where(ok, table, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled0.sum(axis=0) / n
        dev = np.where(ok, table - mean, 0.0)
        std = np.sqrt((dev * dev).sum(axis=0) / np.maximum(n - 1, 1))
    std = np.where(n >= 2, std, 0.0)
    lo = np.where(ok, table, np.inf).min(axis=0)
    hi = np.where(ok, table, -np.inf).max(axis=0)
    keep = n > 0
    return {
        "steps": steps[keep],
        "mean": mean[keep],
        "std": std[keep],
        "min": lo[keep],
        "max": hi[keep],
        "n": n[keep],
    }


def first_step(steps, values, threshold: float, *, above: bool = True):
    """First logged step whose value is ``>= threshold`` (``above``) or ``<= threshold``;
    None if never."""
    values = np.asarray(values, dtype=np.float64)
    hit = np.flatnonzero(values >= threshold if above else values <= threshold)
    return int(np.asarray(steps)[hit[0]]) if hit.size else None


def value_at(steps, values, step):
    """``(logged_step, value)`` at the last logged step ``<= step``; ``(None, None)`` if none."""
    steps = np.asarray(steps)
    i = int(np.searchsorted(steps, step, side="right")) - 1
    if i < 0 or steps.size == 0:
        return None, None
    return int(steps[i]), float(np.asarray(values)[i])


def max_after(steps, values, step, *, absolute_change: bool = False):
    """Max of the values at logged steps ``>= step`` (None if none); with
    ``absolute_change``, the max of ``|v(t) − v(s)|`` over those steps, ``s`` the last logged
    step ``<= step``."""
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    sel = steps >= step
    if not sel.any():
        return None
    if not absolute_change:
        return float(np.nanmax(values[sel]))
    _s, ref = value_at(steps, values, step)
    if ref is None:
        return None
    return float(np.nanmax(np.abs(values[sel] - ref)))


def summarize_values(values) -> dict:
    """``n`` (entries), ``n_value`` (not None / NaN), ``mean``, ``std`` (sample, ddof = 1; None
    for fewer than 2), ``min``, ``max`` of a list of numbers (None entries = no value)."""
    vals = [
        float(v)
        for v in values
        if v is not None and not isinstance(v, bool) and not math.isnan(float(v))
    ]
    return {
        "n": len(values),
        "n_value": len(vals),
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) >= 2 else None,
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
    }
