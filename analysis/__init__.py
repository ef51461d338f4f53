"""Turning sweep results into the paper's figures and claim tables.

Modules (importable from the repository root; matplotlib only when a plot is drawn):

- :mod:`analysis.repro`: figure SPECs (``numstab/specs/*.toml``): a numstab.sweep SPEC plus a
  ``[reproduce]`` table of budgets, variants and panels; :func:`~analysis.repro.resolve` turns
  one into a plain SPEC for a budget.
- :mod:`analysis.results`: :class:`~analysis.results.Results`, a collected sweep folder in
  memory (configs, statuses, metric series).
- :mod:`analysis.stats`: per-step aggregates over seeds and scalar summaries.
- :mod:`analysis.plots`: accuracy, SC fraction, weight norm and NLM-cosine plots; whole
  figures as PNG (``pip install 'numstab[plot]'``).
- :mod:`analysis.claims`: the numbers each claim needs, and a markdown renderer.

``python scripts/reproduce.py --figure N --budget smoke|short|full`` ties them together.
"""

from analysis.claims import CLAIMS, render_markdown
from analysis.repro import BUDGETS, FIGURES, FigureSpec, load_figure_spec, resolve, spec_path
from analysis.results import Results, load_results

__all__ = [
    "BUDGETS",
    "CLAIMS",
    "FIGURES",
    "FigureSpec",
    "Results",
    "load_figure_spec",
    "load_results",
    "render_markdown",
    "resolve",
    "spec_path",
]
