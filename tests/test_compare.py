"""The compare command, through main(argv) and one real subprocess."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
from helpers import StopAfter

from numstab.cli import compare
from numstab.run import CSV_HEADER

# Small and overfitting: p = 23, two 32-wide layers, a large learning rate so that logits grow
# fast enough for float16 to collapse within the budget.
SMALL = ["--modulus", "23", "--hidden", "32", "32", "--steps", "60", "--log-every", "10",
         "--audit-every", "20", "--lr", "0.05", "--quiet"]


def run_main(tmp_path, *extra):
    out = tmp_path / "out"
    code = compare.main([*SMALL, "--out", str(out), *extra])
    return code, out


def test_outputs_exist_and_parse(tmp_path, capsys):
    code, out = run_main(tmp_path, "--dtype", "float32")
    assert code == 0
    printed = capsys.readouterr().out
    assert "findings" in printed and "SC meas" in printed
    s = json.loads((out / "summary.json").read_text())
    assert set(s) >= {"config", "versions", "runs", "audit", "findings", "runtime"}
    for key in ("python", "numpy", "mpmath", "numstab", "blas"):
        assert key in s["versions"]
    assert set(s["runs"]) == {"test", "reference"}
    for name, dtype in (("test", "float32"), ("reference", "float64")):
        r = s["runs"][name]
        assert r["dtype"] == dtype
        assert set(r) >= {"sc_onset_step", "sc50_step"}
        assert set(r["final"]) >= {"train_acc", "test_acc", "sc_fraction", "zero_loss_fraction",
                                   "nlm_cosine"}
    assert [a["step"] for a in s["audit"]] == [0, 20, 40, 60]
    for a in s["audit"]:
        assert set(a) >= {"step", "sc_fraction_measured", "sc_fraction_exact", "agreement",
                          "loss_max_ulp_error", "target_grad_rel_error_median",
                          "nlm_cosine_measured", "nlm_cosine_exact"}
    # Every option's value goes into the outputs.
    for opt in ("dtype", "loss_dtype", "reference", "loss", "optimizer", "lr", "beta1", "beta2",
                "eps", "weight_decay", "perp_grad", "task", "p", "train_fraction",
                "hidden", "bias", "steps", "log_every", "audit_every", "audit_samples", "order",
                "seed", "threads", "backend"):
        assert opt in s["config"], opt
    with open(out / "metrics.csv") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_HEADER
    assert {r[1] for r in rows[1:]} == {"test", "reference"}


def test_json_flag_prints_the_summary(tmp_path, capsys):
    code = compare.main([*SMALL, "--steps", "10", "--json"])
    assert code == 0
    s = json.loads(capsys.readouterr().out)
    assert s["runs"]["test"]["dtype"] == "float32"


def test_measured_and_exact_sc_agree_on_every_audited_step(tmp_path):
    code, out = run_main(tmp_path, "--dtype", "float16")
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    for a in s["audit"]:
        assert a["agreement"] == 1.0, a
        assert a["sc_fraction_measured"] == a["sc_fraction_exact"]


def test_float16_collapses_before_float32(tmp_path):
    """In an overfitting configuration the SC-50 % step of float16 precedes float32's."""
    args = [*SMALL, "--steps", "150", "--audit-every", "150"]
    s16 = tmp_path / "f16"
    s32 = tmp_path / "f32"
    assert compare.main([*args, "--dtype", "float16", "--out", str(s16)]) == 0
    assert compare.main([*args, "--dtype", "float32", "--out", str(s32)]) == 0
    r16 = json.loads((s16 / "summary.json").read_text())["runs"]["test"]
    r32 = json.loads((s32 / "summary.json").read_text())["runs"]["test"]
    assert r16["sc50_step"] is not None
    assert r32["sc50_step"] is None or r16["sc50_step"] < r32["sc50_step"]


@pytest.mark.parametrize(
    "argv",
    [["--dtype", "float8"], ["--order", "backwards"], ["--loss", "hinge"],
     ["--optimizer", "lion"], ["--steps", "-3"], ["--train-fraction", "1.5"],
     ["--modulus", "1"], ["--audit-every", "0"], ["--lr", "nan"]],
)
def test_bad_input_exits_2_with_the_valid_choices(argv, capsys):
    with pytest.raises(SystemExit) as info:
        code = compare.main([*SMALL, *argv])
        raise SystemExit(code)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert argv[1] in err or argv[1].lstrip("-") in err


def test_unknown_format_lists_valid_choices(capsys):
    with pytest.raises(SystemExit):
        compare.main(["--dtype", "float8"])
    err = capsys.readouterr().err
    assert "float16" in err and "bfloat16" in err and "float32" in err


def test_unwritable_output_directory_exits_2_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = compare.main([*SMALL, "--out", str(blocker / "sub")])
    assert code == 2
    assert "cannot be written" in capsys.readouterr().err


def test_cupy_backend_without_cupy_exits_2(capsys, monkeypatch):
    import numstab.backend as backend

    monkeypatch.setattr(backend, "_cupy_module", lambda: None)
    code = compare.main([*SMALL, "--backend", "cupy"])
    assert code == 2
    err = capsys.readouterr().err
    assert "CuPy" in err and ".[gpu]" in err


def test_divergence_exits_3_and_keeps_what_was_logged(tmp_path):
    code, out = run_main(tmp_path, "--optimizer", "sgd", "--lr", "1e30", "--log-every", "1")
    assert code == 3
    s = json.loads((out / "summary.json").read_text())
    assert s["status"]["kind"] == "non-finite"
    assert s["status"]["run"] in ("test", "reference")
    assert s["status"]["step"] >= 1
    with open(out / "metrics.csv") as f:
        assert len(list(csv.reader(f))) > 1


def test_interrupt_exits_130_with_partial_outputs(tmp_path, monkeypatch):
    from numstab.run import loop as train_mod

    real = train_mod.Run.advance
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(train_mod.Run, "advance", flaky)
    code, out = run_main(tmp_path)
    assert code == 130
    s = json.loads((out / "summary.json").read_text())
    assert s["status"]["kind"] == "interrupted"
    assert s["audit"]  # the audits done before the interrupt are kept


def test_float64_reference_is_longdouble_or_explained(tmp_path, capsys):
    code = compare.main([*SMALL, "--steps", "4", "--audit-every", "2", "--dtype", "float64",
                         "--json"])
    assert code == 0
    s = json.loads(capsys.readouterr().out)
    from numstab.precision import available_formats

    if "longdouble" in available_formats():
        assert s["runs"]["reference"]["dtype"] == "longdouble"
    else:
        assert "reference" not in s["runs"]
        assert "long double" in s["config"]["reference_note"]


def test_subprocess_run(tmp_path):
    out = tmp_path / "sub"
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "numstab.compare", *SMALL, "--steps", "20", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "summary" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["runs"]["test"]["final"]["step"] == 20


def test_interrupted_compare_resumes_bit_identically(tmp_path, monkeypatch):
    import contextlib


    full = tmp_path / "full"
    part = tmp_path / "part"
    assert compare.main([*SMALL, "--out", str(full)]) == 0

    @contextlib.contextmanager
    def fake_stop():
        yield StopAfter(27)

    monkeypatch.setattr(compare, "graceful_stop", fake_stop)
    assert compare.main([*SMALL, "--out", str(part), "--checkpoint-every", "10"]) == 143
    monkeypatch.undo()
    assert compare.main([*SMALL, "--resume", str(part)]) == 0
    assert (full / "metrics.csv").read_text() == (part / "metrics.csv").read_text()
    a = json.loads((full / "summary.json").read_text())
    b = json.loads((part / "summary.json").read_text())
    strip = ("audit_seconds",)
    for ra, rb in zip(a["audit"], b["audit"], strict=True):
        assert {k: v for k, v in ra.items() if k not in strip} == {
            k: v for k, v in rb.items() if k not in strip}
    assert a["runs"] == b["runs"]
    # A resume with different options is refused before training.
    assert compare.main([*SMALL, "--resume", str(part), "--lr", "0.01"]) == 2


# --- what compare writes and shows ------------------------------------------------------------


def _csv_values(path):
    with open(path) as f:
        rows = list(csv.reader(f))[1:]
    return {(int(r[0]), *r[1:5]): float(r[5]) for r in rows}


def test_metrics_csv_holds_every_audited_quantity(tmp_path):
    code, out = run_main(tmp_path, "--dtype", "float16")
    assert code == 0
    audits = json.loads((out / "summary.json").read_text())["audit"]
    table = _csv_values(out / "metrics.csv")
    metrics = {k[3] for k in table}
    assert {"sc_fraction_exact", "target_grad_rel_error_median", "nlm_cosine_exact"} <= metrics
    # Every quantity of an audit record is in the CSV, except the weight norm (logged by the
    # run as weight_norm/global) and the audit's own timing (not reproducible).
    not_in_csv = {"step", "weight_norm", "audit_seconds", "nlm_cosine_exact_layers"}
    assert set(audits[0]) - not_in_csv == set(compare.AUDIT_METRICS)
    for a in audits:
        for key, (metric, layer) in compare.AUDIT_METRICS.items():
            v = table[(a["step"], "test", "train", metric, layer)]
            assert v == a[key] or (a[key] is None and math.isnan(v)), (a["step"], key)
        for layer, v in a["nlm_cosine_exact_layers"].items():
            assert table[(a["step"], "test", "train", "nlm_cosine_exact", layer)] == v
    # Audit metric names never shadow a training metric's rows.
    assert not {m for m, _ in compare.AUDIT_METRICS.values()} & {
        k[3] for k in table if k[1] == "reference"}


def test_compare_png_shows_measured_and_exact_sc(tmp_path, monkeypatch):
    from matplotlib.colors import to_hex

    figs = []
    real = compare.build_figure

    def keep(log, summary):
        figs.append(real(log, summary))
        return figs[-1]

    monkeypatch.setattr(compare, "build_figure", keep)
    code, out = run_main(tmp_path, "--dtype", "float16")
    assert code == 0
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    s = json.loads((out / "summary.json").read_text())
    fig = figs[0]
    assert len(fig.axes) == 4
    dtypes = {name: r["dtype"] for name, r in s["runs"].items()}  # test float16, ref float64
    colours = {d: set() for d in dtypes.values()}
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel()
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        for d in dtypes.values():
            assert any(t.startswith(d) for t in legend), (ax.get_title(), legend)
        for line in ax.get_lines():
            for d in colours:
                if line.get_label().startswith(d + " "):
                    colours[d].add(to_hex(line.get_color()))
        # The test run's curves are drawn over the reference's, which are wider: both stay
        # visible where they coincide.
        curves = [ln for ln in ax.get_lines() if "SC" not in ln.get_label()]  # not the markers
        test = [ln for ln in curves if ln.get_label().startswith(dtypes["test"])]
        ref = [ln for ln in curves if ln.get_label().startswith(dtypes["reference"])]
        assert min(ln.get_zorder() for ln in test) > max(ln.get_zorder() for ln in ref)
        assert max(ln.get_linewidth() for ln in ref) > max(ln.get_linewidth() for ln in test)
    # One colour per run, on every panel, and the runs' colours differ.
    assert all(len(c) == 1 for c in colours.values()) and len(set.union(*colours.values())) == 2
    # The exact-audit SC fraction is plotted at the audited steps, beside the measured one.
    steps = [a["step"] for a in s["audit"]]
    exact = [a["sc_fraction_exact"] for a in s["audit"]]
    plotted = [
        (list(ln.get_xdata()), list(ln.get_ydata()))
        for ax in fig.axes for ln in ax.get_lines() if "exact audit" in ln.get_label()
    ]
    assert (steps, exact) in plotted
    # Labelled markers of SC onset and SC-50 (float16 collapses in this setup).
    r = s["runs"]["test"]
    assert r["sc50_step"] is not None
    labels = {ln.get_label() for ax in fig.axes for ln in ax.get_lines()}
    assert f"float16 SC onset (step {r['sc_onset_step']})" in labels
    assert f"float16 SC-50 (step {r['sc50_step']})" in labels
    title = fig.get_suptitle()
    assert "float16 vs float64" in title and "mod 23" in title and "lr 0.05" in title


def test_interrupted_report_and_resume_from_the_directory_alone(tmp_path, monkeypatch, capsys):
    import contextlib

    from numstab.run.checkpoint import load_checkpoint

    full, part = tmp_path / "full", tmp_path / "part"
    assert compare.main([*SMALL, "--out", str(full)]) == 0
    with monkeypatch.context() as m:
        stop = contextlib.contextmanager(lambda: (yield StopAfter(27)))
        m.setattr(compare, "graceful_stop", stop)
        assert compare.main([*SMALL, "--out", str(part), "--checkpoint-every", "10"]) == 143
    first = json.loads((part / "summary.json").read_text())
    ran = load_checkpoint(part).manifest["runs"]["test"]["step"]
    assert ran == 27
    # The findings speak of the steps run, not of the 60 requested.
    text = " ".join(first["findings"])
    assert f"within {ran} steps" in text and "within 60 steps" not in text, text
    assert first["steps_run"] == ran
    assert "stopped at step 27 of 60" in text
    capsys.readouterr()
    # An explicit option that differs from the checkpoint's: refused in one line naming it,
    # before anything is written.
    before = {p.name: p.read_bytes() for p in part.iterdir()}
    assert compare.main(["--resume", str(part), "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr 0.01 (checkpoint: 0.05)" in err, err
    assert {p.name: p.read_bytes() for p in part.iterdir()} == before
    # `--resume DIR` alone continues the run bit for bit, audit rows included.
    assert compare.main(["--resume", str(part), "--quiet"]) == 0
    assert (part / "metrics.csv").read_bytes() == (full / "metrics.csv").read_bytes()
    assert "sc_fraction_exact" in (part / "metrics.csv").read_text()
    s = json.loads((part / "summary.json").read_text())
    assert s["steps_run"] == 60 and s["status"] == "ok"
    legs = s["wall_seconds_legs"]
    assert len(legs) == 2 and s["wall_seconds"] == sum(legs)
    assert 0 < legs[0] <= first["wall_seconds"]  # the first leg as checkpointed at its stop
    assert load_checkpoint(part).extra["free_options"] == {"checkpoint_every": 10}
