"""Figure SPECs: a sweep SPEC plus a ``[reproduce]`` table of budgets, variants and panels.

A figure SPEC (``numstab/specs/fig1.toml`` ...) is a :mod:`numstab.sweep` SPEC (``description``,
``[base]``, ``[axes]``, ``[[runs]]``) describing the paper's full-length configuration for one
seed, plus one extra top-level table that :func:`numstab.sweep.parse_spec` would reject and that
this module strips before handing the rest over::

    [reproduce]
    figure = "1"                  # file names: fig1-<budget>.png, runs/repro/fig1-<budget>
    title = "..."                 # the PNG's title
    claims = "fig1"               # key of analysis.claims.CLAIMS
    seeds = 3                     # default seed count: seeds 0 .. N-1

    [reproduce.budget.smoke]      # one table per budget: smoke, short, full
    seeds = 1                     # seed count of this budget
    max_steps = 60                # cap: every run's steps = min(steps, max_steps)
    max_log_every = 5             # cap: every run's log_every = min(log_every, max_log_every)
    p = 23                        # any TrainConfig field: forced on every run that reads it
    hidden = [32, 32]
    [[reproduce.budget.smoke.rules]]   # conditional override
    match = { zero_target_grad_from = 40 }
    zero_target_grad_from = 20

    [reproduce.variants.authors]  # selected with --variant authors
    description = "..."
    [[reproduce.variants.authors.rules]]
    match = { perp_grad = ["tensor", "global"], optimizer = "adamw" }
    beta2 = 0.999

    [[reproduce.panels]]          # one row of the figure each
    name = "a"
    title = "(a) ..."
    match = { perp_grad = ["tensor", "global"] }
    plots = ["accuracy", "sc_fraction", "weight_norm"]   # see analysis.plots.PLOTS

Resolution (:func:`resolve`), on the list of runs :func:`numstab.sweep.parse_spec` makes of the
stripped SPEC: (1) the variant's rules, (2) the budget's rules, then its forced fields, then
the ``max_steps`` / ``max_log_every`` caps, (3) the seeds: every run, grid or ``[[runs]]``,
is replicated over the seed list (``--seeds N`` > the budget's ``seeds`` > ``[reproduce]
seeds``), seed by seed: seed 0 of every run first, then seed 1, so a sweep cut short (a
session's end, a budget) has every configuration at its first seeds. A rule's ``match`` is
tested against the run as it was before that stage; a list in ``match`` means "any of" (for
``hidden``, give a list of lists); ``"none"`` stands for None.
The result is a plain SPEC dict of explicit ``[[runs]]`` (the fields common to every run in
``[base]``): the SPEC's own columns, any other field that varies, and ``seed`` are the columns
of the collected tables. Two runs that resolve to the same configuration are an error.
"""

from __future__ import annotations

import copy
import dataclasses
import os

from analysis.match import config_matches, norm_value, values_equal
from analysis.plots import PLOTS
from numstab import sweep as S
from numstab.run import TrainConfig
from numstab.run.config import unread_fields
from numstab.run.options import options_of

__all__ = [
    "BUDGETS",
    "FIGURES",
    "FigureSpec",
    "config_dict",
    "config_matches",
    "load_figure_spec",
    "resolve",
    "spec_path",
]

#: Budgets every figure SPEC defines.
BUDGETS = ("smoke", "short", "full")
#: Figure ids and their SPEC files (in numstab/specs/, shipped with the package).
FIGURES = {
    "1": "fig1.toml",
    "2": "fig2.toml",
    "4": "fig4.toml",
    "5": "fig5.toml",
    "6": "fig6.toml",
    "8": "fig8.toml",
    "9": "fig9.toml",
    "13": "fig13.toml",
    "14": "fig14.toml",
    "15": "fig15.toml",
    "16": "fig16.toml",
    "appI": "appI.toml",
    "extra": "extra.toml",
    "glitch": "glitch.toml",
    "logitscale": "logitscale.toml",
    "slingshot": "slingshot.toml",
    "zerosum": "zerosum.toml",
}
SPECS_DIR = S.BUNDLED_SPECS
_BUDGET_KEYS = ("seeds", "max_steps", "max_log_every", "rules", "description")
_REPRODUCE_KEYS = ("figure", "title", "claims", "seeds", "budget", "variants", "panels")


class FigureSpecError(ValueError):
    """A malformed ``[reproduce]`` table (or a SPEC numstab.sweep rejects)."""


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    """A figure SPEC file: the sweep part and its ``[reproduce]`` table."""

    path: str
    figure: str
    title: str
    claims: str
    sweep: dict  # the SPEC without [reproduce]
    reproduce: dict

    @property
    def panels(self) -> list:
        return list(self.reproduce.get("panels", []))

    def budget(self, name: str) -> dict:
        budgets = self.reproduce.get("budget", {})
        if name not in budgets:
            raise FigureSpecError(
                f"{self.path}: no [reproduce.budget.{name}] (has: {', '.join(budgets) or 'none'})"
            )
        return budgets[name]

    def variant(self, name: str) -> dict:
        variants = self.reproduce.get("variants", {})
        if name not in variants:
            raise FigureSpecError(
                f"{self.path}: no variant {name!r} (has: {', '.join(variants) or 'none'})"
            )
        return variants[name]

    def stem(self, budget: str, variant: str | None = None) -> str:
        """``fig1-short``, ``fig1-authors-short``, ``extra-smoke``, ``appI-short``: file and
        folder stem."""
        name = f"fig{self.figure}" if self.figure[:1].isdigit() else self.figure
        return "-".join([name, *([variant] if variant else []), budget])


def spec_path(figure: str, specs_dir: str | None = None) -> str:
    """Path of a figure's SPEC file (``figure`` in :data:`FIGURES`)."""
    figure = str(figure)
    if figure not in FIGURES:
        raise FigureSpecError(f"unknown figure {figure!r}; valid: {', '.join(FIGURES)}")
    return os.path.join(specs_dir or SPECS_DIR, FIGURES[figure])


def load_figure_spec(path) -> FigureSpec:
    """Read a figure SPEC; checks the ``[reproduce]`` table and that numstab.sweep accepts the
    rest (raises :class:`FigureSpecError`)."""
    path = os.fspath(path)
    try:
        doc = S.read_toml(path)
    except S.SpecError as exc:
        raise FigureSpecError(str(exc)) from None
    rep = doc.pop("reproduce", None)
    if not isinstance(rep, dict):
        raise FigureSpecError(f"{path}: no [reproduce] table")
    for k in rep:
        if k not in _REPRODUCE_KEYS:
            raise FigureSpecError(
                f"{path}: unknown key reproduce.{k}; valid: {', '.join(_REPRODUCE_KEYS)}"
            )
    for k in ("figure", "claims"):
        if not isinstance(rep.get(k), str):
            raise FigureSpecError(f"{path}: reproduce.{k} must be a string")
    spec = FigureSpec(
        path=path,
        figure=rep["figure"],
        title=str(rep.get("title", "")),
        claims=rep["claims"],
        sweep=doc,
        reproduce=rep,
    )
    try:
        S.parse_spec(copy.deepcopy(doc), source=path)
    except S.SpecError as exc:
        raise FigureSpecError(str(exc)) from None
    for name, b in rep.get("budget", {}).items():
        _check_overrides(f"{path}: reproduce.budget.{name}", b, _BUDGET_KEYS)
    for name, v in rep.get("variants", {}).items():
        _check_overrides(f"{path}: reproduce.variants.{name}", v, ("rules", "description"))
        if set(v) - {"rules", "description"}:
            raise FigureSpecError(f"{path}: reproduce.variants.{name}: only rules may set fields")
    for i, p in enumerate(spec.panels):
        where = f"{path}: reproduce.panels[{i}]"
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            raise FigureSpecError(f"{where}: a panel is a table with a name")
        _check_match(where, p.get("match", {}))
        for plot in p.get("plots", []):
            if plot not in PLOTS:
                raise FigureSpecError(f"{where}: unknown plot {plot!r}; valid: {', '.join(PLOTS)}")
    return spec


def _fields() -> dict:
    """TrainConfig field name -> its declared option (:mod:`numstab.run.options`)."""
    return options_of(TrainConfig)


def _check_match(where: str, match) -> None:
    if not isinstance(match, dict):
        raise FigureSpecError(f"{where}: match must be a table of TrainConfig fields")
    hints = _fields()
    for k in match:
        if k not in hints:
            raise FigureSpecError(f"{where}: match.{k} is not a TrainConfig field")


def _check_overrides(where: str, table, reserved) -> None:
    if not isinstance(table, dict):
        raise FigureSpecError(f"{where} must be a table")
    hints = _fields()
    for k, v in table.items():
        if k in reserved:
            continue
        if k not in hints:
            raise FigureSpecError(f"{where}.{k}: not a TrainConfig field nor one of {reserved}")
        if isinstance(v, dict):
            raise FigureSpecError(f"{where}.{k}: expected a value, got a table")
    for k in ("seeds", "max_steps", "max_log_every"):
        v = table.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise FigureSpecError(f"{where}.{k} must be a positive integer, got {v!r}")
    rules = table.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise FigureSpecError(f"{where}.rules must be an array of tables ([[...rules]])")
    for i, r in enumerate(rules):
        _check_match(f"{where}.rules[{i}]", r.get("match", {}))
        for k in r:
            if k != "match" and k not in hints:
                raise FigureSpecError(f"{where}.rules[{i}].{k}: not a TrainConfig field")


# --- matching and resolution ----------------------------------------------------------------


def _apply_rules(runs: list, rules: list) -> list:
    out = []
    for kw in runs:
        new = dict(kw)
        for r in rules:
            if config_matches(kw, r.get("match")):
                new.update({k: norm_value(v) for k, v in r.items() if k != "match"})
        out.append(new)
    return out


def config_dict(config) -> dict:
    """A TrainConfig as the plain dict :func:`config_matches` tests (tuples as lists)."""
    return _kwargs(config)


def _kwargs(config) -> dict:
    return {
        f.name: (list(v) if isinstance(v := getattr(config, f.name), tuple) else v)
        for f in dataclasses.fields(config)
    }


def _spec_value(v):
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return list(v)
    return v


def resolve(
    spec: FigureSpec,
    budget: str,
    *,
    seeds: int | None = None,
    variant: str | None = None,
) -> dict:
    """The plain :mod:`numstab.sweep` SPEC (a dict) of ``spec`` under a budget and variant.

    Parameters
    ----------
    spec : FigureSpec
    budget : {"smoke", "short", "full"} (or any budget the file defines)
    seeds : int, optional
        Number of seeds (seeds 0 .. N-1), overriding the budget's and the file's.
    variant : str, optional
        A ``[reproduce.variants.<name>]`` of the file (e.g. ``"authors"``).

    Raises
    ------
    FigureSpecError
        Unknown budget or variant, or two runs resolving to the same configuration.
    """
    b = spec.budget(budget)
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise FigureSpecError(f"seeds must be a positive integer, got {seeds!r}")
    sw0 = S.parse_spec(copy.deepcopy(spec.sweep), source=spec.path)
    runs = [_kwargs(r.config) for r in sw0.runs]
    if variant is not None:
        runs = _apply_rules(runs, spec.variant(variant).get("rules", []))
    runs = _apply_rules(runs, b.get("rules", []))
    forced = {k: norm_value(v) for k, v in b.items() if k not in _BUDGET_KEYS}
    for kw in runs:
        unread = unread_fields(kw)  # e.g. the smoke budget's small p, for a parity run
        kw.update({k: v for k, v in forced.items() if k not in unread})
        if b.get("max_steps") is not None:
            kw["steps"] = min(kw["steps"], b["max_steps"])
        if b.get("max_log_every") is not None:
            kw["log_every"] = min(kw["log_every"], b["max_log_every"])
    n_seeds = seeds or b.get("seeds") or spec.reproduce.get("seeds")
    if n_seeds:
        runs = [{**kw, "seed": s} for s in range(n_seeds) for kw in runs]  # seed-major

    names = [f.name for f in dataclasses.fields(TrainConfig)]
    seen: dict = {}
    for i, kw in enumerate(runs):
        try:
            rid = S.run_id(TrainConfig(**kw))
        except (TypeError, ValueError) as exc:
            raise FigureSpecError(f"{spec.path}: budget {budget!r}: {exc}") from None
        if rid in seen:
            raise FigureSpecError(
                f"{spec.path}: under budget {budget!r}"
                + (f" and variant {variant!r}" if variant else "")
                + f", runs {seen[rid]} and {i} resolve to the same configuration ({rid})"
            )
        seen[rid] = i
    varying = [n for n in names if any(not values_equal(kw[n], runs[0][n]) for kw in runs[1:])]
    columns = [c for c in sw0.columns if c != "seed"]
    columns += [n for n in varying if n not in columns and n != "seed"]
    columns.append("seed")
    base = {n: _spec_value(runs[0][n]) for n in names if n not in columns}
    explicit = [{c: _spec_value(kw[c]) for c in columns} for kw in runs]
    desc = spec.sweep.get("description", "")
    tag = f"budget {budget}" + (f", variant {variant}" if variant else "")
    return {
        "description": f"{desc} [{tag}]" if desc else f"[{tag}]",
        "base": base,
        "runs": explicit,
    }
