"""scripts/reproduce.py and the analysis package: figure SPECs, budgets, claims, plots."""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import read_head_then_close
from hypothesis import example, given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from analysis import claims as C  # noqa: E402
from analysis import repro as R  # noqa: E402
from analysis.results import Results, varying_fields  # noqa: E402
from analysis.stats import aggregate, max_after, summarize_values, value_at  # noqa: E402
from numstab import sweep as S  # noqa: E402
from numstab.data import MODULAR_OPS  # noqa: E402
from numstab.run import TrainConfig  # noqa: E402

SCRIPT = ROOT / "scripts" / "reproduce.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIG1_KEYS = {
    "fig1a.test95_step",
    "fig1a.final_test_acc",
    "fig1b.max_test_acc",
    "fig1b.final_test_acc",
    "fig1b.test95_step",
    "fig1c.max_test_acc",
    "fig1c.final_train_acc",
    "fig1c.sc50_step",
    "fig1c.final_sc_fraction",
    "fig1c.loss_spikes",
    "fig1c.first_loss_spike",
    "fig1c.loss_spike_interval",
}


def _run_script(*args, timeout=180):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- end to end --------------------------------------------------------------------------------


def test_figure1_smoke_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    out, plots = tmp_path / "out", tmp_path / "plots"
    res = _run_script(
        "--figure",
        "1",
        "--budget",
        "smoke",
        "--out",
        str(out),
        "--plots-dir",
        str(plots),
        "--checkpoint-every",
        "5",
        "--quiet",
    )
    assert res.returncode == 0, res.stdout + res.stderr
    png = plots / "fig1-smoke.png"
    w, h = _png_size(png)
    assert w > 200 and h > 200
    doc = json.loads((out / "claims.json").read_text())
    assert doc["figure"] == "1" and doc["budget"] == "smoke"
    assert doc["status"] == {"ok": 4, "in_flight": 0, "failed": 0, "incomplete": 0}
    assert doc["in_flight"] == {} and doc["not_started"] == []
    assert set(doc["claims"]) == FIG1_KEYS
    for entry in doc["claims"].values():
        assert entry["rows"], entry["key"]
        for row in entry["rows"]:
            assert row["n"] == 1 and len(row["values"]) == 1
    a = doc["claims"]["fig1a.final_test_acc"]["rows"]
    assert sorted(r["group"]["perp_grad"] for r in a) == ["global", "tensor"]
    assert 0.0 <= a[0]["mean"] <= 1.0
    # the train accuracy of panel (c) is a real measurement, an exact count / n
    c = doc["claims"]["fig1c.final_train_acc"]["rows"][0]
    assert 0.0 < c["mean"] <= 1.0
    md = (out / "claims.md").read_text()
    assert "| `fig1a.test95_step`" in md and "fig1c.final_train_acc" in res.stdout
    rec = json.loads((out / "reproduce.json").read_text())
    assert len(rec["run_ids"]) == 4
    assert all(r["p"] == 23 for r in [rec["resolved_spec"]["base"]])
    for rid in rec["run_ids"]:
        assert json.loads((out / rid / "summary.json").read_text())["status"] == "ok"
        assert (out / rid / "checkpoint.json").exists()  # --checkpoint-every reached the runs

    # resumable: a second invocation runs nothing and gives the same claims
    again = _run_script(
        "--figure", "1", "--budget", "smoke", "--out", str(out), "--no-plots", "--quiet"
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 to run, 4 already done" in again.stdout
    assert json.loads((out / "claims.json").read_text())["claims"] == doc["claims"]

    # --report runs nothing and touches no run: a run whose result files are gone (a run in
    # flight, here at its final checkpoint) is measured from its checkpoint, marked as such,
    # and its claims are the ones its own metrics.csv gave
    rid = rec["run_ids"][0]
    for name in ("summary.json", "metrics.csv"):
        (out / rid / name).unlink()
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "claims" not in p.name}
    rep = _run_script(
        "--figure", "1", "--budget", "smoke", "--out", str(out), "--no-plots", "--report"
    )
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "already done" not in rep.stdout  # no sweep ran
    assert {p: p.read_bytes() for p in files} == files and not (out / rid / "metrics.csv").exists()
    partial = json.loads((out / "claims.json").read_text())
    assert partial["status"] == {"ok": 3, "in_flight": 1, "failed": 0, "incomplete": 0}
    (step,) = {v["step"] for v in partial["in_flight"].values()}
    assert list(partial["in_flight"]) == [rid] and step == partial["in_flight"][rid]["steps"]
    assert (
        f"In flight, measured up to their latest checkpoint: `{rid}` at step {step} of"
        in (out / "claims.md").read_text()
    )
    for key, entry in doc["claims"].items():
        for row, got in zip(entry["rows"], partial["claims"][key]["rows"], strict=True):
            mine = [v for v in got["values"] if v["run_id"] == rid]
            assert got["n_in_flight"] == len(mine), key
            assert {**got, "n_in_flight": 0} == row, key  # same values, from the checkpoint
    assert partial["not_started"] == [] and "Not started" not in (out / "claims.md").read_text()
    # a run whose folder is gone has not started: the report counts it so
    gone = rec["run_ids"][1]
    (out / gone).rename(tmp_path / gone)
    rep = _run_script(
        "--figure", "1", "--budget", "smoke", "--out", str(out), "--no-plots", "--report"
    )
    assert rep.returncode == 0, rep.stdout + rep.stderr
    assert "Not started: 1 of the 4 runs." in (out / "claims.md").read_text()
    assert json.loads((out / "claims.json").read_text())["not_started"] == [gone]
    assert not (out / gone).exists()  # and nothing started it


def test_bad_arguments_exit_2(tmp_path):
    res = _run_script(
        "--figure",
        "1",
        "--budget",
        "smoke",
        "--variant",
        "nope",
        "--out",
        str(tmp_path / "x"),
        "--no-plots",
    )
    assert res.returncode == 2
    assert "no variant 'nope'" in res.stderr
    assert not (tmp_path / "x").exists()
    res = _run_script(
        "--figure", "1", "--budget", "smoke", "--checkpoint-every", "0", "--out",
        str(tmp_path / "x"), "--no-plots",
    )  # fmt: skip
    assert res.returncode == 2 and "--checkpoint-every must be >= 1, got 0" in res.stderr
    assert not (tmp_path / "x").exists()


def test_dry_run_lists_the_resolved_runs(tmp_path):
    res = _run_script(
        "--figure",
        "8",
        "--budget",
        "short",
        "--seeds",
        "2",
        "--dry-run",
        "--out",
        str(tmp_path / "x"),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("12 runs in ") and "12 would run" in res.stdout
    # the sweep's own dry-run table: the budget's steps, each run's state and action
    assert res.stdout.count(" 300    new    run\n") == 12, res.stdout
    assert not (tmp_path / "x").exists()


def test_panels_select_the_runs_of_those_panels(tmp_path):
    # Fig. 2: panels b and c are the 6-run grid (f = 0.6, 0.7 x three loss formats), panel a
    # the three f = 0.4 runs; 3 seeds each.
    res = _run_script("--figure", "2", "--budget", "short", "--panels", "b", "c", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("18 runs in ")
    rows = [r for r in res.stdout.splitlines() if r.endswith(" run")]
    assert len(rows) == 18 and not any(" 0.4 " in r for r in rows)
    res = _run_script("--figure", "2", "--budget", "short", "--panels", "a", "--dry-run")
    assert res.stdout.startswith("9 runs in ") and res.stdout.count(" 0.4 ") == 9


def test_a_panel_subset_writes_its_own_files_in_the_shared_folder(tmp_path):
    pytest.importorskip("matplotlib")
    out, plots = tmp_path / "out", tmp_path / "plots"
    args = ["--figure", "8", "--budget", "smoke", "--out", str(out), "--plots-dir", str(plots)]
    res = _run_script(*args, "--panels", "global")
    assert res.returncode == 0, res.stderr
    assert (out / "claims-panels-global.md").is_file()
    assert (plots / "fig8-smoke-panels-global.png").is_file()
    assert not (out / "claims.md").exists() and not (plots / "fig8-smoke.png").exists()
    # The whole figure afterwards reuses the panel's runs and runs only the rest.
    res = _run_script(*args)
    assert res.returncode == 0, res.stderr
    assert (out / "claims.md").is_file() and (plots / "fig8-smoke.png").is_file()
    done = [line for line in res.stdout.splitlines() if "already done" in line]
    assert done and " 0 already done" not in done[0]


def test_unknown_panel_is_refused_before_anything_runs(tmp_path):
    res = _run_script(
        "--figure",
        "2",
        "--budget",
        "smoke",
        "--panels",
        "z",
        "--out",
        str(tmp_path / "x"),
        "--no-plots",
    )
    assert res.returncode == 2
    assert "unknown panel 'z'" in res.stderr and "a, b, c" in res.stderr
    assert not (tmp_path / "x").exists()


def test_a_refused_sweep_writes_nothing_into_a_folder_another_writer_holds(tmp_path):
    """A second ``reproduce.py`` into a folder another sweep is writing (here: its lock held)
    is refused in one line that says what to do, and writes nothing there: not its own
    ``reproduce*.json`` either, which would replace the running sweep's record of the same
    command."""
    import fcntl

    from numstab.run.outdir import LOCK_NAME

    out = tmp_path / "x"
    out.mkdir()
    record = out / "reproduce.json"
    record.write_text("the running sweep's record\n")
    with open(out / LOCK_NAME, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = _run_script("--figure", "8", "--budget", "smoke", "--out", str(out), "--no-plots")
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "is writing to" in err[0] and "another folder" in err[0]
    assert sorted(os.listdir(out)) == sorted([LOCK_NAME, "reproduce.json"])
    assert record.read_text() == "the running sweep's record\n"


def test_run_sweep_calls_on_start_once_it_holds_the_folder(tmp_path):
    """``run_sweep(on_start=...)`` is called once, with the folder claimed and before any run
    starts; a refused sweep never calls it."""
    _, sw = _resolved("8", "smoke", seeds=1)
    out = tmp_path / "x"
    seen = []

    def on_start():
        from numstab.run import outdir

        busy = pytest.raises(outdir.DirectoryBusy)  # held by this sweep
        with busy:
            outdir.claim(str(out))
        seen.append(sorted(p.name for p in out.iterdir() if p.is_dir()))

    S.run_sweep(sw, out, quiet=True, on_start=on_start)
    assert seen == [[]]  # no run folder yet
    with pytest.raises(S.UsageError):
        S.run_sweep(sw, out, workers=0, quiet=True, on_start=lambda: seen.append("refused"))
    assert seen == [[]]


# --- figure SPECs, budgets, seeds, variants ----------------------------------------------------


def _resolved(figure, budget, **kw):
    spec = R.load_figure_spec(R.spec_path(figure))
    sw = S.parse_spec(R.resolve(spec, budget, **kw))
    return spec, sw


@pytest.mark.parametrize("figure", list(R.FIGURES))
def test_every_spec_resolves_for_every_budget(figure):
    spec = R.load_figure_spec(R.spec_path(figure))
    assert set(R.BUDGETS) <= set(spec.reproduce["budget"])
    assert spec.claims in C.CLAIMS and spec.panels
    base = S.parse_spec(dict(spec.sweep))  # the file without [reproduce] is a plain SPEC
    for budget in R.BUDGETS:
        for variant in [None, *spec.reproduce.get("variants", {})]:
            sw = S.parse_spec(R.resolve(spec, budget, variant=variant))
            seeds = {r.config.seed for r in sw.runs}
            if budget == "smoke":
                assert seeds == {0}
                assert all(r.config.steps <= 60 for r in sw.runs)
                assert all(max(r.config.hidden) <= 32 for r in sw.runs)  # tiny networks
                # the small modulus, on the runs that read it (not parity's, not digits')
                assert all(r.config.p == 23 for r in sw.runs if r.config.task in MODULAR_OPS)
                assert all(r.config.p == 113 for r in sw.runs if r.config.task not in MODULAR_OPS)
                assert len(sw.runs) == len(base.runs)
            else:
                assert seeds == {0, 1, 2}
                assert len(sw.runs) == 3 * len(base.runs)
            if budget == "full":  # the paper's step counts: what the file says
                assert sorted(r.config.steps for r in sw.runs) == sorted(
                    r.config.steps for r in base.runs for _ in range(3)
                )
            for panel in spec.panels:  # every panel draws something
                assert any(
                    R.config_matches(r.config.to_dict(), panel.get("match")) for r in sw.runs
                ), (figure, budget, panel["name"])


def test_fig1_budgets_cap_steps_per_panel():
    _spec, short = _resolved("1", "short")
    by_panel = {}
    for r in short.runs:
        c = r.config
        key = c.perp_grad or c.loss
        by_panel.setdefault(key, set()).add((c.steps, c.log_every))
    assert by_panel == {
        "tensor": {(300, 5)},
        "global": {(300, 5)},
        "stablemax": {(3000, 25)},
        "softmax": {(3000, 25)},
    }
    _spec, full = _resolved("1", "full")
    assert {r.config.steps for r in full.runs if r.config.perp_grad is None} == {80000}
    assert "seed" in full.columns and "perp_grad" in full.columns


def test_runs_are_replicated_seed_by_seed():
    # seed 0 of every configuration first: a sweep cut short covers every configuration
    _spec, sw = _resolved("2", "short")
    seeds = [r.config.seed for r in sw.runs]
    per = len(sw.runs) // 3
    assert seeds == [0] * per + [1] * per + [2] * per
    first = [(r.config.train_fraction, r.config.loss_dtype) for r in sw.runs[:per]]
    assert len(set(first)) == per  # every configuration once in the first wave
    assert first == [(r.config.train_fraction, r.config.loss_dtype) for r in sw.runs[per:2 * per]]


def test_seeds_option_overrides_the_budget():
    _spec, sw = _resolved("5", "short", seeds=5)
    assert sorted(r.config.seed for r in sw.runs) == [0, 1, 2, 3, 4]
    _spec, sw = _resolved("6", "smoke", seeds=2)
    assert len(sw.runs) == 10 and {r.config.seed for r in sw.runs} == {0, 1}
    spec = R.load_figure_spec(R.spec_path("5"))
    with pytest.raises(R.FigureSpecError):
        R.resolve(spec, "short", seeds=0)
    with pytest.raises(R.FigureSpecError, match="no \\[reproduce.budget.huge\\]"):
        R.resolve(spec, "huge")


def test_authors_variant_changes_only_the_perp_adamw_runs():
    _spec, paper = _resolved("1", "short")
    _spec, authors = _resolved("1", "short", variant="authors")
    assert len(paper.runs) == len(authors.runs)
    for r in authors.runs:
        c = r.config
        if c.perp_grad is not None:
            assert (c.beta1, c.beta2, c.eps) == (0.9, 0.999, 1e-8)
        elif c.loss == "stablemax":
            assert (c.beta2, c.eps, c.stablemax_eps) == (0.999, 1e-25, 1e-30)
        else:
            assert (c.beta2, c.eps, c.stablemax_eps) == (0.99, 1e-25, 0.0)
    for r in paper.runs:
        assert r.config.eps == 1e-25 and r.config.stablemax_eps == 0.0
    assert {r.id for r in paper.runs}.isdisjoint(
        {r.id for r in authors.runs if r.config.loss == "stablemax" or r.config.perp_grad}
    )


def test_fig8_smoke_rules_move_the_intervention():
    _spec, sw = _resolved("8", "smoke")
    assert sorted((r.config.zero_target_grad_from or -1) for r in sw.runs) == [
        -1,
        -1,
        20,
        20,
        40,
        40,
    ]
    _spec, sw = _resolved("8", "full")
    assert {r.config.zero_target_grad_from for r in sw.runs} == {None, 40, 60}


SPEC_TEXT = """
description = "test"
[base]
p = 11
hidden = [8]
steps = 100
log_every = 10
[axes]
dtype = ["float32", "float64"]
[[runs]]
dtype = "float16"
lr = 0.5
[reproduce]
figure = "9"
claims = "fig1"
seeds = 2
[reproduce.budget.tiny]
seeds = 1
max_steps = 20
lr = 0.25
[[reproduce.budget.tiny.rules]]
match = { dtype = ["float16", "float64"] }
steps = 7
[reproduce.budget.big]
max_log_every = 4
[reproduce.budget.clash]
dtype = "float32"
[[reproduce.panels]]
name = "all"
match = {}
"""


def _custom(tmp_path, text=SPEC_TEXT):
    p = tmp_path / "fig9.toml"
    p.write_text(text)
    return R.load_figure_spec(p)


def test_budget_forced_fields_rules_and_caps(tmp_path):
    spec = _custom(tmp_path)
    assert spec.stem("tiny") == "fig9-tiny" and spec.stem("tiny", "authors") == "fig9-authors-tiny"
    sw = S.parse_spec(R.resolve(spec, "tiny"))
    got = {r.config.dtype: (r.config.steps, r.config.lr, r.config.seed) for r in sw.runs}
    # forced lr beats the [[runs]] value; the rule applies to the matching runs only; the cap
    # applies after the rule (7 < 20 stays)
    assert got == {"float32": (20, 0.25, 0), "float64": (7, 0.25, 0), "float16": (7, 0.25, 0)}
    big = S.parse_spec(R.resolve(spec, "big"))
    assert len(big.runs) == 6  # [reproduce] seeds = 2 replicates grid AND [[runs]]
    assert {(r.config.dtype, r.config.seed) for r in big.runs} == {
        (d, s) for d in ("float16", "float32", "float64") for s in (0, 1)
    }
    assert {r.config.log_every for r in big.runs} == {4}
    assert {r.config.lr for r in big.runs if r.config.dtype == "float16"} == {0.5}
    with pytest.raises(R.FigureSpecError, match="resolve to the same configuration"):
        R.resolve(spec, "clash")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[reproduce.budget.bad]\nstepz = 3\n", "stepz"),
        ("[reproduce.budget.bad]\nmax_steps = 0\n", "max_steps"),
        ("[[reproduce.budget.bad.rules]]\nmatch = { colour = 1 }\n", "colour"),
    ],
)
def test_malformed_reproduce_tables_are_reported(tmp_path, extra, message):
    with pytest.raises(R.FigureSpecError, match=message):
        _custom(tmp_path, SPEC_TEXT + extra)


def test_config_matches():
    cfg = TrainConfig(perp_grad="tensor", hidden=(32, 32)).to_dict()
    assert R.config_matches(cfg, {})
    assert R.config_matches(cfg, {"perp_grad": ["tensor", "global"]})
    assert not R.config_matches(cfg, {"perp_grad": "none"})
    assert R.config_matches(cfg, {"loss_dtype": "none", "lr": 0.01})
    assert R.config_matches(cfg, {"hidden": [32, 32]})
    assert R.config_matches(cfg, {"hidden": [[16], [32, 32]]})
    assert not R.config_matches(cfg, {"hidden": [32]})
    assert not R.config_matches(cfg, {"bias": 0})  # booleans are not numbers


# --- claims on synthetic results ---------------------------------------------------------------


def _cfg(**kw):
    return TrainConfig(**kw).to_dict()


def _rows(rid, steps, **series):
    """Metric rows: series given as name=(split, values) or name=(split, layer, values)."""
    out = []
    for metric, spec in series.items():
        metric = metric.split("__")[0]
        split, layer, values = spec if len(spec) == 3 else (spec[0], "", spec[1])
        for s, v in zip(steps, values, strict=True):
            out.append((rid, s, split, metric, layer, v))
    return out


def _fig2_results(final_by_seed, *, prefix="", **config):
    """fig2-like results: f = 0.6, three loss dtypes, a final test accuracy per seed/dtype
    (``config``: further TrainConfig fields, ``prefix`` for the run ids)."""
    configs, rows = {}, []
    config = {"lr": 5e-4, **config}
    for seed, finals in final_by_seed.items():
        for dt, fin in zip(C.PRECISION_ORDER, finals, strict=True):
            rid = f"{prefix}{dt}-{seed}"
            configs[rid] = _cfg(train_fraction=0.6, loss_dtype=dt, seed=seed, **config)
            sc = {"float16": [0, 0.6, 1.0], "float32": [0, 0.2, 0.7], "float64": [0, 0, 0.1]}
            rows += _rows(
                rid,
                [0, 100, 200],
                accuracy=("test", [0.0, fin / 2, fin]),
                sc_fraction=("train", sc[dt]),
            )
    return Results.from_rows(configs, rows)


def test_fig2_ordering_holds_and_fails_per_seed():
    res = _fig2_results({0: [0.1, 0.5, 0.9], 1: [0.3, 0.2, 0.9]})
    out = C.fig2_claims(res)
    order = out["fig2.order_final_test_acc"]["rows"]
    assert len(order) == 1 and order[0]["group"] == {"train_fraction": 0.6}
    assert [(e["seed"], e["value"]) for e in order[0]["values"]] == [(0, True), (1, False)]
    assert (order[0]["n_true"], order[0]["n_false"], order[0]["n_none"]) == (1, 1, 0)
    assert order[0]["values"][1]["by_level"] == {"float16": 0.3, "float32": 0.2, "float64": 0.9}
    # SC-50: float16 at 100, float32 at 200, float64 never (= after the run): holds
    sc = out["fig2.order_sc50_step"]["rows"][0]
    assert sc["n_true"] == 2
    steps = {r["group"]["loss_dtype"]: r for r in out["fig2.sc50_step"]["rows"]}
    assert steps["float16"]["mean"] == 100 and steps["float32"]["mean"] == 200
    assert steps["float64"]["n_value"] == 0 and steps["float64"]["mean"] is None
    fin = {r["group"]["loss_dtype"]: r for r in out["fig2.final_test_acc"]["rows"]}
    assert fin["float16"]["mean"] == pytest.approx(0.2)
    assert fin["float16"]["std"] == pytest.approx(np.std([0.1, 0.3], ddof=1))
    assert fin["float64"]["std"] == 0.0 and fin["float64"]["n"] == 2


def test_fig9_claims_read_the_sgd_runs_only():
    """Fig. 9 is Fig. 2's claims over the SGD runs: AdamW runs in the same folder are ignored,
    and an ordering that fails under SGD fails in Fig. 9 whatever the AdamW runs say."""
    adamw = _fig2_results({0: [0.1, 0.5, 0.9]})
    sgd = _fig2_results(
        {0: [0.3, 0.2, 0.9]}, prefix="sgd-", optimizer="sgd", lr=0.1, normalized_lr=True
    )
    configs = {rid: r.config for rid, r in [*adamw.runs.items(), *sgd.runs.items()]}
    rows = [
        (key[0], step, *key[1:], v)
        for res in (adamw, sgd)
        for key, (steps, values) in res.series_map.items()
        for step, v in zip(steps, values, strict=True)
    ]
    res = Results.from_rows(configs, rows)
    fig9 = C.fig9_claims(res)
    assert set(fig9) == {k.replace("fig2.", "fig9.") for k in C.fig2_claims(res)}
    order = fig9["fig9.order_final_test_acc"]["rows"][0]
    assert [(e["seed"], e["value"]) for e in order["values"]] == [(0, False)]
    assert order["values"][0]["by_level"] == {"float16": 0.3, "float32": 0.2, "float64": 0.9}
    # Fig. 2's claims see both optimizers' runs (its SPEC has AdamW only)
    assert C.fig2_claims(res)["fig2.final_test_acc"]["rows"][0]["n"] == 2


def test_fig2_ordering_all_hold():
    res = _fig2_results({0: [0.1, 0.5, 0.9], 1: [0.0, 0.2, 0.3], 2: [0.4, 0.5, 0.6]})
    row = C.fig2_claims(res)["fig2.order_final_test_acc"]["rows"][0]
    assert (row["n_true"], row["n"]) == (3, 3)
    # a missing dtype for a seed makes that seed undecided, not a pass
    del res.runs["float32-2"]
    row = C.fig2_claims(res)["fig2.order_final_test_acc"]["rows"][0]
    assert (row["n_true"], row["n_none"]) == (2, 1)


def test_ordering_holds():
    assert C.ordering_holds([1, 2, 3]) is True
    assert C.ordering_holds([1, 3, 2]) is False
    assert C.ordering_holds([1, 1, 2]) is False  # strict
    assert C.ordering_holds([1, None, 3]) is None
    assert C.ordering_holds([1, 2, None], missing_is_inf=True) is True
    assert C.ordering_holds([None, 2, 3], missing_is_inf=True) is False
    assert C.ordering_holds([1, None, None], missing_is_inf=True) is None


def test_fig1_test95_step_mean_std_and_failed_runs():
    configs, rows = {}, []
    for seed, hit in ((0, 150), (1, 170)):
        rid = f"a{seed}"
        configs[rid] = _cfg(perp_grad="tensor", seed=seed, steps=300)
        acc = [0.0 if s < hit else 0.97 for s in range(0, 301, 10)]
        rows += _rows(rid, list(range(0, 301, 10)), accuracy=("test", acc))
    configs["a2"] = _cfg(perp_grad="tensor", seed=2, steps=300)
    rows += _rows("a2", [0, 10], accuracy=("test", [0.0, 0.99]))  # failed: never measured
    configs["a3"] = _cfg(perp_grad="tensor", seed=3, steps=300)
    rows += _rows("a3", [0, 10, 300], accuracy=("test", [0.0, 0.1, 0.5]))  # never reached
    res = Results.from_rows(configs, rows, status={"a2": "failed"})
    row = C.fig1_claims(res)["fig1a.test95_step"]["rows"][0]
    assert row["group"] == {"perp_grad": "tensor"}
    assert (row["n"], row["n_value"], row["n_failed"]) == (3, 2, 1)
    assert row["mean"] == 160 and row["std"] == pytest.approx(np.std([150, 170], ddof=1))
    assert [e["value"] for e in row["values"]] == [150, 170, None]
    md = C.render_markdown(C.fig1_claims(res))
    assert "160 ± 14 [150, 170] (2/3 reached)" in md and "(+1 failed)" in md
    # panels without runs still give an entry, rendered as "(no runs)"
    assert C.fig1_claims(res)["fig1b.max_test_acc"]["rows"] == []
    assert "(no runs)" in md


def test_fig8_frozen_vs_reference():
    steps = list(range(0, 101, 10))
    configs = {
        "int": _cfg(perp_grad="tensor", zero_target_grad_from=40),
        "ref": _cfg(perp_grad="tensor"),
    }
    rows = _rows(
        "int", steps, accuracy=("test", [0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.405, 0.4, 0.4, 0.4])
    )
    rows += _rows(
        "ref", steps, accuracy=("test", [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    )
    out = C.fig8_claims(Results.from_rows(configs, rows))
    frozen = {
        (r["group"]["zero_target_grad_from"], r["group"].get("s")): r
        for r in out["fig8.frozen"]["rows"]
    }
    assert frozen[(40, None)]["n_true"] == 1
    assert frozen[(None, 40)]["n_false"] == 1
    change = {
        r["group"]["zero_target_grad_from"]: r for r in out["fig8.max_change_after_s"]["rows"]
    }
    assert change[40]["mean"] == pytest.approx(0.005)
    assert change[None]["mean"] == pytest.approx(0.6)
    at = {r["group"]["zero_target_grad_from"]: r for r in out["fig8.test_acc_at_s"]["rows"]}
    assert at[40]["mean"] == pytest.approx(0.4) and at[40]["values"][0]["at_step"] == 40
    # an intervention at or after the last logged step never acted: no value
    configs["late"] = _cfg(perp_grad="tensor", zero_target_grad_from=100)
    rows += _rows("late", steps, accuracy=("test", [0.5] * 11))
    out = C.fig8_claims(Results.from_rows(configs, rows))
    late = [r for r in out["fig8.frozen"]["rows"] if r["group"]["zero_target_grad_from"] == 100]
    assert late[0]["n_none"] == 1


def test_fig5_nlm_cosine_after_train100():
    steps = [0, 50, 100, 150, 200]
    rows = _rows(
        "r",
        steps,
        accuracy=("train", [0.1, 0.9, 1.0, 1.0, 1.0]),
        nlm_cos_grad__w3=("train", "W3", [0.0, 0.95, 0.2, 0.9, 0.6]),
        nlm_cos_grad__w1=("train", "W1", [0.0, 0.1, 0.1, 0.3, 0.2]),
        nlm_cos_grad__g=("train", "global", [0.0, 0.2, 0.1, 0.5, 0.4]),
    )
    res = Results.from_rows({"r": _cfg()}, rows)
    assert res.layers("r", "nlm_cos_grad") == ["W1", "W3", "global"]
    out = C.fig5_claims(res)
    row = out["fig5.max_output_cos_after_train100"]["rows"][0]
    assert row["mean"] == pytest.approx(0.9)  # the 0.95 before train 100 % does not count
    assert row["values"][0]["layer"] == "W3" and row["values"][0]["train100_step"] == 100
    assert out["fig5.output_cos_at_train100"]["rows"][0]["mean"] == pytest.approx(0.2)
    assert out["fig5.max_global_cos_after_train100"]["rows"][0]["mean"] == pytest.approx(0.5)
    assert out["fig5.train100_step"]["rows"][0]["mean"] == 100


def test_fig6_accuracy_at_500_uses_the_last_logged_step():
    configs = {
        "adam": _cfg(lr=5e-3, steps=400),
        "perp": _cfg(lr=5e-3, steps=600, perp_grad="tensor"),
    }
    rows = _rows("adam", [0, 200, 400], accuracy=("test", [0.0, 0.1, 0.2]))
    rows += _rows("perp", [0, 250, 500, 600], accuracy=("test", [0.0, 0.5, 0.97, 0.2]))
    out = C.fig6_claims(Results.from_rows(configs, rows))
    got = {r["group"]["perp_grad"]: r["values"][0] for r in out["fig6.test_acc_at_500"]["rows"]}
    assert (got[None]["value"], got[None]["step"]) == (0.2, 400)
    assert (got["tensor"]["value"], got["tensor"]["step"]) == (0.97, 500)


def test_fig4_grokking_delay_per_encoding():
    """One-hot inputs: train 100 % at step 100, test >= 0.95 at 300 (delay 200); compact
    inputs: both at step 100 (delay 0); a run that never generalises has no delay."""
    steps = [0, 100, 200, 300]
    configs = {
        "hot": _cfg(loss="stablemax", encoding="onehot"),
        "bin": _cfg(loss="stablemax", encoding="binary"),
        "bin1": _cfg(loss="stablemax", encoding="binary", seed=1),
    }
    rows = _rows(
        "hot",
        steps,
        accuracy__tr=("train", [0.1, 1.0, 1.0, 1.0]),
        accuracy__te=("test", [0.0, 0.1, 0.5, 0.96]),
    )
    rows += _rows(
        "bin",
        steps,
        accuracy__tr=("train", [0.1, 1.0, 1.0, 1.0]),
        accuracy__te=("test", [0.0, 0.97, 0.99, 0.99]),
    )
    rows += _rows(
        "bin1",
        steps,
        accuracy__tr=("train", [0.1, 1.0, 1.0, 1.0]),
        accuracy__te=("test", [0.0, 0.2, 0.3, 0.4]),
    )
    out = C.fig4_claims(Results.from_rows(configs, rows))
    got = {
        r["group"]["encoding"]: [e["value"] for e in r["values"]]
        for r in out["fig4.grokking_delay"]["rows"]
    }
    assert got == {"onehot": [200], "binary": [0, None]}


def test_r_squared_against_closed_forms():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    assert C.r_squared(3 * x + 1, x) == pytest.approx(1.0, abs=1e-12)  # exact line
    # y = (0, 1, 0, 1) on x = (0, 1, 2, 3): slope 0.2, residuals (0.3, -0.1 ... ) -> R² = 0.2
    assert C.r_squared([0.0, 1.0, 0.0, 1.0], x) == pytest.approx(0.2, abs=1e-12)
    assert C.r_squared([1.0, 1.0, 1.0, 1.0], x) is None  # nothing to explain
    assert C.r_squared([1.0, 2.0], [0.0, 1.0]) is None  # as many points as coefficients


LOGITSCALE_STEPS = [0, 100, 200, 300, 400, 500, 600]


def _logitscale_runs(cases, **config):
    """Synthetic runs ``(id, T, |z|, delay)``: train 100 % from step 100, test 0.99 from
    ``100 + delay``, ``logit_norm`` constant ``|z|``, weight norm ``10 + step``."""
    steps = LOGITSCALE_STEPS
    configs, rows = {}, []
    for rid, temp, znorm, grok in cases:
        configs[rid] = _cfg(temperature=temp, init_scale=1.0, seed=0, **config)
        rows += _rows(
            rid,
            steps,
            accuracy__tr=("train", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
            accuracy__te=("test", [0.0 if s < 100 + grok else 0.99 for s in steps]),
            logit_norm=("train", [znorm] * len(steps)),
            weight_norm=("train", "global", [10.0 + s for s in steps]),
        )
    return configs, rows


def test_logitscale_claims_fit_the_delay():
    """Four runs whose delay is 100·log(|z|/T) exactly: R² 1 for the logit scale; the weight
    norm at train 100 % is read at that step; a run that never generalises is left out."""
    steps = LOGITSCALE_STEPS
    cases = [("a", 1.0, 2.0, 100), ("b", 2.0, 2.0, 200), ("c", 1.0, 8.0, 300), ("d", 0.5, 1.0, 300)]
    configs, rows = _logitscale_runs(cases)
    configs["never"] = _cfg(temperature=4.0, seed=1)
    rows += _rows(
        "never", steps, accuracy__tr=("train", [1.0] * 7), accuracy__te=("test", [0.0] * 7)
    )
    out = C.logitscale_claims(Results.from_rows(configs, rows))
    # delays 100, 200, 300, 300 at |z|/T = 2, 1, 8, 2: not a function of the scale alone
    r2 = {r["group"]["predictor"]: r for r in out["logitscale.r2"]["rows"]}
    assert r2["log effective logit scale"]["n"] == 4
    d = np.array([100.0, 200.0, 300.0, 300.0])
    want = C.r_squared(d, np.log([2.0, 1.0, 8.0, 2.0]))
    assert r2["log effective logit scale"]["mean"] == pytest.approx(want, abs=1e-12)
    norms = {r["group"]["temperature"]: r["mean"] for r in out["logitscale.weight_norm"]["rows"]}
    assert norms[1.0] == 110.0 and norms[4.0] is None  # at step 100 (train 100 %); none logged
    delays = {
        r["group"]["temperature"]: r["values"][0]["value"]
        for r in out["logitscale.grokking_delay"]["rows"]
    }
    assert delays[4.0] is None and delays[0.5] == 300


def test_logitscale_claims_per_loss_format():
    """With the loss in several formats, every row is per ``loss_dtype`` (``none``: the model's
    format) and R² is fitted within each: float16's delays are an exact line in log(|z|/T)
    (R² 1), the model-format runs' are not a function of it (the R² of a closed form); with
    one format no row names it (the float32-only figure's tables stay as they were)."""
    # delay 100 + 100·log2(|z|/T) steps: a line in log(|z|/T)
    half = _logitscale_runs(
        [("h1", 1.0, 2.0, 200), ("h2", 1.0, 4.0, 300), ("h3", 2.0, 16.0, 400)], loss_dtype="float16"
    )
    own = _logitscale_runs(
        [("o1", 1.0, 2.0, 200), ("o2", 2.0, 2.0, 100), ("o3", 1.0, 8.0, 200)], loss_dtype=None
    )
    both = Results.from_rows({**half[0], **own[0]}, half[1] + own[1])
    out = C.logitscale_claims(both)
    r2 = {(r["group"]["loss_dtype"], r["group"]["predictor"]): r
          for r in out["logitscale.r2"]["rows"]}  # fmt: skip
    assert r2["float16", "log effective logit scale"]["mean"] == pytest.approx(1.0, abs=1e-12)
    want = C.r_squared([200.0, 100.0, 200.0], np.log([2.0, 1.0, 8.0]))
    assert r2[None, "log effective logit scale"]["mean"] == pytest.approx(want, abs=1e-12)
    assert r2[None, "log effective logit scale"]["n"] == 3 and len(r2) == 6
    delays = {
        (r["group"]["loss_dtype"], r["group"]["temperature"]): [v["value"] for v in r["values"]]
        for r in out["logitscale.grokking_delay"]["rows"]
    }
    assert delays == {("float16", 1.0): [200, 300], ("float16", 2.0): [400],
                      (None, 1.0): [200, 200], (None, 2.0): [100]}  # fmt: skip
    alone = C.logitscale_claims(Results.from_rows(own[0], own[1]))
    assert all("loss_dtype" not in r["group"] for e in alone.values() for r in e["rows"])


def test_glitch_claims_violation_and_norm_growth():
    """A closed form: ‖θ‖ = 3·exp(r·t/1000) over the second half gives the slope r exactly
    (float64 least squares on exact exponentials: 1e-9 absolute covers their rounding); the
    first half (another rate) is left out; the mean zero-sum violation is the mean of the
    logged values."""
    steps = list(range(0, 2001, 100))
    configs, rows = {}, []
    for dt, rate, zsv in (("float16", 0.8, 1e-3), ("float64", 0.3, 0.0)):
        rid = f"{dt}-0"
        configs[rid] = _cfg(loss_dtype=dt, seed=0)
        norms = [3 * math.exp((2.0 if s < 1000 else rate) * s / 1000) for s in steps]
        rows += _rows(
            rid,
            steps,
            weight_norm=("train", "global", norms),
            zero_sum_violation=("train", [zsv * (s / 2000) for s in steps]),
        )
    out = C.glitch_claims(Results.from_rows(configs, rows))
    got = {r["group"]["loss_dtype"]: r["mean"] for r in out["glitch.norm_growth_rate"]["rows"]}
    assert got["float16"] == pytest.approx(0.8, abs=1e-9)
    assert got["float64"] == pytest.approx(0.3, abs=1e-9)
    zsv = {
        r["group"]["loss_dtype"]: r["mean"] for r in out["glitch.mean_zero_sum_violation"]["rows"]
    }
    assert zsv == {"float16": pytest.approx(0.5e-3), "float64": 0.0}
    assert C.norm_growth_rate([0, 10], [1.0, 2.0]) is None  # fewer than 3 points


def test_zerosum_claims_share_and_norms_per_format_and_intervention():
    """The violation's share of the radial gradient is the median of violation / radial over
    the steps with at least a quarter of the rows collapsed (here the steps 300-400: ratios
    0.9 and 0.8, median 0.85; the step 100 ratio 5 and the step 200 ratio 0.5, with fewer
    collapsed rows, are left out), and the scale it is measured at the medians of |radial|
    (1 and 4: 2.5) and of the loss (1e-16 and 3e-16: 2e-16) over the same steps; the
    weight-norm claims are the logged global norm's maximum and last value; runs are grouped
    by format and intervention."""
    steps = [0, 100, 200, 300, 400]
    configs, rows = {}, []
    for rid, zs, norms in (("plain", None, [1, 5, 9, 7, 6]), ("centred", 0, [1, 2, 3, 3, 4])):
        configs[rid] = _cfg(loss_dtype="float16", zero_sum_grad_from=zs, seed=0)
        rows += _rows(
            rid,
            steps,
            sc_fraction=("train", [0, 0, 0.2, 0.6, 1.0]),
            radial_grad=("train", [0.0, 1.0, -2.0, -1.0, 4.0]),
            radial_grad_violation=("train", [0.0, 5.0, -1.0, -0.9, 3.2]),
            loss=("train", [4.0, 1.0, 0.5, 1e-16, 3e-16]),
            weight_norm=("train", "global", norms),
        )
    out = C.zerosum_claims(Results.from_rows(configs, rows))

    def by_run(key):
        return {r["group"]["zero_sum_grad_from"]: r["mean"] for r in out[key]["rows"]}

    assert by_run("zerosum.violation_radial_share") == {
        None: pytest.approx(0.85),
        0: pytest.approx(0.85),
    }
    assert by_run("zerosum.collapsed_radial_grad") == {None: 2.5, 0: 2.5}
    assert by_run("zerosum.collapsed_loss") == {None: pytest.approx(2e-16), 0: pytest.approx(2e-16)}
    assert C.collapsed_median([0, 0.2], [1.0, 2.0]) is None  # no step collapsed enough
    assert by_run("zerosum.max_weight_norm") == {None: 9.0, 0: 4.0}
    assert by_run("zerosum.final_weight_norm") == {None: 6.0, 0: 4.0}
    assert by_run("zerosum.sc50_step") == {None: 300, 0: 300}
    assert C.violation_radial_share([0, 0.2], [1.0, 2.0], [1.0, 1.0]) is None  # too few collapsed


def test_slingshot_claims_group_by_setting_and_format():
    """Issue #4's reading: per (lr, beta2, loss format) the step test accuracy first reaches
    0.95 and the final train accuracy, from the logged values."""
    steps = [0, 100, 200, 300, 400]
    configs, rows = {}, []
    cases = [  # (run, lr, beta2, loss format, test accuracy, train accuracy)
        ("f32", 0.01, 0.99, "float32", [0, 0, 0.5, 0.96, 0.99], [1.0] * 5),
        ("f64", 0.01, 0.99, "float64", [0, 0, 0, 0.2, 0.97], [1.0] * 5),
        ("b2", 0.01, 0.999, "float32", [0, 0, 0, 0, 0], [1.0, 1.0, 1.0, 0.4, 0.3]),
    ]
    for rid, lr, beta2, dt, test, train in cases:
        configs[rid] = _cfg(lr=lr, beta2=beta2, loss_dtype=dt, seed=0)
        rows += _rows(rid, steps, accuracy__te=("test", test), accuracy__tr=("train", train))
    out = C.slingshot_claims(Results.from_rows(configs, rows))

    def by_group(key):
        return {
            (r["group"]["beta2"], r["group"]["loss_dtype"]): r["values"][0]["value"]
            for r in out[key]["rows"]
        }

    assert by_group("slingshot.test95_step") == {
        (0.99, "float32"): 300,
        (0.99, "float64"): 400,
        (0.999, "float32"): None,
    }
    assert by_group("slingshot.final_train_acc")[(0.999, "float32")] == 0.3


def test_lowest_train_accuracy_after_fit_against_closed_forms():
    """Fitted (>= 0.99) at step 200, then 0.4 at 400 and 0.4 again at 600: the first of the
    two minima; never fitted, or fitted at the last logged step: None; a run that never
    falls back gives its lowest value at or above the threshold."""
    steps = [0, 100, 200, 300, 400, 500, 600]
    assert C.lowest_after_fit(steps, [0, 0.5, 0.99, 1.0, 0.4, 0.9, 0.4]) == (0.4, 400)
    assert C.lowest_after_fit(steps, [0, 0.5, 0.9, 0.98, 0.9, 0.9, 0.9]) is None
    assert C.lowest_after_fit(steps, [0, 0, 0, 0, 0, 0, 1.0]) is None
    assert C.lowest_after_fit(steps, [0, 1.0, 1.0, 0.995, 1.0, 1.0, 1.0]) == (0.995, 300)
    # the threshold is a parameter: fitted at 0.5 from step 100, lowest later 0.4 at 400
    assert C.lowest_after_fit(steps, [0, 0.5, 0.99, 1.0, 0.4, 0.9, 0.4], fit=0.5) == (0.4, 400)


def test_slingshot_claims_train_accuracy_collapse():
    """The rows for the authors' beta2 0.999 remedy: a run that fits its training set and
    then falls to 0.3 (step 400) against one that stays fitted."""
    steps = [0, 100, 200, 300, 400, 500]
    configs, rows = {}, []
    for rid, beta2, train in (
        ("b2", 0.999, [0.1, 1.0, 1.0, 0.6, 0.3, 0.5]),
        ("b1", 0.99, [0.1, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ):
        configs[rid] = _cfg(lr=0.01, beta2=beta2, loss_dtype="float32", seed=0)
        rows += _rows(rid, steps, accuracy=("train", train))
    out = C.slingshot_claims(Results.from_rows(configs, rows))

    def by_beta2(key):
        return {r["group"]["beta2"]: r["values"][0]["value"] for r in out[key]["rows"]}

    assert by_beta2("slingshot.train_acc_low") == {0.99: 1.0, 0.999: 0.3}
    assert by_beta2("slingshot.train_acc_low_step") == {0.99: 300, 0.999: 400}


@given(loss=st.lists(st.one_of(st.just(0.0), st.floats(1e-30, 1e3)), min_size=1, max_size=40))
@example(loss=[1.0, 0.1, 2.0, 30.0, 0.01, 0.0, 5.0])  # a spike over two steps; a rise from 0
@example(loss=[1e-3, 1e-2, 1e-3, 1e-2])  # exactly x10: two spikes
def test_loss_spike_steps_against_a_direct_reading(loss):
    """A spike starts at logged step i when ``loss[i] >= 10 loss[i-1] > 0`` and step i-1 is
    not itself part of the spike; read here element by element against the vectorised
    :func:`analysis.claims.loss_spike_steps`."""
    steps = [100 * i for i in range(len(loss))]
    rises = [i > 0 and loss[i - 1] > 0 and loss[i] >= 10 * loss[i - 1] for i in range(len(loss))]
    want = [steps[i] for i in range(len(loss)) if rises[i] and not rises[i - 1]]
    assert C.loss_spike_steps(steps, loss).tolist() == want


def test_spike_claims_count_first_and_interval():
    """The spike rows of the slingshot claims (and Fig. 1c's): count, first step, median
    interval, from a loss series with spikes at steps 200, 600 and 1 200."""
    steps = list(range(0, 1400, 100))
    loss = [1, 0.5, 8, 0.1, 0.01, 0.001, 1, 0.1, 0.01, 0.001, 1e-4, 1e-5, 1e-3, 1e-4]
    configs = {"a": _cfg(lr=0.01, beta2=0.99, loss_dtype="float32", seed=0)}
    out = C.slingshot_claims(Results.from_rows(configs, _rows("a", steps, loss=("train", loss))))

    def value(key):
        return out[key]["rows"][0]["values"][0]["value"]

    assert value("slingshot.loss_spikes") == 3
    assert value("slingshot.first_loss_spike") == 200
    assert value("slingshot.loss_spike_interval") == 500  # median of 400 and 600


def test_spike_window_gain_against_closed_forms():
    """Accuracy 0 up to step 200, 0.25 from the spike at 300, 0.75 from the spike at 700 and
    1 at step 1 000 (logged every 100): with 100-step windows the spikes own 0.25 + 0.5 of
    the change of 1 and cover 200 of the 700 steps from the first spike on; a window reaching
    into the next spike's is cut before it; no spike, no value before the first, or no
    change: None."""
    steps = list(range(0, 1100, 100))
    acc = [0, 0, 0, 0.25, 0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 1.0]
    assert C.spike_window_gain([300, 700], steps, acc, window=100) == (0.75, 200 / 700)
    # the whole change in the windows: every rise comes at a spike and the windows reach it
    assert C.spike_window_gain([300, 700], steps, acc, window=400)[0] == 1.0
    # spikes at 300 and 350: the first window ends at 349 (the value logged at 300)
    assert C.spike_window_gain([300, 350], steps, acc, window=100) == (0.25, (49 + 100) / 700)
    assert C.spike_window_gain([], steps, acc) is None
    assert C.spike_window_gain([0], steps, acc) is None  # nothing logged before it
    assert C.spike_window_gain([300], steps, [0.5] * 11) is None  # no change


def test_slingshot_claims_share_of_the_test_gain_at_spikes():
    """The slingshot claims' window rows read the loss spikes and the test accuracy of each
    run (spikes at 200 and 600; the test accuracy rises 0.125 in the 600 steps after each)."""
    steps = list(range(0, 1400, 100))
    loss = [1, 0.5, 8, 0.1, 0.01, 0.001, 1, 0.1, 0.01, 0.001, 1e-4, 1e-5, 1e-5, 1e-5]
    test = [0, 0, 0, 0.125, 0.125, 0.125, 0.125, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.5]
    configs = {"a": _cfg(lr=0.01, beta2=0.99, loss_dtype="float32", seed=0)}
    rows = _rows("a", steps, loss=("train", loss), accuracy=("test", test))
    out = C.slingshot_claims(Results.from_rows(configs, rows))
    share = out["slingshot.test_gain_at_spikes"]["rows"][0]["values"][0]["value"]
    steps_share = out["slingshot.spike_window_steps"]["rows"][0]["values"][0]["value"]
    # windows [200, 599] and [600, 1200]: 0.125 + 0.125 of the change of 0.5
    assert share == 0.5 and steps_share == (399 + 600) / 1100


def test_claims_are_json_serialisable():
    res = _fig2_results({0: [0.1, 0.5, 0.9]})
    for fn in C.CLAIMS.values():
        json.dumps(fn(res), allow_nan=False)


# --- results, stats, plots ---------------------------------------------------------------------


def test_results_fill_fields_added_after_a_record(tmp_path):
    """A run recorded before ``model``, ``rounding`` and ``elementary`` existed groups with
    today's run of the same setup; its missing fields take the values it was computed with
    (``elementary``: libm, RECORDED_BEFORE), not None."""
    new = _cfg(loss_dtype="float64", seed=0)
    old = {
        k: v
        for k, v in _cfg(loss_dtype="float64", seed=1).items()
        if k not in ("model", "rounding", "elementary", "d_model")
    }
    for rid, cfg in (("new", new), ("old", old)):
        (tmp_path / rid).mkdir()
        (tmp_path / rid / "config.json").write_text(json.dumps({"config": cfg}))
    res = Results.from_dir(tmp_path)
    assert res.runs["old"].config["model"] == "mlp" and res.runs["old"].config["d_model"] == 128
    assert res.runs["old"].config["elementary"] == "libm"
    assert list(res.group(["new", "old"], ["loss_dtype", "model", "rounding"])) == [
        (("loss_dtype", "float64"), ("model", "mlp"), ("rounding", "nearest"))
    ]


def test_results_from_a_sweep_folder(tmp_path):
    out = tmp_path / "sweep"
    ok = S.parse_spec(
        {"base": {"p": 7, "hidden": [4], "steps": 4, "log_every": 2}, "axes": {"seed": [0, 1]}}
    )
    S.run_sweep(ok, out, quiet=True, stdout=open(os.devnull, "w"))
    # an incomplete run (config.json only) is listed, not measured
    (out / "0123456789ab").mkdir()
    (out / "0123456789ab" / "config.json").write_text(json.dumps({"config": {"seed": 9}}))
    res = Results.from_dir(out)
    assert {r.status for r in res.runs.values()} == {"ok", "incomplete"}
    ids = res.select()
    assert len(ids) == 2 and [res.runs[i].seed for i in ids] == [0, 1]
    steps, acc = res.series(ids[0], "accuracy", "test")
    assert steps.tolist() == [0, 2, 4] and ((acc >= 0) & (acc <= 1)).all()
    assert res.layers(ids[0], "weight_norm") == ["W1", "W2", "global"]
    only = Results.from_dir(out, ids=ids[:1])
    assert list(only.runs) == ids[:1]
    assert res.group(ids) == {(): ids}
    assert varying_fields([res.runs[i].config for i in ids]) == []


def test_results_read_a_run_in_flight_up_to_its_checkpoint(tmp_path):
    """``in_flight=True``: a run stopped at step 25 of 40 (its checkpoint there, as a signal
    leaves it) is measured with the rows an uninterrupted run logs before that step, bit for
    bit; without a checkpoint, or with one that cannot be read, a run stays incomplete and
    unmeasured; without ``in_flight`` nothing changes."""
    from numstab.run import train
    from numstab.run.driver import StopFlag, Stopped

    base = {"p": 11, "hidden": [16], "steps": 40, "log_every": 5}
    spec = S.parse_spec({"base": base, "axes": {"seed": [0, 1, 2]}})
    ref, out = tmp_path / "ref", tmp_path / "out"
    S.run_sweep(spec, ref, quiet=True, stdout=open(os.devnull, "w"))
    done, flying, broken = (r.id for r in spec.runs)
    for rid in (done, flying, broken):  # done: finished; the other two: config.json only
        (out / rid).mkdir(parents=True)
        names = ("config.json", "summary.json", "metrics.csv") if rid == done else ("config.json",)
        for name in names:
            (out / rid / name).write_bytes((ref / rid / name).read_bytes())
    flag = StopFlag()

    def progress(step):
        if step == 25:
            flag.signum = 15  # what SIGTERM's handler does

    for rid in (flying, broken):
        cfg = next(r.config for r in spec.runs if r.id == rid)
        with pytest.raises(Stopped):
            train(cfg, name=rid, checkpoint_dir=out / rid, checkpoint_every=10, progress=progress,
                  stop=flag)  # fmt: skip
        flag.signum = None
    (npz,) = (out / broken).glob("checkpoint-*.npz")
    npz.write_bytes(npz.read_bytes()[:100])  # truncated: unreadable

    plain = Results.from_dir(out)
    assert plain.select() == [done] and plain.runs[flying].status == "incomplete"
    res = Results.from_dir(out, in_flight=True)
    assert res.select() == [done, flying]
    assert (res.runs[flying].status, res.runs[flying].step) == ("in_flight", 25)
    assert (res.runs[broken].status, res.runs[broken].step) == ("incomplete", None)
    assert res.select(status="ok") == [done] and res.select(status=None) == [done, flying, broken]
    want = Results.from_dir(ref)
    for metric, split, layer in (("accuracy", "test", ""), ("loss", "train", ""),
                                 ("weight_norm", "train", "global")):  # fmt: skip
        s_got, v_got = res.series(flying, metric, split, layer)
        s_ref, v_ref = want.series(flying, metric, split, layer)
        keep = s_ref < 25  # the checkpoint of step 25 holds the rows of the steps before it
        assert s_got.tolist() == s_ref[keep].tolist() == [0, 5, 10, 15, 20], metric
        assert v_got.tobytes() == v_ref[keep].tobytes(), metric  # the same bits
    # the run folder alone, as scripts/plot_runs.py reads it: the same rows and configuration
    alone = Results.from_train_dirs([out / flying], in_flight=True)
    assert (alone.runs[flying].status, alone.runs[flying].step) == ("in_flight", 25)
    assert alone.runs[flying].config == res.runs[flying].config
    assert alone.series_map.keys() == {k for k in res.series_map if k[0] == flying}
    for key, (k, v) in alone.series_map.items():
        assert k.tolist() == res.series_map[key][0].tolist()
        assert v.tobytes() == res.series_map[key][1].tobytes()
    with pytest.raises(FileNotFoundError, match="needs metrics.csv or a checkpoint"):
        Results.from_train_dirs([out / broken], in_flight=True)
    row = C.fig2_claims(res)  # any claims: the in-flight run counts, and is marked
    counted = [r for e in row.values() for r in e["rows"]]
    assert counted and all(r["n"] == 2 and r["n_in_flight"] == 1 for r in counted)
    assert all(r["n_incomplete"] == 1 for r in counted)
    assert "| 2 (1 in flight) (+1 incomplete) |" in C.render_markdown(row)


def test_a_checkpoint_replaced_while_it_is_read_is_read_again(tmp_path, monkeypatch):
    """The run writes its next checkpoint (and removes the old arrays file) between the
    reader's look at the manifest and its read of the arrays: the failed read is tried again
    on the new checkpoint; a read that keeps failing on the same checkpoint gives up (None)."""
    from analysis import results as results_mod
    from numstab.run import checkpoint as ck
    from numstab.run import train
    from numstab.run.driver import StopFlag, Stopped

    spec = S.parse_spec({"base": {"p": 11, "hidden": [16], "steps": 40, "log_every": 5}})
    (planned,) = spec.runs
    run_dir = tmp_path / planned.id
    flag = StopFlag()

    def leg(stop_at, resume):
        def progress(step):
            if step == stop_at:
                flag.signum = 15

        flag.signum = None
        with pytest.raises(Stopped):
            train(planned.config, name=planned.id, checkpoint_dir=run_dir, checkpoint_every=10,
                  progress=progress, stop=flag, resume=resume)  # fmt: skip

    leg(25, False)
    real, calls = ck.load_checkpoint, []

    def racing(directory):
        calls.append(directory)
        if len(calls) == 1:  # the run moves on meanwhile: this read finds its arrays gone
            leg(30, True)
            raise ck.CheckpointError("the arrays file is missing")
        return real(directory)

    monkeypatch.setattr(ck, "load_checkpoint", racing)
    step, name, rows = results_mod._checkpoint_rows(str(run_dir))
    assert len(calls) == 2 and (step, name) == (30, planned.id) and max(r[0] for r in rows) == 25

    def broken(directory):
        calls.append(directory)
        raise ck.CheckpointError("unreadable")

    calls.clear()
    monkeypatch.setattr(ck, "load_checkpoint", broken)
    assert results_mod._checkpoint_rows(str(run_dir)) is None and len(calls) == 1


def test_aggregate_and_helpers():
    agg = aggregate([([0, 10, 20], [0.0, 1.0, 2.0]), ([0, 10], [2.0, 3.0])])
    assert agg["steps"].tolist() == [0, 10, 20]
    assert agg["mean"].tolist() == [1.0, 2.0, 2.0]
    assert agg["n"].tolist() == [2, 2, 1]
    assert agg["std"][0] == pytest.approx(np.sqrt(2.0)) and agg["std"][2] == 0.0
    assert agg["min"].tolist() == [0.0, 1.0, 2.0] and agg["max"].tolist() == [2.0, 3.0, 2.0]
    assert aggregate([])["steps"].size == 0
    assert value_at([0, 10, 20], [1, 2, 3], 15) == (10, 2.0)
    assert value_at([10, 20], [1, 2], 5) == (None, None)
    assert max_after([0, 10, 20], [1, 5, 2], 10) == 5
    assert max_after([0, 10, 20], [1, 5, 2], 10, absolute_change=True) == 3
    s = summarize_values([1, None, 3, float("nan")])
    assert (s["n"], s["n_value"], s["mean"], s["min"], s["max"]) == (4, 2, 2.0, 1.0, 3.0)


def test_plot_figure_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from analysis.plots import plot_figure

    res = _fig2_results({0: [0.1, 0.5, 0.9], 1: [0.2, 0.4, 0.8]})
    path = plot_figure(
        res,
        [
            {"name": "b", "title": "f = 0.6", "match": {"train_fraction": 0.6}},
            {"name": "none", "match": {"train_fraction": 0.9}, "plots": ["nlm_cosine"]},
        ],
        tmp_path / "sub" / "f.png",
        title="synthetic",
        band="std",
    )
    w, h = _png_size(Path(path))
    assert w > 100 and h > 100
    with pytest.raises(ValueError, match="band"):
        plot_figure(res, [], tmp_path / "g.png", band="wide")


@pytest.mark.parametrize("ncols", [1, 2, 3])
def test_figure_title_fits_the_figure(ncols):
    """A long title (a SPEC's title with its budget and panels) is wrapped within the figure's
    width, as rendered, whatever the number of plot columns; a short one stays on one line."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from analysis.plots import draw_figure

    res = _fig2_results({0: [0.1, 0.5, 0.9]})
    panel = {"name": "b", "match": {}, "plots": ["accuracy", "sc_fraction", "loss"][:ncols]}
    long = (
        "Grokking delay vs effective logit scale (init scale x temperature, AdamW wd 2) — "
        "budget short, panels formats, and more words to pass three columns' width as well"
    )
    for title, lines in ((long, None), ("short", 1)):
        fig = draw_figure(res, [panel], title=title)
        FigureCanvasAgg(fig).draw()
        box = fig._suptitle.get_window_extent()  # the title as rendered
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width  # not cut at the edges
        if lines:
            assert fig.get_suptitle().count("\n") + 1 == lines


def test_loss_plot_draws_the_seeds_mean_on_a_log_scale():
    """The ``loss`` plot kind: one line per group, the mean over its seeds of the training
    loss at each logged step, on a log axis."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.plots import PLOTS

    steps = [0, 100, 200, 300]
    configs = {f"s{k}": _cfg(loss_dtype="float32", seed=k) for k in (0, 1)}
    rows = _rows("s0", steps, loss=("train", [1.0, 0.1, 4.0, 0.01]))
    rows += _rows("s1", steps, loss=("train", [3.0, 0.3, 2.0, 0.03]))
    res = Results.from_rows(configs, rows)
    fig, ax = plt.subplots()
    try:
        PLOTS["loss"](ax, res, {(("loss_dtype", "float32"),): ["s0", "s1"]}, band="none")
        (line,) = ax.lines
        assert line.get_xdata().tolist() == steps
        assert np.allclose(line.get_ydata(), [2.0, 0.2, 3.0, 0.02], rtol=1e-15)  # exact means
        assert ax.get_yscale() == "log"
    finally:
        plt.close(fig)


def test_missing_matplotlib_names_the_plot_extra(monkeypatch):
    from analysis import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"numstab\[plot\]"):
        plots.require_matplotlib()


# --- scripts/plot_runs.py ----------------------------------------------------------------------


def _python(*args):
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_plot_runs_draws_training_output_folders(tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    train = _python(
        "-m", "numstab.train", "--modulus", 7, "--hidden", 8, 8, "--steps", 6, "--log-every", 2,
        "--out", run_dir, "--quiet",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr
    png = tmp_path / "fig" / "run.png"
    script = ROOT / "scripts" / "plot_runs.py"
    res = _python(script, run_dir, "--out", png, "--plots", "accuracy", "nlm_cosine")
    assert res.returncode == 0, res.stderr
    w, h = _png_size(png)
    assert w > h > 100  # one row, two plots side by side
    bad = _python(script, tmp_path, "--out", tmp_path / "x.png")
    assert bad.returncode == 2 and "not a training output folder" in bad.stderr
    assert not (tmp_path / "x.png").exists()


def test_plot_runs_groups_seeds_of_one_setup(tmp_path):
    """Two seeds of one setup, one of them resumed (its summary records ``resume``, and every
    summary a ``resolved`` dict and its own ``out``): one group of two runs, as the runs differ
    in their seed alone. A summary's dict used to crash the grouping (unhashable)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import plot_runs

    args = ["--modulus", 7, "--hidden", 8, 8, "--log-every", 2, "--quiet"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _python("-m", "numstab.train", *args, "--steps", 6, "--out", a).returncode == 0
    seed1 = [*args, "--seed", 1, "--out", b, "--checkpoint-every", 2]
    assert _python("-m", "numstab.train", *seed1, "--steps", 4).returncode == 0
    resumed = _python("-m", "numstab.train", "--resume", b, "--steps", 6, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    results = Results.from_train_dirs([str(a), str(b)])
    groups = results.group(results.select())
    assert list(groups.values()) == [["a", "b"]], groups
    png = tmp_path / "ab.png"
    assert plot_runs.main([str(a), str(b), "--out", str(png)]) == 0 and png.exists()
    # configurations holding dicts (a summary's raw config) group by value, nested
    raw = Results.from_rows({"x": {"r": {"k": [1]}}, "y": {"r": {"k": [2]}}}, [], source="raw")
    assert list(raw.group(["x", "y"]).values()) == [["x"], ["y"]]


def test_a_compare_folder_is_its_two_runs(tmp_path):
    """``numstab.compare``'s folder logs ``test`` and ``reference`` in one metrics.csv: they
    are two runs, ``<folder>/test`` and ``<folder>/reference``, each with its own rows and
    the configuration its checkpoint records (they used to be read as one run, the two
    series interleaved)."""
    out = tmp_path / "cmp"
    tiny = ["--modulus", 11, "--hidden", 8, "--steps", 10, "--log-every", 5, "--quiet"]
    res = _python("-m", "numstab.compare", *tiny, "--out", out)
    assert res.returncode == 0, res.stderr
    with open(out / "metrics.csv", newline="") as f:
        want = {}
        for r in csv.DictReader(f):
            if r["metric"] == "loss" and r["split"] == "train":
                want.setdefault(r["run"], []).append((int(r["step"]), float(r["value"])))
    got = Results.from_train_dirs([out])
    assert sorted(got.runs) == ["cmp/reference", "cmp/test"] and set(want) == {"reference", "test"}
    for name in want:
        steps, values = got.series(f"cmp/{name}", "loss", "train")
        assert list(zip(steps.tolist(), values.tolist(), strict=True)) == want[name], name
    assert got.runs["cmp/test"].config["dtype"] == "float32"
    assert got.runs["cmp/reference"].config["dtype"] == "float64"
    groups = sorted(map(tuple, got.group(got.select()).values()))
    assert groups == [("cmp/reference",), ("cmp/test",)]  # told apart by their configurations


def test_plot_runs_prints_a_figures_claims_on_training_output_folders(tmp_path):
    """Two StableMax runs trained one by one: the Fig. 1 (b) claims over them, each seed's
    value read back independently from its metrics.csv (the last test accuracy row)."""
    args = ["--modulus", 7, "--hidden", 8, 8, "--steps", 8, "--log-every", 2, "--quiet"]
    args += ["--loss", "stablemax", "--loss-dtype", "float64"]
    dirs = [tmp_path / f"seed{s}" for s in (0, 1)]
    for s, d in enumerate(dirs):
        res = _python("-m", "numstab.train", *args, "--seed", s, "--out", d)
        assert res.returncode == 0, res.stderr
    script = ROOT / "scripts" / "plot_runs.py"
    res = _python(script, *dirs, "--claims", "fig1")
    assert res.returncode == 0, res.stderr
    finals = []
    for d in dirs:
        with open(d / "metrics.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["metric"] == "accuracy"]
        rows = [r for r in rows if r["split"] == "test"]
        finals.append(float(max(rows, key=lambda r: int(r["step"]))["value"]))
    line = next(x for x in res.stdout.splitlines() if x.startswith("| `fig1b.final_test_acc`"))
    assert f"| all | 2 | {np.mean(finals):.4f} ± {np.std(finals, ddof=1):.4f}" in line, line
    assert f"0: {finals[0]:.4f}, 1: {finals[1]:.4f}" in line, line
    assert "fig1a" not in res.stdout and "(no runs)" not in res.stdout  # no ⊥ runs: left out

    # A third seed in flight: checkpointed, its summary.json not written yet and its
    # metrics.csv ending in a line written in part (a row of step 10 whose value is cut short:
    # it parses, and must not be read). It is measured as far as its whole rows go, with its
    # checkpoint's configuration (the one its summary will record), and said to be so.
    flying = tmp_path / "seed2"
    res = _python("-m", "numstab.train", *args, "--seed", 2, "--out", flying,
                  "--checkpoint-every", 4)  # fmt: skip
    assert res.returncode == 0, res.stderr
    recorded = Results.from_train_dirs([flying]).runs["seed2"].config
    (flying / "summary.json").unlink()
    part_line = (flying / "metrics.csv").read_text().count("\n") + 1
    with open(flying / "metrics.csv", "a") as f:
        f.write("10,run,test,accuracy,,0.1")
    res = _python(script, *dirs, flying, "--claims", "fig1")
    assert res.returncode == 0, res.stderr
    note = "seed2: no summary.json yet (in flight, or stopped without one): measured as far "
    assert note + "as it got, step 8\n" in res.stderr, res.stderr
    assert "unknown" not in res.stderr, res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("| `fig1b.final_test_acc`"))
    assert "| all | 3 (1 in flight) |" in line, line
    got = Results.from_train_dirs([flying], in_flight=True).runs["seed2"]
    assert (got.status, got.step, got.config) == ("in_flight", 8, recorded)
    with pytest.raises(FileNotFoundError, match="needs summary.json, metrics.csv"):
        Results.from_train_dirs([flying])  # only where asked for
    for name in ("checkpoint.json", *(p.name for p in flying.glob("checkpoint-*.npz"))):
        (flying / name).unlink()
    res = _python(script, flying, "--claims", "fig1")
    assert res.returncode == 0 and "its configuration is unknown (no checkpoint)" in res.stderr
    with open(flying / "metrics.csv", "a") as f:
        f.write("\n8,run,test,accur\n8,run,test,accuracy,,0.5\n")  # a broken line, not last
    res = _python(script, flying, "--claims", "fig1")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"line {part_line + 1} is not a metrics row: '8,run,test,accur'" in res.stderr

    for bad, why in (
        ([dirs[0], "--claims", "nope"], "unknown claims 'nope'"),
        ([tmp_path, "--claims", "fig1"], "not a training output folder"),
        ([dirs[0]], "nothing to do"),
    ):
        res = _python(script, *bad)
        assert res.returncode == 2 and why in res.stderr and "Traceback" not in res.stderr


def test_dry_run_into_a_pipe_closed_early_ends_quietly_with_141():
    # 15 configurations x 100 seeds: about 90 KB of table, more than a pipe holds (64 KiB on
    # Linux), so the script is still writing when the reader (`| head -2`) goes away.
    head, rc, err = read_head_then_close(
        [sys.executable, str(SCRIPT), "--figure", "15", "--budget", "short", "--seeds", "100",
         "--dry-run"],
        2,
        cwd=ROOT,
    )  # fmt: skip
    assert head[0].startswith(b"1500 runs in ") and b"1500 would run" in head[0]
    assert rc == 141, err
    assert err == ""
