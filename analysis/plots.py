"""Figures from collected sweep results: accuracy, SC fraction, weight norm, NLM cosine.

Every curve is the mean over the seeds of a group of runs (runs that differ only in the seed),
with a band: ``"minmax"`` (min–max over the seeds, the default), ``"std"`` (mean ± sample
std) or ``"none"``. matplotlib is imported only when a plot is drawn (``pip install
'numstab[plot]'``); figures are drawn on a ``matplotlib.figure.Figure`` without pyplot, so no
global backend or state is touched.

Plot functions take an Axes, a :class:`~analysis.results.Results` and the groups to draw,
``{key: [run ids]}`` as :meth:`Results.group` returns them.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np

from analysis.results import group_label
from analysis.stats import aggregate, first_step

__all__ = [
    "PLOTS",
    "TITLE_CHARS_PER_INCH",
    "draw_figure",
    "plot_accuracy",
    "plot_figure",
    "plot_loss",
    "plot_nlm_cosine",
    "plot_sc_fraction",
    "plot_weight_norm",
    "require_matplotlib",
]

BANDS = ("minmax", "std", "none")


def require_matplotlib():
    """Import matplotlib (for its ``Figure``), or raise ImportError naming the ``plot`` extra."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'numstab[plot]' "
            "(or pip install matplotlib)"
        ) from exc
    return Figure


def _color(i: int) -> str:
    return f"C{i % 10}"


def _curve(ax, agg, *, color, band, label=None, ls="-", lw=1.5):
    if not agg["steps"].size:
        return
    s = agg["steps"]
    if band not in BANDS:
        raise ValueError(f"band must be one of {', '.join(BANDS)}, got {band!r}")
    if band == "minmax" and (agg["n"] > 1).any():
        ax.fill_between(s, agg["min"], agg["max"], color=color, alpha=0.18, lw=0)
    elif band == "std" and (agg["n"] > 1).any():
        ax.fill_between(
            s, agg["mean"] - agg["std"], agg["mean"] + agg["std"], color=color, alpha=0.18, lw=0
        )
    ax.plot(s, agg["mean"], color=color, ls=ls, lw=lw, label=label)


def _n_label(ids) -> str:
    return f" (n={len(ids)})"


def plot_accuracy(ax, results, groups, *, band="minmax"):
    """Train (dashed) and test (solid) accuracy against step, one colour per group."""
    for i, (key, ids) in enumerate(groups.items()):
        c = _color(i)
        for split, ls in (("test", "-"), ("train", "--")):
            agg = aggregate(results.series(r, "accuracy", split) for r in ids)
            label = f"{group_label(key)}{_n_label(ids)}" if split == "test" else None
            _curve(ax, agg, color=c, band=band, label=label, ls=ls)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (test —, train - -)")


def _marker_step(results, ids, metric, split, threshold):
    steps = []
    for r in ids:
        s, v = results.series(r, metric, split)
        steps.append(first_step(s, v, threshold))
    got = [s for s in steps if s is not None]
    return (float(np.mean(got)) if got else None), len(got), len(steps)


def plot_sc_fraction(ax, results, groups, *, band="minmax", split="train"):
    """Softmax Collapse fraction of the training set against step, one colour per group
    (format), with the mean step at which SC reaches 50 % marked (dotted line; the legend says
    how many seeds reached it)."""
    for i, (key, ids) in enumerate(groups.items()):
        c = _color(i)
        agg = aggregate(results.series(r, "sc_fraction", split) for r in ids)
        _curve(ax, agg, color=c, band=band, label=group_label(key))
        at, k, n = _marker_step(results, ids, "sc_fraction", split, 0.5)
        if at is not None:
            ax.axvline(at, color=c, ls=":", lw=1.2, label=f"SC-50 ≈ {at:.0f} ({k}/{n})")
    ax.axhline(0.5, color="0.6", lw=0.6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel(f"SC fraction ({split})")


def plot_weight_norm(ax, results, groups, *, band="minmax", layer="global"):
    """L2 norm of the parameters (``layer``: ``"global"`` or a tensor name) against step."""
    for i, (key, ids) in enumerate(groups.items()):
        agg = aggregate(results.series(r, "weight_norm", "train", layer) for r in ids)
        _curve(ax, agg, color=_color(i), band=band, label=group_label(key))
    ax.set_xlabel("step")
    ax.set_ylabel(f"weight norm ({layer})")


def _train_series_log(ax, results, groups, metric: str, ylabel: str, band: str) -> None:
    """A training-split series against step on a log axis (an exact 0 is not drawn), one
    colour per group."""
    for i, (key, ids) in enumerate(groups.items()):
        agg = aggregate(results.series(r, metric, "train") for r in ids)
        _curve(ax, agg, color=_color(i), band=band, label=group_label(key))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)


def plot_zero_sum_violation(ax, results, groups, *, band="minmax"):
    """Mean ``|Σ_k ∂L/∂z_k|`` of the computed logit gradient (0 in exact arithmetic) against
    step, log scale (an exact 0 is not drawn)."""
    _train_series_log(ax, results, groups, "zero_sum_violation", "zero-sum violation (train)", band)


def plot_nlm_cosine(ax, results, groups, *, band="minmax", layers=None, metric="nlm_cos_grad"):
    """NLM alignment ``cos(θ, −∇L)`` per layer against step (one colour per layer, one line
    style per group), with the mean step of 100 % training accuracy marked (dotted)."""
    styles = ("-", "--", "-.", ":")
    for g, (key, ids) in enumerate(groups.items()):
        names = layers or (results.layers(ids[0], metric) if ids else [])
        ls = styles[g % len(styles)]
        for j, layer in enumerate(names):
            agg = aggregate(results.series(r, metric, "train", layer) for r in ids)
            label = layer if len(groups) == 1 else f"{layer}, {group_label(key)}"
            _curve(
                ax,
                agg,
                color=_color(j),
                band=band,
                label=label,
                ls=ls,
                lw=2.0 if layer == "global" else 1.3,
            )
        at, k, n = _marker_step(results, ids, "accuracy", "train", 1.0)
        if at is not None:
            ax.axvline(at, color="0.3", ls=":", lw=1.2, label=f"train 100 % ≈ {at:.0f} ({k}/{n})")
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_ylim(-1.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("cos(θ, −∇L)" if metric == "nlm_cos_grad" else f"{metric}")


def plot_loss(ax, results, groups, *, band="minmax"):
    """Mean training loss against step, log scale (an exact 0 is not drawn), one colour per
    group: a collapse wave or slingshot is a spike (:func:`analysis.claims.loss_spike_steps`)."""
    _train_series_log(ax, results, groups, "loss", "training loss", band)


#: Plot kinds a panel may list (``plots = [...]`` in a figure SPEC).
PLOTS = {
    "accuracy": plot_accuracy,
    "sc_fraction": plot_sc_fraction,
    "weight_norm": plot_weight_norm,
    "nlm_cosine": plot_nlm_cosine,
    "zero_sum_violation": plot_zero_sum_violation,
    "loss": plot_loss,
}


#: Characters of the figure's title per inch of its width (about 5.6 points a character at
#: 11 points, less a margin): longer titles are wrapped, not cut at the figure's edges.
TITLE_CHARS_PER_INCH = 11


def plot_figure(results, panels, path, *, title: str = "", band: str = "minmax", dpi: int = 110):
    """Draw a figure (:func:`draw_figure`) and save it as a PNG at ``path`` (its folder is
    created); returns ``path``."""
    fig = draw_figure(results, panels, title=title, band=band)
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return os.fspath(path)


def draw_figure(results, panels, *, title: str = "", band: str = "minmax"):
    """Draw a figure: one row per panel, one column per plot kind.

    Parameters
    ----------
    results : Results
    panels : list of dict
        ``name``, ``title``, ``match`` (runs to draw, see
        :func:`analysis.match.config_matches`), ``plots`` (keys of :data:`PLOTS`, default
        accuracy, SC fraction, weight norm), optional ``log_x`` (bool) and ``group_by`` (list of
        fields; default: the fields that vary among the panel's runs, except the seed).
    title : str
        Above the panels, with the band's name; wrapped to the figure's width.

    Returns
    -------
    matplotlib.figure.Figure
    """
    Figure = require_matplotlib()
    if band not in BANDS:
        raise ValueError(f"band must be one of {', '.join(BANDS)}, got {band!r}")
    panels = list(panels) or [{"name": "all", "title": "", "match": {}}]
    default = ["accuracy", "sc_fraction", "weight_norm"]
    ncols = max(len(p.get("plots") or default) for p in panels)
    width = 5.2 * ncols
    fig = Figure(figsize=(width, 3.9 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), ncols, squeeze=False)
    for row, panel in enumerate(panels):
        ids = results.select(panel.get("match"))
        groups = results.group(ids, panel.get("group_by"))
        kinds = panel.get("plots") or default
        for col in range(ncols):
            ax = axes[row][col]
            if col >= len(kinds):
                ax.set_visible(False)
                continue
            if not ids:
                ax.text(
                    0.5, 0.5, "no runs to draw", ha="center", va="center", transform=ax.transAxes
                )
            else:
                PLOTS[kinds[col]](ax, results, groups, band=band)
                if panel.get("log_x"):
                    ax.set_xscale("symlog", linthresh=10)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7, loc="best")
            ax.grid(alpha=0.3)
            ax.set_title(f"{panel.get('title') or panel.get('name', '')}", fontsize=9)
    if title:
        text = f"{title}  [band: {band} over seeds]"
        fig.suptitle(textwrap.fill(text, int(width * TITLE_CHARS_PER_INCH)), fontsize=11)
    return fig
