"""The numbers each claim of the paper needs, computed from collected results.

Every ``figN_claims(results)`` returns an ordered ``{claim key: entry}`` dict of plain values
(JSON-ready). An entry::

    {"key": "fig1a.test95_step",
     "description": "first logged step with test accuracy >= 0.95",
     "paper": "what the paper reports (qualitative)",
     "kind": "step" | "steps" | "fraction" | "cosine" | "number" | "bool",
     "rows": [{"group": {"perp_grad": "tensor"},      # the runs' distinguishing fields
               "n": 3, "n_in_flight": 0,           # runs counted (of them in flight)
               "n_failed": 0, "n_incomplete": 0,   # runs left out
               "values": [{"seed": 0, "run_id": "...", "value": 150}, ...],
               # numbers: n_value (runs with a value, e.g. that reached a step), mean,
               # std (sample, ddof = 1; None below 2 values), min, max
               # bool:    n_true, n_false, n_none (undecided)
               ...}]}

Only runs with a measured status are measured (``ok``; runs in flight too where the results
were loaded so, each up to its checkpoint's step: ``n_in_flight`` counts them among a row's
runs); failed and incomplete runs are counted per row. A step is a logged step, so its
resolution is the run's ``log_every``. :func:`render_markdown` turns any such dict into a
table; :data:`CLAIMS` maps the names used by the figure SPECs (``[reproduce] claims =
"fig1"``) to the functions.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from analysis.stats import first_step, max_after, summarize_values, value_at

__all__ = [
    "CLAIMS",
    "GROK_THRESHOLD",
    "appI_claims",
    "extra_claims",
    "fig1_claims",
    "fig2_claims",
    "fig4_claims",
    "fig5_claims",
    "fig6_claims",
    "fig8_claims",
    "fig9_claims",
    "fig13_claims",
    "fig14_claims",
    "fig15_claims",
    "fig16_claims",
    "glitch_claims",
    "logitscale_claims",
    "loss_spike_steps",
    "lowest_after_fit",
    "norm_growth_rate",
    "ordering_holds",
    "r_squared",
    "render_markdown",
    "slingshot_claims",
    "violation_radial_share",
    "zerosum_claims",
]

#: Test accuracy that counts as "generalised" in the ``*.test95_step`` claims.
GROK_THRESHOLD = 0.95
#: Fig. 8: test accuracy is "frozen" after the intervention if it never moves more than this.
FREEZE_THRESHOLD = 0.01
PRECISION_ORDER = ("float16", "float32", "float64")


# --- per-run measurements ------------------------------------------------------------------


def final_value(results, rid, metric, split="train", layer=""):
    _s, v = results.series(rid, metric, split, layer)
    return float(v[-1]) if v.size else None


def max_value(results, rid, metric, split="train", layer=""):
    _s, v = results.series(rid, metric, split, layer)
    return float(v.max()) if v.size else None


def first_at_least(results, rid, metric, split, threshold, layer=""):
    s, v = results.series(rid, metric, split, layer)
    return first_step(s, v, threshold)


def output_layer(results, rid, metric="nlm_cos_grad"):
    """Name of the last weight tensor (``W3`` for a 200-200 MLP) logged for ``metric``."""
    ws = [n for n in results.layers(rid, metric) if n.startswith("W") and n[1:].isdigit()]
    return max(ws, key=lambda n: int(n[1:])) if ws else None


# --- entries -------------------------------------------------------------------------------


def _jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _row(results, group: dict, ids: list, values: dict, kind: str, counts: dict) -> dict:
    """A claim row from ``{run_id: value}`` (value None = no value) or ``{run_id: (value,
    extra dict)}``."""
    entries = []
    for rid in ids:
        got = values.get(rid)
        extra = {}
        if isinstance(got, tuple):
            got, extra = got
        entries.append(
            {"seed": results.runs[rid].seed, "run_id": rid, "value": _jsonable(got), **extra}
        )
    row = {
        "group": {k: _jsonable(v) for k, v in group.items()},
        "n": len(ids),
        **_tally(results, ids, counts),
        "values": entries,
    }
    vals = [e["value"] for e in entries]
    if kind == "bool":
        row.update(
            n_true=sum(1 for v in vals if v is True),
            n_false=sum(1 for v in vals if v is False),
            n_none=sum(1 for v in vals if v is None),
        )
    else:
        row.update({k: v for k, v in summarize_values(vals).items() if k != "n"})
    return row


def _tally(results, ids, counts: dict) -> dict:
    """A row's counts besides ``n``: its measured runs still in flight, and the runs left
    out (``counts``: status -> runs)."""
    return {
        "n_in_flight": sum(1 for rid in ids if results.runs[rid].status == "in_flight"),
        "n_failed": counts.get("failed", 0),
        "n_incomplete": counts.get("incomplete", 0),
    }


def _entry(key, description, paper, kind, rows) -> dict:
    return {"key": key, "description": description, "paper": paper, "kind": kind, "rows": rows}


def _groups(results, match, by):
    """``[(group dict, measured ids, {status: count of the others})]`` for runs matching
    ``match``, grouped by the fields ``by``."""
    all_ids = results.select(match, status=None)
    out = []
    for key, ids in results.group(all_ids, by).items():
        ok = [i for i in ids if results.runs[i].status in results.measured]
        counts: dict = {}
        for i in ids:
            st = results.runs[i].status
            if st not in results.measured:
                counts[st] = counts.get(st, 0) + 1
        out.append((dict(key), ok, counts))
    return out


def _per_run(results, key, description, paper, kind, match, by, fn) -> dict:
    rows = []
    for group, ids, counts in _groups(results, match, by):
        rows.append(_row(results, group, ids, {r: fn(results, r) for r in ids}, kind, counts))
    return _entry(key, description, paper, kind, rows)


def ordering_holds(values, *, missing_is_inf: bool = False):
    """Whether ``values`` (in the intended order) are strictly increasing.

    None entries make the answer None (undecided), except with ``missing_is_inf``, where None
    stands for "later than the budget" (+inf): then ``(1, 2, None)`` holds, ``(None, 2, 3)``
    fails and two None entries compared with each other are undecided.
    """
    vals = list(values)
    if not missing_is_inf and any(v is None for v in vals):
        return None
    undecided = False
    for a, b in itertools.pairwise(vals):
        if a is None and b is None:
            undecided = True
            continue
        a = math.inf if a is None else a
        b = math.inf if b is None else b
        if not a < b:
            return False
    return None if undecided else True


def _ordering(
    results, key, description, paper, match, by, level_field, levels, fn, *, missing_is_inf=False
):
    """Per group of ``by`` and per seed: does ``fn`` increase strictly along ``levels`` of
    ``level_field``? One row per group; a value per seed."""
    rows = []
    for group, ids, counts in _groups(results, match, by):
        by_seed: dict = {}
        for rid in ids:
            lvl = results.runs[rid].config.get(level_field)
            by_seed.setdefault(results.runs[rid].seed, {})[lvl] = rid
        entries = []
        for seed in sorted(by_seed, key=lambda s: (s is None, s)):
            runs = by_seed[seed]
            if not all(lv in runs for lv in levels):
                holds, vals = None, {}
            else:
                vals = {lv: fn(results, runs[lv]) for lv in levels}
                holds = ordering_holds([vals[lv] for lv in levels], missing_is_inf=missing_is_inf)
            entries.append(
                {
                    "seed": seed,
                    "run_id": " ".join(runs[lv] for lv in levels if lv in runs),
                    "value": holds,
                    "by_level": {lv: _jsonable(vals.get(lv)) for lv in levels},
                }
            )
        row = {
            "group": {k: _jsonable(v) for k, v in group.items()},
            "n": len(entries),
            **_tally(results, ids, counts),
            "values": entries,
            "n_true": sum(1 for e in entries if e["value"] is True),
            "n_false": sum(1 for e in entries if e["value"] is False),
            "n_none": sum(1 for e in entries if e["value"] is None),
        }
        rows.append(row)
    return _entry(key, description, paper, "bool", rows)


def _test95(results, rid):
    return first_at_least(results, rid, "accuracy", "test", GROK_THRESHOLD)


def _final_test(results, rid):
    return final_value(results, rid, "accuracy", "test")


def _max_test(results, rid):
    return max_value(results, rid, "accuracy", "test")


def _final_train(results, rid):
    return final_value(results, rid, "accuracy", "train")


def _sc50(results, rid):
    return first_at_least(results, rid, "sc_fraction", "train", 0.5)


def _final_sc(results, rid):
    return final_value(results, rid, "sc_fraction", "train")


_T95 = f"first logged step with test accuracy >= {GROK_THRESHOLD}"


# --- the figures ---------------------------------------------------------------------------


def fig1_claims(results) -> dict:
    """Fig. 1: (a) ⊥AdamW generalises fast; (b) StableMax CE in float64 groks; (c) softmax CE
    in float64 memorises and stops (SC)."""
    a = {"perp_grad": ["tensor", "global"]}
    b = {"loss": "stablemax", "perp_grad": "none"}
    c = {"loss": "softmax", "loss_dtype": "float64", "perp_grad": "none"}
    by_a = ["perp_grad"]
    out = [
        _per_run(
            results,
            "fig1a.test95_step",
            f"(a) ⊥AdamW: {_T95}",
            "generalises in ~150 steps, no regularisation",
            "step",
            a,
            by_a,
            _test95,
        ),
        _per_run(
            results,
            "fig1a.final_test_acc",
            "(a) ⊥AdamW: final test accuracy",
            "~100 % within 300 steps",
            "fraction",
            a,
            by_a,
            _final_test,
        ),
        _per_run(
            results,
            "fig1b.max_test_acc",
            "(b) StableMax CE float64: max test accuracy",
            "groks (test accuracy rises to ~100 %)",
            "fraction",
            b,
            [],
            _max_test,
        ),
        _per_run(
            results,
            "fig1b.final_test_acc",
            "(b) StableMax CE float64: final test acc.",
            "high at the end of 80 000 steps",
            "fraction",
            b,
            [],
            _final_test,
        ),
        _per_run(
            results,
            "fig1b.test95_step",
            f"(b) StableMax CE float64: {_T95}",
            "(not stated numerically)",
            "step",
            b,
            [],
            _test95,
        ),
        _per_run(
            results,
            "fig1c.max_test_acc",
            "(c) softmax CE float64: max test accuracy",
            "stays low: no grokking without regularisation",
            "fraction",
            c,
            [],
            _max_test,
        ),
        _per_run(
            results,
            "fig1c.final_train_acc",
            "(c) softmax CE float64: final train acc.",
            "100 % (memorised)",
            "fraction",
            c,
            [],
            _final_train,
        ),
        _per_run(
            results,
            "fig1c.sc50_step",
            "(c) softmax CE float64: first step with SC >= 50 %",
            "SC eventually stops learning",
            "step",
            c,
            [],
            _sc50,
        ),
        _per_run(
            results,
            "fig1c.final_sc_fraction",
            "(c) softmax CE float64: final SC fraction",
            "high once learning has stopped",
            "fraction",
            c,
            [],
            _final_sc,
        ),
        *_spike_rows(results, "fig1c", c, [], "(not in the paper)"),
    ]
    return {e["key"]: e for e in out}


def _precision_claims(results, fig: str, match: dict) -> dict:
    """A lower loss precision collapses earlier and generalises less: the SC-50 step and the
    test accuracy per (train fraction, loss format), and their per-seed orderings."""
    by = ["train_fraction", "loss_dtype"]
    out = [
        _per_run(
            results,
            f"{fig}.sc50_step",
            "first step with training SC fraction >= 0.5",
            "earlier for lower CE precision",
            "step",
            match,
            by,
            _sc50,
        ),
        _per_run(
            results,
            f"{fig}.final_test_acc",
            "final test accuracy",
            "float16 < float32 < float64",
            "fraction",
            match,
            by,
            _final_test,
        ),
        _per_run(
            results,
            f"{fig}.max_test_acc",
            "max test accuracy over the run",
            "float16 < float32 < float64",
            "fraction",
            match,
            by,
            _max_test,
        ),
        _ordering(
            results,
            f"{fig}.order_final_test_acc",
            "per seed: final test accuracy float16 < float32 < float64",
            "holds (the figure's ordering)",
            match,
            ["train_fraction"],
            "loss_dtype",
            PRECISION_ORDER,
            _final_test,
        ),
        _ordering(
            results,
            f"{fig}.order_sc50_step",
            "per seed: SC-50 step float16 < float32 < float64 (never = after the run)",
            "holds: lower precision collapses earlier",
            match,
            ["train_fraction"],
            "loss_dtype",
            PRECISION_ORDER,
            _sc50,
            missing_is_inf=True,
        ),
    ]
    return {e["key"]: e for e in out}


def fig2_claims(results) -> dict:
    """Fig. 2: lower cross-entropy precision → earlier SC and less generalisation (AdamW)."""
    return _precision_claims(results, "fig2", {"loss": "softmax"})


def fig9_claims(results) -> dict:
    """Fig. 9: the same as Fig. 2 with SGD at a gradient-norm-scaled learning rate."""
    return _precision_claims(results, "fig9", {"loss": "softmax", "optimizer": "sgd"})


def fig4_claims(results) -> dict:
    """Fig. 4: StableMax CE groks without regularisation on add, mul and sparse parity; with
    compact inputs (right) train and test accuracy rise together."""
    m = {"loss": "stablemax"}
    by = ["task", "encoding"]
    out = [
        _per_run(
            results,
            "fig4.max_test_acc",
            "max test accuracy",
            "~100 % on every task",
            "fraction",
            m,
            by,
            _max_test,
        ),
        _per_run(
            results,
            "fig4.final_test_acc",
            "final test accuracy",
            "~100 % on every task",
            "fraction",
            m,
            by,
            _final_test,
        ),
        _per_run(
            results, "fig4.test95_step", _T95, "(read off the figure)", "step", m, by, _test95
        ),
        _per_run(
            results,
            "fig4.final_train_acc",
            "final train accuracy",
            "100 %",
            "fraction",
            m,
            by,
            _final_train,
        ),
        _per_run(
            results,
            "fig4.grokking_delay",
            "steps from train accuracy 100 % to test accuracy >= 0.95",
            "compact inputs: none (train and test rise together); one-hot: the grokking delay",
            "step",
            m,
            by,
            _grokking_delay,
        ),
    ]
    return {e["key"]: e for e in out}


def _grokking_delay(results, rid):
    """``test95_step - train100_step`` (None unless both are reached)."""
    t95, t100 = _test95(results, rid), _train100(results, rid)
    return None if t95 is None or t100 is None else t95 - t100


def _nlm(results, rid, layer_of, which):
    t100 = first_at_least(results, rid, "accuracy", "train", 1.0)
    layer = layer_of(results, rid)
    if t100 is None or layer is None:
        return None
    s, v = results.series(rid, "nlm_cos_grad", "train", layer)
    if which == "max_after":
        return (max_after(s, v, t100), {"train100_step": t100, "layer": layer})
    _at, val = value_at(s, v, t100)
    return (val, {"train100_step": t100, "layer": layer})


def fig5_claims(results) -> dict:
    """Fig. 5: after 100 % train accuracy the gradient aligns with the weights (NLM)."""
    m = {}
    by = None  # every varying field (one group for the fig5 SPEC)

    def out_layer(r, rid):
        return output_layer(r, rid)

    def glob(_r, _rid):
        return "global"

    out = [
        _per_run(
            results,
            "fig5.train100_step",
            "first logged step with train accuracy 1",
            "early (memorisation)",
            "step",
            m,
            by,
            lambda r, i: first_at_least(r, i, "accuracy", "train", 1.0),
        ),
        _per_run(
            results,
            "fig5.output_cos_at_train100",
            "output-layer cos(θ, −∇L) at the train-100 % step",
            "(starting point)",
            "cosine",
            m,
            by,
            lambda r, i: _nlm(r, i, out_layer, "at"),
        ),
        _per_run(
            results,
            "fig5.max_output_cos_after_train100",
            "max output-layer cos(θ, −∇L) after train 100 %",
            "rises towards 1 (naive loss minimisation)",
            "cosine",
            m,
            by,
            lambda r, i: _nlm(r, i, out_layer, "max_after"),
        ),
        _per_run(
            results,
            "fig5.max_global_cos_after_train100",
            "max global cos(θ, −∇L) after train 100 %",
            "rises towards 1",
            "cosine",
            m,
            by,
            lambda r, i: _nlm(r, i, glob, "max_after"),
        ),
        _per_run(
            results,
            "fig5.sc50_step",
            "first step with training SC fraction >= 0.5",
            "NLM drives the logits into SC",
            "step",
            m,
            by,
            _sc50,
        ),
    ]
    return {e["key"]: e for e in out}


def fig6_claims(results, *, at_step: int = 500) -> dict:
    """Fig. 6b: ⊥AdamW and ⊥SGD generalise within 500 steps, AdamW does not."""
    m = {}
    by = ["optimizer", "perp_grad"]

    def at(r, rid):
        s, v = r.series(rid, "accuracy", "test")
        step, val = value_at(s, v, at_step)
        return (val, {"step": step})

    out = [
        _per_run(
            results,
            "fig6.test_acc_at_500",
            f"test accuracy at step {at_step} (or the last logged step before it)",
            "high for ⊥AdamW and ⊥SGD, low for AdamW",
            "fraction",
            m,
            by,
            at,
        ),
        _per_run(results, "fig6.test95_step", _T95, "⊥ optimizers only", "step", m, by, _test95),
        _per_run(
            results,
            "fig6.final_train_acc",
            "final train accuracy",
            "100 %",
            "fraction",
            m,
            by,
            _final_train,
        ),
    ]
    return {e["key"]: e for e in out}


def fig8_claims(results, *, threshold: float = FREEZE_THRESHOLD) -> dict:
    """Fig. 8: zeroing the correct-class logit gradient from step s freezes test accuracy.

    For a run with ``zero_target_grad_from = s``: the test accuracy at s (the last logged step
    <= s), the final one, and the largest ``|acc(t) − acc(s)|`` over logged ``t >= s``;
    ``frozen`` when that is <= ``threshold``. The runs without intervention get the same
    numbers at every s used by the others (``group.s``), as the reference. A run whose last
    logged step is <= s (the intervention never acted) has no value.
    """
    steps_used = sorted(
        {
            r.config.get("zero_target_grad_from")
            for r in results.runs.values()
            if r.config.get("zero_target_grad_from") is not None
        }
    )

    def measure(r, rid, s):
        st, v = r.series(rid, "accuracy", "test")
        if s is None or not st.size or st[-1] <= s:
            return None
        at_s, acc_s = value_at(st, v, s)
        change = max_after(st, v, s, absolute_change=True)
        return {"at_step": at_s, "acc_at_s": acc_s, "final": float(v[-1]), "max_change": change}

    def rows_for(what, kind):
        rows = []
        for group, ids, counts in _groups(results, {}, ["perp_grad", "zero_target_grad_from"]):
            s_own = group.get("zero_target_grad_from")
            for s in [s_own] if s_own is not None else steps_used:
                vals = {}
                for rid in ids:
                    got = measure(results, rid, s)
                    vals[rid] = None if got is None else (what(got), {"at_step": got["at_step"]})
                g = dict(group)
                if s_own is None:
                    g["s"] = s
                rows.append(_row(results, g, ids, vals, kind, counts))
        return rows

    out = [
        _entry(
            "fig8.test_acc_at_s",
            "test accuracy at the intervention step s",
            "(the level it freezes at)",
            "fraction",
            rows_for(lambda m: m["acc_at_s"], "fraction"),
        ),
        _entry(
            "fig8.final_test_acc",
            "final test accuracy",
            "≈ the accuracy at s with intervention; higher without",
            "fraction",
            rows_for(lambda m: m["final"], "fraction"),
        ),
        _entry(
            "fig8.max_change_after_s",
            "max |test acc(t) − test acc(s)| over logged t >= s",
            "≈ 0 with intervention",
            "fraction",
            rows_for(lambda m: m["max_change"], "fraction"),
        ),
        _entry(
            "fig8.frozen",
            f"test accuracy frozen after s (max change <= {threshold})",
            "true with intervention, false without",
            "bool",
            rows_for(lambda m: m["max_change"] <= threshold, "bool"),
        ),
    ]
    return {e["key"]: e for e in out}


def extra_claims(results) -> dict:
    """Beyond the paper: absorption-free softmax, reduction order, 16-bit formats."""
    m = {}
    by = ["dtype", "order", "loss", "loss_dtype"]
    out = [
        _per_run(
            results,
            "extra.sc50_step",
            "first step with training SC fraction >= 0.5",
            "(beyond the paper)",
            "step",
            m,
            by,
            _sc50,
        ),
        _per_run(
            results,
            "extra.final_sc_fraction",
            "final training SC fraction",
            "(beyond the paper)",
            "fraction",
            m,
            by,
            _final_sc,
        ),
        _per_run(
            results,
            "extra.max_test_acc",
            "max test accuracy",
            "(beyond the paper)",
            "fraction",
            m,
            by,
            _max_test,
        ),
        _per_run(
            results,
            "extra.final_test_acc",
            "final test accuracy",
            "(beyond the paper)",
            "fraction",
            m,
            by,
            _final_test,
        ),
        _per_run(results, "extra.test95_step", _T95, "(beyond the paper)", "step", m, by, _test95),
    ]
    return {e["key"]: e for e in out}


def _max_sc(results, rid):
    return max_value(results, rid, "sc_fraction", "train")


def _mean_update_norm(results, rid):
    """Mean global ``||Δθ||`` over the logged steps (the effective step size)."""
    _, values = results.series(rid, "update_norm", "train", "global")
    return float(values.mean()) if values.size else None


def _train100(results, rid):
    return first_at_least(results, rid, "accuracy", "train", 1.0)


def _outcomes(results, prefix, match, by, paper) -> list:
    """The rows every figure of this family reports: SC-50, max and final SC fraction, final
    and max test accuracy, the step test accuracy passes the grokking threshold. ``paper``:
    claim name -> the paper's statement for it."""
    rows = (
        ("sc50_step", "first step with training SC fraction >= 0.5", "step", _sc50),
        ("max_sc_fraction", "max training SC fraction", "fraction", _max_sc),
        ("final_sc_fraction", "final training SC fraction", "fraction", _final_sc),
        ("final_test_acc", "final test accuracy", "fraction", _final_test),
        ("max_test_acc", "max test accuracy", "fraction", _max_test),
        ("test95_step", _T95, "step", _test95),
    )
    return [
        _per_run(results, f"{prefix}.{key}", text, paper.get(key, ""), kind, match, by, fn)
        for key, text, kind, fn in rows
    ]


def fig13_claims(results) -> dict:
    """Fig. 13: MSE loss, no weight decay: one hidden layer groks, two do not."""
    out = _outcomes(
        results, "fig13", {"loss": "mse"}, ["hidden"],
        {"max_test_acc": "one hidden layer: generalises; two: does not",
         "test95_step": "reached with one hidden layer only"},
    )  # fmt: skip
    return {e["key"]: e for e in out}


def fig14_claims(results) -> dict:
    """Fig. 14 (digits stand-in for MNIST, weights x100): SC near 100 % from the start without
    weight decay; with it SC drops and generalisation resumes."""
    out = _outcomes(
        results, "fig14", {"task": "digits"}, ["weight_decay"],
        {"max_sc_fraction": "near 1 without weight decay (from the start)",
         "final_sc_fraction": "drops with weight decay",
         "final_test_acc": "higher with weight decay"},
    )  # fmt: skip
    return {e["key"]: e for e in out}


def fig15_claims(results) -> dict:
    """Fig. 15: steps to 95 % test accuracy, AdamW + weight decay against ⊥AdamW, per lr."""
    by = ["lr", "weight_decay", "perp_grad"]
    out = [
        _per_run(results, "fig15.test95_step", _T95,
                 "⊥AdamW faster than AdamW with any weight decay (the paper); AdamW tuned: "
                 "~150 steps, no systematic advantage for ⊥AdamW (re-examination)",
                 "step", {}, by, _test95),
        _per_run(results, "fig15.final_test_acc", "final test accuracy", "", "fraction", {},
                 by, _final_test),
        _per_run(results, "fig15.max_sc_fraction", "max training SC fraction", "", "fraction",
                 {}, by, _max_sc),
    ]  # fmt: skip
    return {e["key"]: e for e in out}


def fig16_claims(results) -> dict:
    """Fig. 16: a softmax temperature does not prevent SC; label smoothing does, with partial
    generalisation."""
    out = _outcomes(
        results, "fig16", {"loss": "softmax"}, ["temperature", "label_smoothing"],
        {"sc50_step": "reached at every temperature; not with label smoothing",
         "max_test_acc": "label smoothing: partial generalisation"},
    )  # fmt: skip
    return {e["key"]: e for e in out}


def appI_claims(results) -> dict:
    """App. I: an Adam eps >= 1e-8 halts learning before SC (a smaller effective step)."""
    by = ["eps"]
    out = [
        *_outcomes(
            results, "appI", {}, by,
            {"sc50_step": "not reached with eps >= 1e-8 (learning halts first)"},
        ),
        _per_run(results, "appI.train100_step", "first step with train accuracy 1", "",
                 "step", {}, by, _train100),
        _per_run(results, "appI.mean_update_norm",
                 "mean global ‖Δθ‖ over logged steps (effective step size)",
                 "smaller for larger eps", "number", {}, by, _mean_update_norm),
    ]  # fmt: skip
    return {e["key"]: e for e in out}


#: A training-loss spike (a "slingshot", arXiv 2206.04817): the mean training loss at a
#: logged step at least this many times the one logged before it.
SPIKE_FACTOR = 10.0


def loss_spike_steps(steps, loss, *, factor: float = SPIKE_FACTOR) -> np.ndarray:
    """The logged steps at which a training-loss spike starts: ``loss[i] >= factor *
    loss[i-1]`` with ``loss[i-1] > 0`` (a rise from exactly 0 has no ratio), a spike over
    consecutive logged steps counted once, at its first. Shape (k,), ascending."""
    steps, loss = np.asarray(steps), np.asarray(loss, dtype=float)
    prev, cur = loss[:-1], loss[1:]
    rises = np.flatnonzero((prev > 0) & (cur >= factor * prev)) + 1
    first = np.ones(rises.size, dtype=bool)
    first[1:] = np.diff(rises) > 1
    return steps[rises[first]]


def _spikes(results, rid):
    steps, loss = results.series(rid, "loss", "train")
    return loss_spike_steps(steps, loss) if steps.size else None


def _n_spikes(results, rid):
    s = _spikes(results, rid)
    return None if s is None else int(s.size)


def _first_spike(results, rid):
    s = _spikes(results, rid)
    return int(s[0]) if s is not None and s.size else None


def _spike_interval(results, rid):
    """Median number of steps between consecutive loss spikes (None with fewer than two)."""
    s = _spikes(results, rid)
    return float(np.median(np.diff(s))) if s is not None and s.size > 1 else None


def _spike_rows(results, prefix, match, by, paper) -> list:
    """The training-loss spikes of :func:`loss_spike_steps`: how many, the first, the median
    interval."""
    spike = f"training-loss spikes (loss x{SPIKE_FACTOR:g} over the previous logged step)"
    rows = (
        ("loss_spikes", f"number of {spike}", "number", _n_spikes),
        ("first_loss_spike", f"first step of the {spike}", "step", _first_spike),
        ("loss_spike_interval", f"median steps between the {spike}", "steps", _spike_interval),
    )
    return [
        _per_run(results, f"{prefix}.{key}", text, paper, kind, match, by, fn)
        for key, text, kind, fn in rows
    ]


#: Steps after a training-loss spike that :func:`spike_window_gain` counts as its window (three
#: log intervals of the slingshot SPEC's ``log_every = 200``).
SPIKE_WINDOW = 600


def spike_window_gain(spikes, steps, acc, *, window: int = SPIKE_WINDOW):
    """How much of a run's test-accuracy change comes right after its training-loss spikes.

    ``Δ``: the last logged accuracy minus the last one logged before the first spike. A spike
    at step ``t`` owns the change from the last value logged before ``t`` to the value at
    ``e = min(t + window, t_next - 1, last step)`` (the last logged at or before ``e``).
    Returns ``(share of Δ in the windows, share of the steps from the first spike to the
    last step they cover: Σ (e - t) / (last - t_first))``, the two equal where the change is
    spread evenly; None without spikes, without a value logged before the first one, or with
    ``Δ == 0``.
    """
    spikes = np.asarray(spikes)
    steps, acc = np.asarray(steps), np.asarray(acc, dtype=float)
    if not spikes.size or not steps.size or steps[0] >= spikes[0]:
        return None

    def at(k, strict=False):  # the last value logged at (or, strict, before) step k
        return acc[np.searchsorted(steps, k, side="left" if strict else "right") - 1]

    last = int(steps[-1])
    delta = acc[-1] - at(spikes[0], strict=True)
    if delta == 0:
        return None
    gain = covered = 0.0
    for i, t in enumerate(spikes.tolist()):
        nxt = spikes[i + 1] - 1 if i + 1 < spikes.size else last
        e = min(t + window, nxt, last)
        gain += at(e) - at(t, strict=True)
        covered += max(e - t, 0)
    span = last - int(spikes[0])
    return float(gain / delta), (float(covered / span) if span > 0 else None)


def _spike_window_gain(results, rid):
    spikes = _spikes(results, rid)
    test = results.series(rid, "accuracy", "test")
    return None if spikes is None else spike_window_gain(spikes, *test)


#: Train accuracy from which :func:`lowest_after_fit` counts the training set as fitted.
FIT_THRESHOLD = 0.99


def lowest_after_fit(steps, acc, *, fit: float = FIT_THRESHOLD):
    """The lowest accuracy logged after the training set is first fitted, and its step.

    ``(min acc[i], steps[i])`` over the logged steps after the first one with ``acc >= fit``
    (the earliest step of the minimum); None if ``acc`` never reaches ``fit`` or nothing is
    logged after it. Where the accuracy never falls back, the value is at least ``fit``.
    """
    steps, acc = np.asarray(steps), np.asarray(acc, dtype=float)
    hit = np.flatnonzero(acc >= fit)
    if not hit.size or hit[0] + 1 >= acc.size:
        return None
    later = acc[hit[0] + 1 :]
    i = int(np.argmin(later))
    return float(later[i]), int(steps[hit[0] + 1 + i])


def _train_low(results, rid):
    return lowest_after_fit(*results.series(rid, "accuracy", "train"))


def slingshot_claims(results) -> dict:
    """The authors' issue #4: at lr 0.01, beta2 0.99 a float32 softmax CE generalised before a
    float64 one (slingshots, the authors said); not at lr 0.005, and with beta2 0.999 accuracy
    collapses at SC with no grokking."""
    by = ["lr", "beta2", "loss_dtype"]
    out = _outcomes(
        results, "slingshot", {}, by,
        {"test95_step": "issue #4: float32 before float64 at lr 0.01, beta2 0.99; "
                        "authors: not at lr 0.005; none with beta2 0.999"},
    )  # fmt: skip
    out.append(
        _per_run(results, "slingshot.final_train_acc", "final train accuracy",
                 "beta2 0.999: collapses when SC is reached (authors)", "fraction", {},
                 by, _final_train)
    )  # fmt: skip
    fitted = f"after train accuracy first reaches {FIT_THRESHOLD:g}"
    collapse = "beta2 0.999: train and test accuracy collapse when SC is reached (authors)"
    out += [
        _per_run(results, "slingshot.train_acc_low", f"lowest train accuracy {fitted}",
                 collapse, "fraction", {}, by, lambda res, rid: _part(_train_low(res, rid), 0)),
        _per_run(results, "slingshot.train_acc_low_step", f"step of the lowest train accuracy "
                 f"{fitted}", "", "step", {}, by, lambda res, rid: _part(_train_low(res, rid), 1)),
    ]  # fmt: skip
    out += _spike_rows(results, "slingshot", {}, by, "grokking through slingshots (authors)")
    after = f"within {SPIKE_WINDOW} steps after a training-loss spike"
    out += [
        _per_run(
            results, "slingshot.test_gain_at_spikes",
            f"share of the test-accuracy change from the first spike on that falls {after}",
            "grokking through slingshots (authors)", "number", {}, by,
            lambda res, rid: _part(_spike_window_gain(res, rid), 0),
        ),
        _per_run(
            results, "slingshot.spike_window_steps",
            f"share of the steps from the first spike on that lie {after} (the gain's share "
            "where the change is spread evenly)",
            "", "fraction", {}, by, lambda res, rid: _part(_spike_window_gain(res, rid), 1),
        ),
    ]  # fmt: skip
    return {e["key"]: e for e in out}


def _part(pair, i):
    return None if pair is None else pair[i]


def _mean_zero_sum_violation(results, rid):
    """Mean zero-sum violation (train) over the logged steps."""
    _, values = results.series(rid, "zero_sum_violation", "train")
    return float(values.mean()) if values.size else None


def norm_growth_rate(steps, norms, *, start_fraction: float = 0.5):
    """Least-squares slope of ``log ‖θ‖`` per 1 000 steps over the steps from
    ``start_fraction`` of the run on (None with fewer than 3 points)."""
    steps, norms = np.asarray(steps, dtype=float), np.asarray(norms, dtype=float)
    keep = steps >= steps.max() * start_fraction if steps.size else steps.astype(bool)
    if np.count_nonzero(keep) < 3:
        return None
    return float(np.polyfit(steps[keep] / 1000.0, np.log(norms[keep]), 1)[0])


def _norm_growth(results, rid):
    return norm_growth_rate(*results.series(rid, "weight_norm", "train", "global"))


def glitch_claims(results) -> dict:
    """The follow-up "Grokking or Glitching?": the zero-sum violation (0 in exact arithmetic,
    non-zero once target gradients are absorbed) against the growth of the weight norm, per
    loss format."""
    by = ["loss_dtype", "zero_sum_grad_from"]
    out = [
        *_outcomes(results, "glitch", {}, by, {}),
        _per_run(results, "glitch.mean_zero_sum_violation",
                 "mean zero-sum violation |Σ_k ∂L/∂z_k| over logged steps",
                 "non-zero once target gradients are absorbed", "number", {}, by,
                 _mean_zero_sum_violation),
        _per_run(results, "glitch.norm_growth_rate",
                 "slope of log ‖θ‖ per 1 000 steps, second half of the run",
                 "faster where the zero-sum violation is larger (the follow-up's mechanism)",
                 "number", {}, by, _norm_growth),
        *_violation_claims(results, "glitch", by),
        *_spike_rows(results, "glitch", {}, by, "driven by the violation (the follow-up)"),
    ]  # fmt: skip
    return {e["key"]: e for e in out}


def _max_weight_norm(results, rid):
    return max_value(results, rid, "weight_norm", "train", "global")


def _final_weight_norm(results, rid):
    return final_value(results, rid, "weight_norm", "train", "global")


#: :func:`violation_radial_share` reads the steps with at least this SC fraction: where a
#: large part of the batch is collapsed (the share is near 0 before, by construction).
SHARE_MIN_SC = 0.25


def violation_radial_share(sc, radial, violation, *, min_sc: float = SHARE_MIN_SC):
    """Median of ``violation / radial`` over the logged steps with an SC fraction of at least
    ``min_sc`` and a non-zero radial gradient: the share of ``⟨Z, ∂L/∂Z⟩`` the zero-sum
    violation carries (1: all of it; None without such a step). The three series are of the
    same steps."""
    sc, radial, violation = (np.asarray(a, dtype=float) for a in (sc, radial, violation))
    keep = (sc >= min_sc) & (radial != 0) & np.isfinite(radial) & np.isfinite(violation)
    if not np.any(keep):
        return None
    return float(np.median(violation[keep] / radial[keep]))


def collapsed_median(sc, values, *, min_sc: float = SHARE_MIN_SC):
    """Median of ``values`` over the logged steps with an SC fraction of at least ``min_sc``
    (the steps :func:`violation_radial_share` reads, those with a zero radial part included;
    None without such a step): the scale the share is measured at. Where the loss there is
    about the format's unit roundoff, the radial part itself is rounding residue
    (docs/reproduction.md, the follow-ups)."""
    sc, values = np.asarray(sc, dtype=float), np.asarray(values, dtype=float)
    keep = (sc >= min_sc) & np.isfinite(values)
    return float(np.median(values[keep])) if np.any(keep) else None


def _train_series(results, rid, metrics):
    """The train-split series of ``metrics`` (values only) if all are logged at the same steps,
    else None (a run recorded before one of them existed)."""
    series = [results.series(rid, m, "train") for m in metrics]
    steps = series[0][0]
    if steps.size == 0 or any(not np.array_equal(steps, s) for s, _ in series):
        return None
    return [v for _, v in series]


def _violation_share(results, rid):
    """:func:`violation_radial_share` of a run (None for a run recorded before the radial
    metrics existed)."""
    got = _train_series(results, rid, ("sc_fraction", "radial_grad", "radial_grad_violation"))
    return None if got is None else violation_radial_share(*got)


def _collapsed_loss(results, rid):
    got = _train_series(results, rid, ("sc_fraction", "loss"))
    return None if got is None else collapsed_median(got[0], got[1])


def _collapsed_radial(results, rid):
    got = _train_series(results, rid, ("sc_fraction", "radial_grad"))
    return None if got is None else collapsed_median(got[0], np.abs(got[1]))


def zerosum_claims(results) -> dict:
    """The follow-up "Grokking or Glitching?" by intervention: Fig. 2a's runs with the zero-sum
    violation and without it (each row's logit gradient minus its mean), per loss format: the
    collapse, the weight norm, and the share of the gradient's radial part the violation
    carries."""
    by = ["loss_dtype", "zero_sum_grad_from"]
    out = [*_outcomes(results, "zerosum", {}, by, {}), *_violation_claims(results, "zerosum", by)]
    return {e["key"]: e for e in out}


def _violation_claims(results, prefix, by) -> list:
    """The weight norm (max, final) and the violation's share of the radial gradient, per
    ``by`` group: with and without the violation (``zero_sum_grad_from``)."""
    return [
        _per_run(results, f"{prefix}.max_weight_norm", "max global weight norm", "", "number",
                 {}, by, _max_weight_norm),
        _per_run(results, f"{prefix}.final_weight_norm", "final global weight norm",
                 "moves with the violation if it drives the norm (the follow-up)", "number",
                 {}, by, _final_weight_norm),
        _per_run(results, f"{prefix}.violation_radial_share",
                 "median share of ⟨Z, ∂L/∂Z⟩ carried by the violation, steps with SC >= "
                 f"{SHARE_MIN_SC}",
                 "", "number", {}, by, _violation_share),
        _per_run(results, f"{prefix}.collapsed_radial_grad",
                 f"median |⟨Z, ∂L/∂Z⟩| over the same steps (SC >= {SHARE_MIN_SC})",
                 "", "number", {}, by, _collapsed_radial),
        _per_run(results, f"{prefix}.collapsed_loss",
                 f"median training loss over the same steps (SC >= {SHARE_MIN_SC})",
                 "", "number", {}, by, _collapsed_loss),
    ]  # fmt: skip


def r_squared(y, *columns) -> float | None:
    """R² of the least-squares fit ``y ~ 1 + columns`` (None with fewer points than
    coefficients + 1, or a constant ``y``)."""
    y = np.asarray(y, dtype=float)
    X = np.column_stack([np.ones_like(y), *(np.asarray(c, dtype=float) for c in columns)])
    if y.size < X.shape[1] + 1 or np.ptp(y) == 0:
        return None
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    return float(1.0 - resid @ resid / np.sum((y - y.mean()) ** 2))


def _at_train100(results, rid, metric, layer=""):
    """``metric`` (train split) at the first step with train accuracy 1 (None if never)."""
    t100 = _train100(results, rid)
    if t100 is None:
        return None
    steps, values = results.series(rid, metric, "train", layer)
    at = np.flatnonzero(steps == t100)
    return float(values[at[0]]) if at.size else None


def _effective_logit_scale(results, rid):
    """Mean per-sample ``|z| / T`` at train 100 % (the logits the loss sees)."""
    z = _at_train100(results, rid, "logit_norm")
    return None if z is None else z / float(results.runs[rid].config.get("temperature", 1.0))


def logitscale_claims(results) -> dict:
    """arXiv 2606.18465: the grokking delay against the effective logit scale and the weight
    norm (at train 100 %), per (init scale, temperature), and R² across every run that
    grokked; where the runs' loss formats differ, per ``loss_dtype`` too (R² within each)."""
    formats = {results.runs[r].config.get("loss_dtype") for r in results.select({}, status=None)}
    per_format = len(formats) > 1
    by = ["loss_dtype"] * per_format + ["init_scale", "temperature"]
    delay = _per_run(
        results,
        "logitscale.grokking_delay",
        "steps from train accuracy 100 % to test >= 0.95",
        "set by the effective logit scale",
        "step",
        {},
        by,
        _grokking_delay,
    )
    scale = _per_run(
        results,
        "logitscale.effective_logit_scale",
        "mean |z| / T at train 100 %",
        "",
        "number",
        {},
        by,
        _effective_logit_scale,
    )
    norm = _per_run(
        results,
        "logitscale.weight_norm",
        "global weight norm at train 100 %",
        "",
        "number",
        {},
        by,
        lambda res, rid: _at_train100(res, rid, "weight_norm", "global"),
    )
    fits = (
        ("log effective logit scale", "0.97", (1,)),
        ("log weight norm", "", (2,)),
        ("both", "0.98-0.99 (the norm adds 1-2 %)", (1, 2)),
    )
    rows = []
    for fmt in sorted(formats, key=lambda f: (f is not None, str(f))):
        points, used = [], []  # (delay, log scale, log norm) of every run with all three
        for rid in results.select({"loss_dtype": fmt if fmt is not None else "none"}):
            d, sc = _grokking_delay(results, rid), _effective_logit_scale(results, rid)
            w = _at_train100(results, rid, "weight_norm", "global")
            if d is not None and sc and w:
                points.append((d, math.log(sc), math.log(w)))
                used.append(rid)
        cols = np.array(points, dtype=float).reshape(-1, 3).T
        for name, paper, which in fits:
            r2 = r_squared(cols[0], *(cols[k] for k in which))
            group = {"loss_dtype": fmt} if per_format else {}
            row = {
                "group": {**group, "predictor": name},
                "n": len(points),
                **_tally(results, used, {}),
                "values": [],
                "paper_r2": paper,
            }
            row.update({k: v for k, v in summarize_values([r2]).items() if k != "n"})
            rows.append(row)
    fit = _entry(
        "logitscale.r2",
        "R² of the grokking delay over the runs that grokked",
        "effective logit scale alone: 0.97; with the norm: +1-2 %",
        "number",
        rows,
    )
    return {e["key"]: e for e in (delay, scale, norm, fit)}


#: Claim functions by the name a figure SPEC gives in ``[reproduce] claims``.
CLAIMS = {
    "fig1": fig1_claims,
    "fig2": fig2_claims,
    "fig4": fig4_claims,
    "fig5": fig5_claims,
    "fig6": fig6_claims,
    "fig8": fig8_claims,
    "fig9": fig9_claims,
    "extra": extra_claims,
    "fig13": fig13_claims,
    "fig14": fig14_claims,
    "fig15": fig15_claims,
    "fig16": fig16_claims,
    "appI": appI_claims,
    "glitch": glitch_claims,
    "zerosum": zerosum_claims,
    "logitscale": logitscale_claims,
    "slingshot": slingshot_claims,
}


# --- markdown ------------------------------------------------------------------------------


def _num(v, kind) -> str:
    if v is None:
        return "–"
    if kind in ("step", "steps"):  # a step, or a number of steps (an interval)
        return f"{v:.0f}"
    if kind in ("fraction", "cosine"):
        return f"{v:.4f}"
    return f"{v:.4g}"


def _value_cell(row, kind) -> str:
    if kind == "bool":
        s = f"{row['n_true']}/{row['n']} hold"
        if row["n_none"]:
            s += f" ({row['n_none']} undecided)"
        return s
    if row["n_value"] == 0:
        return "– (never)" if kind == "step" else "–"
    s = _num(row["mean"], kind)
    if row["std"] is not None:
        s += f" ± {_num(row['std'], kind)}"
    if row["n_value"] > 1:
        s += f" [{_num(row['min'], kind)}, {_num(row['max'], kind)}]"
    if kind == "step" and row["n_value"] < row["n"]:
        s += f" ({row['n_value']}/{row['n']} reached)"
    return s


def _seed_cell(row, kind) -> str:
    parts = []
    for e in row["values"]:
        v = e["value"]
        shown = (
            ("yes" if v else "no") if isinstance(v, bool) else ("–" if v is None else _num(v, kind))
        )
        parts.append(f"{e['seed']}: {shown}")
    return ", ".join(parts)


def _group_cell(group: dict) -> str:
    if not group:
        return "all"
    return ", ".join(f"{k}={'none' if v is None else v}" for k, v in group.items())


def render_markdown(claims: dict) -> str:
    """A markdown table of a claims dict: one line per claim row (mean ± std [min, max] over
    the seeds, how many runs, the per-seed values and the paper's statement)."""
    lines = [
        "| claim | runs | n | value (mean ± std [min, max]) | per seed | paper |",
        "|---|---|---|---|---|---|",
    ]
    for key, entry in claims.items():
        kind = entry["kind"]
        # a "|" in a text (|Δ|, ||θ||) would end the cell: escaped
        entry = {**entry, **{k: entry[k].replace("|", "\\|") for k in ("description", "paper")}}
        if not entry["rows"]:
            lines.append(
                f"| `{key}` {entry['description']} | (no runs) | 0 | – | – | {entry['paper']} |"
            )
            continue
        for row in entry["rows"]:
            n = str(row["n"])
            if row.get("n_in_flight"):
                n += f" ({row['n_in_flight']} in flight)"
            if row.get("n_failed"):
                n += f" (+{row['n_failed']} failed)"
            if row.get("n_incomplete"):
                n += f" (+{row['n_incomplete']} incomplete)"
            lines.append(
                f"| `{key}` {entry['description']} | {_group_cell(row['group'])} | {n} | "
                f"{_value_cell(row, kind)} | {_seed_cell(row, kind)} | {entry['paper']} |"
            )
    return "\n".join(lines) + "\n"
