"""The sweep command: SPEC validation, stable ids, both executors, resume, failures, collect."""

import csv
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import numstab
from numstab import sweep
from numstab.backend import get_backend
from numstab.cli import compare as compare_cli
from numstab.cli import sweep as cli_sweep
from numstab.cli import train as train_cli
from numstab.run import CSV_HEADER, TrainConfig
from numstab.run.config import TRANSFORMER_FIELDS
from numstab.run.driver import StopFlag, Stopped
from numstab.run.footprint import OVERHEAD_BYTES, estimate_run_memory
from numstab.run.loop import train
from numstab.run.outdir import LOCK_NAME
from numstab.sweep import executors
from numstab.sweep import run as sweep_run
from numstab.sweep.folder import checkpoint_progress, checkpoint_step

ROOT = Path(__file__).resolve().parent.parent

GRID = """
description = "test grid"

[base]
p = 11
hidden = [16, 16]
steps = 20
log_every = 5

[axes]
dtype = ["float32", "float64"]
seed = [0, 1]
"""

# One ordinary run and one that diverges at once (sgd with an absurd step: NonFiniteError).
FAILING = """
[base]
p = 11
hidden = [16, 16]
steps = 10
log_every = 5

[[runs]]
seed = 0

[[runs]]
optimizer = "sgd"
lr = 1e30
"""


def write(tmp_path, text, name="spec.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summary_without_wall(rows):
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in rows]


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory):
    """The 2 x 2 grid through the local executor (2 processes, 1 BLAS thread each)."""
    d = tmp_path_factory.mktemp("local")
    spec = write(d, GRID)
    out = d / "out"
    report = sweep.run_sweep(spec, out, executor="local", workers=2, threads=1, quiet=True)
    return spec, out, report


# --- running ---------------------------------------------------------------------------------


def test_local_grid_writes_every_file(local_grid):
    _, out, report = local_grid
    assert report.exit_code == 0 and not report.failed
    assert sorted(report.executed) == sorted(report.planned) and len(report.planned) == 4
    for rid in report.planned:
        folder = out / rid
        assert {p.name for p in folder.iterdir()} == {"config.json", "metrics.csv", "summary.json"}
        s = json.loads((folder / "summary.json").read_text())
        assert s["status"] == "ok" and s["error"] is None
        assert s["final"]["step"] == 20
        assert s["executor"] == {
            "kind": "local",
            "workers": 2,
            "threads": 1,
            "scheduler": None,
            "checkpoint_every": None,
        }
        assert {"numpy", "numstab", "python"} <= set(s["versions"])
        # Pinned inside the worker, and recorded.
        for lib in s["runtime"]["blas"]:
            assert lib["num_threads"] == 1
        cfg = json.loads((folder / "config.json").read_text())
        assert (
            sweep.run_id(
                TrainConfig(**{k: v for k, v in cfg["config"].items() if k != "state_format"})
            )
            == rid
        )
        with open(folder / "metrics.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert tuple(rows[0]) == CSV_HEADER
        assert {r[1] for r in rows[1:]} == {rid}
    rows = read_csv(out / "collected_summary.csv")
    assert [(r["dtype"], r["seed"]) for r in rows] == [
        ("float32", "0"),
        ("float32", "1"),
        ("float64", "0"),
        ("float64", "1"),
    ]
    assert list(rows[0])[:3] == ["run_id", "dtype", "seed"]
    assert all(r["status"] == "ok" and r["error"] == "" and r["final_step"] == "20" for r in rows)


def test_dask_local_cluster_gives_identical_tables(local_grid, tmp_path):
    spec, local_out, _ = local_grid
    out = tmp_path / "dask"
    report = sweep.run_sweep(
        spec, out, executor="dask", scheduler="local", workers=2, threads=1, quiet=True
    )
    assert report.exit_code == 0 and len(report.executed) == 4
    a = read_csv(local_out / "collected_summary.csv")
    b = read_csv(out / "collected_summary.csv")
    assert summary_without_wall(a) == summary_without_wall(b)
    assert (local_out / "collected_metrics.csv").read_bytes() == (
        out / "collected_metrics.csv"
    ).read_bytes()
    s = json.loads((out / report.planned[0] / "summary.json").read_text())
    assert s["executor"]["kind"] == "dask" and s["executor"]["scheduler"] == "local"


def test_resume_skips_finished_runs_and_force_reruns_all(local_grid, tmp_path):
    _, src, _ = local_grid
    out = tmp_path / "resume"
    shutil.copytree(src, out)
    spec = write(tmp_path, GRID)
    kw = dict(executor="dask", scheduler="local", workers=2, quiet=True)

    again = sweep.run_sweep(spec, out, **kw)
    assert again.executed == [] and sorted(again.skipped) == sorted(again.planned)

    victim = again.planned[2]
    before = (out / victim / "metrics.csv").read_bytes()
    os.remove(out / victim / "summary.json")  # as if the sweep died during this run
    resumed = sweep.run_sweep(spec, out, **kw)
    assert resumed.executed == [victim] and len(resumed.skipped) == 3
    assert (out / victim / "metrics.csv").read_bytes() == before

    forced = sweep.run_sweep(spec, out, force=True, **kw)
    assert sorted(forced.executed) == sorted(forced.planned)


def test_interrupt_keeps_finished_runs_and_resumes(tmp_path, monkeypatch):
    spec = write(tmp_path, GRID)
    out = tmp_path / "out"
    real = sweep_run._write_run_result
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_run, "_write_run_result", flaky)
    code = cli_sweep.main(
        [spec, "--out", str(out), "--executor", "dask", "--scheduler", "local", "--quiet"]
    )
    assert code == 130
    done = [d for d in os.listdir(out) if (out / d / "summary.json").exists()]
    assert len(done) == 1
    monkeypatch.setattr(sweep_run, "_write_run_result", real)
    report = sweep.run_sweep(spec, out, executor="dask", scheduler="local", quiet=True)
    assert len(report.executed) == 3 and report.skipped == done


# --- failures --------------------------------------------------------------------------------


def test_failed_run_is_reported_and_the_others_finish(tmp_path, capsys):
    spec = write(tmp_path, FAILING)
    out = tmp_path / "out"
    code = cli_sweep.main([spec, "--out", str(out), "--quiet"])
    assert code == 1
    captured = capsys.readouterr()
    ids = [r.id for r in sweep.load_spec(spec).runs]
    bad = ids[1]
    assert f"{bad}" in captured.err and "NonFiniteError" in captured.err
    assert "FAILED" in captured.out
    s = json.loads((out / bad / "summary.json").read_text())
    assert s["status"] == "failed"
    assert s["error"]["type"] == "NonFiniteError" and s["error"]["step"] >= 1
    assert "Traceback" in s["error"]["traceback"]
    good = json.loads((out / ids[0] / "summary.json").read_text())
    assert good["status"] == "ok" and good["final"]["step"] == 10
    rows = {r["run_id"]: r for r in read_csv(out / "collected_summary.csv")}
    assert rows[bad]["status"] == "failed" and "NonFiniteError" in rows[bad]["error"]
    assert rows[ids[0]]["status"] == "ok" and rows[ids[0]]["error"] == ""

    # Failed runs are not rerun by a plain re-invocation (the exit code still says 1) ...
    again = sweep.run_sweep(spec, out, quiet=True)
    assert again.executed == [] and again.exit_code == 1 and again.failed[0]["previous"]
    # ... but with --retry-failed, and only they.
    retried = sweep.run_sweep(spec, out, retry_failed=True, quiet=True)
    assert retried.executed == [bad] and retried.exit_code == 1


def test_an_exception_in_one_run_is_recorded_with_its_traceback(tmp_path, monkeypatch):
    real = executors.train

    def sometimes(config, **kw):
        if config.seed == 1 and config.dtype == "float64":
            raise RuntimeError("boom in the worker")
        return real(config, **kw)

    # The name execute() calls, seen by in-process Dask workers.
    monkeypatch.setattr(executors, "train", sometimes)
    spec = write(tmp_path, GRID)
    report = sweep.run_sweep(
        spec, tmp_path / "out", executor="dask", scheduler="local", workers=2, quiet=True
    )
    assert report.exit_code == 1 and len(report.executed) == 4
    [f] = report.failed
    assert f["error"]["type"] == "RuntimeError" and "boom" in f["error"]["message"]
    assert "sometimes" in f["error"]["traceback"]
    rows = report.collected["summary"]
    assert [r["status"] for r in rows].count("ok") == 3
    [g64] = [g for g in report.collected["grouped"] if g["dtype"] == "float64"]
    assert (g64["n_runs"], g64["n_ok"], g64["n_failed"]) == (2, 1, 1)
    assert g64["final_test_acc_n"] == 1 and g64["final_test_acc_std"] is None


# --- SPEC validation -------------------------------------------------------------------------

BAD_SPECS = [
    ("[base]\nstepz = 10\n", "base.stepz"),
    ("[axes]\nlearning_rate = [0.1]\n", "axes.learning_rate"),
    ("[axes]\nseed = []\n", "axes.seed"),
    ('[base]\nsteps = "ten"\n', "base.steps"),
    ("[axes]\nhidden = [16, 16]\n", "axes.hidden"),
    ('[base]\nhidden = [16, "x"]\n', "base.hidden"),
    ('[axes]\ndtype = ["float32", "float8"]\n', "axes.dtype"),
    ("[axes]\nseed = [0]\nseed = [1]\n", "axes.seed"),
    ("[axes]\nseed = [0, 0]\n", "axes.seed"),
    ("[axes]\ntrain_fraction = [0.5, 1.5]\n", "axes.train_fraction"),
    ('[[runs]]\nlr = "fast"\n', "runs[0].lr"),
    ("steps = 10\n", "steps"),
]


@pytest.mark.parametrize(("text", "key"), BAD_SPECS)
def test_malformed_spec_is_rejected_before_anything_runs(tmp_path, capsys, text, key):
    spec = write(tmp_path, GRID.split("[base]")[0] + text)
    out = tmp_path / "out"
    code = cli_sweep.main([spec, "--out", str(out), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert key in err, err
    assert not out.exists()


def test_invalid_dtype_names_the_value_and_the_valid_formats(tmp_path):
    with pytest.raises(sweep.SpecError) as info:
        sweep.parse_spec({"axes": {"dtype": ["float16", "float8"]}})
    msg = str(info.value)
    assert "axes.dtype" in msg and "float8" in msg and "float32" in msg


def test_axis_overrides_base_and_none_means_none():
    sw = sweep.parse_spec(
        {
            "base": {"seed": 5, "steps": 3, "perp_grad": "tensor"},
            "axes": {"seed": [0, 1], "perp_grad": ["none", "global"]},
        }
    )
    assert sorted({r.config.seed for r in sw.runs}) == [0, 1]
    assert {r.config.perp_grad for r in sw.runs} == {None, "global"}
    assert all(r.config.steps == 3 for r in sw.runs)


def test_bad_options_exit_2(tmp_path, capsys):
    spec = write(tmp_path, GRID)
    out = tmp_path / "out"
    assert cli_sweep.main([spec, "--out", str(out), "--executor", "dask"]) == 2
    assert "--scheduler" in capsys.readouterr().err
    assert cli_sweep.main([spec, "--out", str(out), "--workers", "0"]) == 2
    assert cli_sweep.main([spec]) == 2
    assert cli_sweep.main([str(tmp_path / "missing.toml"), "--out", str(out)]) == 2
    assert not out.exists()


def test_checkpoint_every_is_refused_where_workers_cannot_write_the_folder(tmp_path, capsys):
    spec = write(tmp_path, GRID)
    out = tmp_path / "out"
    for bad, why in (
        (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
        (
            ["--checkpoint-every", "5", "--executor", "dask", "--scheduler", "tcp://h:8786"],
            "--checkpoint-every needs workers that write into the sweep folder",
        ),
    ):
        assert cli_sweep.main([spec, "--out", str(out), *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err, err
    assert not out.exists()


# One run of 40 steps, checkpointed every 10.
CHECKPOINTED = "[base]\np = 11\nhidden = [16, 16]\nsteps = 40\nlog_every = 5\n[[runs]]\nseed = 3\n"


def test_train_resume_of_a_sweep_run_says_whose_it_is_and_touches_nothing(tmp_path, capsys):
    """``numstab.train --resume`` on a sweep's run folder (a checkpoint of one run named by its
    id) is refused with exit 2 and one line naming the run and its sweep folder; no file
    changes. On a compare folder the line names numstab.compare."""
    spec = write(tmp_path, CHECKPOINTED)
    (rid,) = (r.id for r in sweep.load_spec(spec).runs)
    out = tmp_path / "out"
    assert sweep.run_sweep(spec, out, checkpoint_every=10, quiet=True).exit_code == 0
    before = {p.name: p.read_bytes() for p in (out / rid).iterdir()}
    capsys.readouterr()
    assert train_cli.main(["--resume", str(out / rid)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"run {rid} of the sweep in {str(out)!r}" in err, err
    assert {p.name: p.read_bytes() for p in (out / rid).iterdir()} == before

    cmp_dir = tmp_path / "cmp"
    tiny = ["--modulus", "11", "--hidden", "8", "--steps", "10", "--log-every", "5"]
    assert compare_cli.main([*tiny, "--quiet", "--audit-every", "5", "--out", str(cmp_dir)]) == 0
    capsys.readouterr()
    assert train_cli.main(["--resume", str(cmp_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m numstab.compare --resume" in err, err


def test_checkpoint_step_reads_the_manifest_and_is_none_when_it_cannot(tmp_path):
    """The dry run's "resume at step N" comes from the manifest alone; a manifest that is
    not JSON, or names no integer step, gives None (the dry run then says "resume")."""
    d = tmp_path / "r"
    d.mkdir()
    assert checkpoint_step(str(d)) is None  # no manifest
    cases = [
        ('{"runs": {"abc": {"step": 1200}}}', 1200),
        ('{"runs": {"a": {"step": 30}, "b": {"step": 40}}}', 40),
        ('{"runs": {"abc": {"step": true}}}', None),
        ('{"runs": {"abc": {"step": "1200"}}}', None),
        ('{"runs": []}', None),
        ("not json", None),
    ]
    for text, want in cases:
        (d / "checkpoint.json").write_text(text)
        assert checkpoint_step(str(d)) == want, text


def test_checkpoint_progress_paces_the_last_leg_from_the_manifest(tmp_path):
    """The dry run's time left: the wall seconds a step took over the run's last leg (its
    seconds over the steps since ``leg_start_step``), over all legs where the manifest does
    not name where the last one started; None where the legs' times are missing or not
    seconds."""
    d = tmp_path / "r"
    d.mkdir()
    assert checkpoint_progress(str(d)) == (None, None)
    cases = [
        ({"wall_seconds_legs": [10.0, 3.0], "leg_start_step": 100}, (400, 3.0 / 300)),
        ({"wall_seconds_legs": [10.0, 6.0]}, (400, 16.0 / 400)),  # an older manifest
        ({"wall_seconds_legs": [10.0, 6.0], "leg_start_step": 400}, (400, 16.0 / 400)),
        ({"wall_seconds_legs": [10.0, -1.0]}, (400, None)),
        ({"wall_seconds_legs": [10.0, True]}, (400, None)),
        ({"wall_seconds_legs": []}, (400, None)),
        ({}, (400, None)),
    ]
    for extra, want in cases:
        manifest = {"runs": {"a": {"step": 400}}, "extra": extra}
        (d / "checkpoint.json").write_text(json.dumps(manifest))
        assert checkpoint_progress(str(d)) == want, extra


def test_the_dry_run_says_the_time_left_of_a_run_to_resume(tmp_path, capsys):
    """A run checkpointed at step 10 of 40 whose leg took 3 s from step 0: 30 steps left at
    300 ms a step, ~9 s (from the manifest; the dry run reads nothing else of it)."""
    spec = write(tmp_path, CHECKPOINTED)
    (rid,) = (r.id for r in sweep.load_spec(spec).runs)
    out = tmp_path / "out"
    assert sweep.run_sweep(spec, out, checkpoint_every=10, quiet=True).exit_code == 0
    for name in ("summary.json", "metrics.csv"):
        (out / rid / name).unlink()
    manifest = json.loads((out / rid / "checkpoint.json").read_text())
    assert manifest["extra"]["leg_start_step"] == 0  # the sweep's worker records it
    manifest["runs"][rid]["step"] = 10
    manifest["extra"] |= {"wall_seconds_legs": [3.0], "leg_start_step": 0}
    (out / rid / "checkpoint.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli_sweep.main([spec, "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"{rid} .* 40 +incomplete +resume at step 10 \(~9 s left at 300 ms/step\)$",
                     text, re.MULTILINE), text  # fmt: skip


def test_an_incomplete_run_continues_from_its_checkpoint_and_a_rerun_starts_afresh(
    tmp_path, capsys
):
    spec = write(tmp_path, CHECKPOINTED)
    (rid,) = (r.id for r in sweep.load_spec(spec).runs)
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert sweep.run_sweep(spec, ref, quiet=True).exit_code == 0
    want = (ref / rid / "metrics.csv").read_bytes()
    assert sweep.run_sweep(spec, out, checkpoint_every=10, quiet=True).exit_code == 0
    folder = out / rid
    assert (folder / "metrics.csv").read_bytes() == want  # checkpointing changes no bit
    first = sorted(p.name for p in folder.glob("checkpoint-*.npz"))
    assert len(first) == 1 and first[0].startswith("checkpoint-000040-")  # the final one

    # A run whose result was lost after its final checkpoint (the client died): it is
    # incomplete, and the next invocation takes its result from the checkpoint (no step).
    (folder / "summary.json").unlink()
    (folder / "metrics.csv").unlink()
    # and what a worker killed inside a checkpoint write leaves: removed before the run goes on
    leftovers = [folder / ".tmp-checkpoint.json-1a2b", folder / "checkpoint-000030-0badf00d.npz"]
    for p in leftovers:
        p.write_bytes(b"partial")
    assert cli_sweep.main([spec, "--out", str(out), "--dry-run"]) == 0
    # the dry run names the step the checkpoint holds (its manifest, read alone)
    text = capsys.readouterr().out
    assert re.search(rf"{rid} .* 40 +incomplete +resume at step 40$", text, re.MULTILINE), text
    again = sweep.run_sweep(spec, out, quiet=True)
    s = json.loads((folder / "summary.json").read_text())
    assert again.executed == [rid] and s["resumed_from_step"] == 40, s
    assert (folder / "metrics.csv").read_bytes() == want
    assert not any(p.exists() for p in leftovers)

    # --force is a rerun from step 0, of an incomplete run too: the old checkpoint goes, the
    # new run writes its own.
    (folder / "summary.json").unlink()
    forced = sweep.run_sweep(spec, out, force=True, checkpoint_every=10, quiet=True)
    s = json.loads((folder / "summary.json").read_text())
    assert forced.executed == [rid] and "resumed_from_step" not in s
    after = sorted(p.name for p in folder.glob("checkpoint-*.npz"))
    assert len(after) == 1 and after != first  # a fresh file name: written anew
    assert (folder / "metrics.csv").read_bytes() == want


def test_an_in_process_dask_cluster_checkpoints_into_the_folder_too(tmp_path):
    spec = write(tmp_path, CHECKPOINTED)
    (rid,) = (r.id for r in sweep.load_spec(spec).runs)
    ref, out = tmp_path / "ref", tmp_path / "out"
    sweep.run_sweep(spec, ref, quiet=True)
    kw = {"executor": "dask", "scheduler": "local", "checkpoint_every": 10, "quiet": True}
    assert sweep.run_sweep(spec, out, **kw).exit_code == 0
    manifest = json.loads((out / rid / "checkpoint.json").read_text())
    assert manifest["runs"][rid]["step"] == 40 and manifest["extra"]["checkpoint_every"] == 10
    assert (out / rid / "metrics.csv").read_bytes() == (ref / rid / "metrics.csv").read_bytes()


def test_a_resumed_run_keeps_the_blas_threads_it_started_with(tmp_path):
    # The first leg ran with 1 BLAS thread; the sweep is invoked again with 2: the run
    # continues on 1 (its checkpoint says so), so that it stays bit-identical.
    spec = write(tmp_path, CHECKPOINTED)
    (planned,) = sweep.load_spec(spec).runs
    out = tmp_path / "out"
    folder = out / planned.id
    folder.mkdir(parents=True)
    stop = StopFlag()

    def stop_at_20(t):
        if t == 20:
            stop.signum = signal.SIGTERM

    with threadpool_limits(limits=1), pytest.raises(Stopped):
        train(
            planned.config,
            name=planned.id,
            checkpoint_dir=folder,
            checkpoint_every=10,
            progress=stop_at_20,
            stop=stop,
            extra=lambda: {"threads": 1, "checkpoint_every": 10, "wall_seconds_legs": [0.1]},
        )
    (folder / "config.json").write_text("{}")  # the sweep sees an incomplete run
    report = sweep.run_sweep(spec, out, threads=2, quiet=True)
    s = json.loads((folder / "summary.json").read_text())
    assert report.exit_code == 0 and s["resumed_from_step"] == 20 and s["blas_threads"] == 1
    ref = tmp_path / "ref"
    sweep.run_sweep(spec, ref, threads=1, quiet=True)
    assert (folder / "metrics.csv").read_bytes() == (ref / planned.id / "metrics.csv").read_bytes()


def test_a_second_sweep_on_the_same_folder_is_refused(tmp_path, capsys):
    spec = write(tmp_path, GRID)
    out = tmp_path / "out"
    out.mkdir()
    # Another writer (a sweep, or any numstab command) holds the folder's lock.
    with open(out / LOCK_NAME, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli_sweep.main([spec, "--out", str(out), "--quiet"]) == 2
    assert "is writing to" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [LOCK_NAME]


# --- ids and dry run -------------------------------------------------------------------------


def test_ids_are_stable_and_change_with_every_field():
    base = TrainConfig(p=11, hidden=(16, 16), steps=20)
    assert sweep.run_id(base) == sweep.run_id(TrainConfig(p=11, hidden=[16, 16], steps=20))
    assert sweep.run_id(base.replace(lr=1)) == sweep.run_id(base.replace(lr=1.0))
    assert len(sweep.run_id(base)) == 12 and int(sweep.run_id(base), 16) >= 0
    changed = {
        "task": "mul",
        "p": 13,
        "train_fraction": 0.5,
        "encoding": "binary",
        "parity_bits": 40,
        "parity_k": 4,
        "parity_samples": 1000,
        "hidden": (16,),
        "bias": True,
        "alpha": 2.0,
        "dtype": "float64",
        "loss_dtype": "float64",
        "order": "sequential",
        "loss": "stablemax",
        "stablemax_eps": 1e-30,
        "optimizer": "sgd",
        "state_dtype": "float64",
        "lr": 0.02,
        "beta1": 0.8,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 1.0,
        "momentum": 0.9,
        "perp_grad": "tensor",
        "normalized_lr": True,
        "steps": 21,
        "batch_size": 8,
        "log_every": 7,
        "seed": 1,
        "zero_target_grad_from": 3,
        "temperature": 2.0,
        "label_smoothing": 0.1,
        "residue_start": 1,
        "model": "transformer",
        "d_model": 64,
        "heads": 2,
        "d_ff": 64,
        "dropout": 0.2,
        "norm_placement": "pre",
        "attention": "stablemax",
        "layer_norm_eps": 1e-6,
    }
    # Fields added to TrainConfig after this test was written get a generic change.
    for f in dataclasses.fields(TrainConfig):
        if f.name not in changed:
            d = getattr(base, f.name)
            if isinstance(d, bool):
                changed[f.name] = not d
            elif isinstance(d, (int, float)):
                changed[f.name] = d + 1
    ids = {sweep.run_id(base)}
    for k, v in changed.items():
        # Momentum applies to SGD alone (Adam's is beta1); optimizer="sgd" by itself is in
        # the set too, so the momentum run must still get an id of its own.
        extra = {"optimizer": "sgd"} if k == "momentum" else {}
        if k in TRANSFORMER_FIELDS:  # options of the transformer alone
            extra = {"model": "transformer", "hidden": (200, 200)}
        if k == "model":
            extra = {"hidden": (200, 200)}
        if k.startswith("parity_"):  # options read by one task, optimizer or loss alone
            extra = {"task": "parity", "p": 113}  # the base's p = 11 is the modular task's
        if k == "stablemax_eps":
            extra = {"loss": "stablemax"}
        ids.add(sweep.run_id(base.replace(**extra, **{k: v})))
    assert len(ids) == len(changed) + 1


def test_dry_run_lists_runs_creates_nothing_and_ids_match_other_processes(tmp_path):
    spec = write(tmp_path, GRID)
    out = tmp_path / "out"
    ids = [r.id for r in sweep.load_spec(spec).runs]
    assert ids == [r.id for r in sweep.load_spec(spec).runs]
    # A fresh interpreter (another hash seed) prints the same ids.
    proc = subprocess.run(
        [sys.executable, "-m", "numstab.sweep", spec, "--out", str(out), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert proc.returncode == 0, proc.stderr
    for rid in ids:
        assert rid in proc.stdout
    assert "dtype" in proc.stdout and "seed" in proc.stdout and "float64" in proc.stdout
    assert proc.stdout.count(" run\n") == 4
    assert not out.exists()


def test_dry_run_shows_what_resume_would_do(local_grid, tmp_path, capsys):
    spec, out, _ = local_grid
    assert cli_sweep.main([spec, "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert text.count(" skip") == 4 and "0 would run" in text


# --- SPEC robustness: refused in one line before anything runs ------------------------------


def run_cli(args, timeout=120):
    """``python -m numstab.sweep ARGS`` in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "numstab.sweep", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_refused(proc, *words):
    """Exit 2 with exactly one line on stderr, naming ``words``, and no traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_a_spec_that_is_not_utf8_is_refused_in_one_line(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_bytes(b"[base]\nsteps = 10\n# caf\xe9 (latin-1)\n")
    out = tmp_path / "out"
    assert_refused(run_cli([spec, "--out", out]), str(spec), "UTF-8", "0xe9", "line 3")
    assert not out.exists()


TINY = {"base": {"p": 11, "hidden": [16, 16], "steps": 5, "log_every": 5}}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        # 10**12 training pairs: the dataset alone would need tens of TiB.
        ("[base]\np = 1000000\n", ["grid run (base)", "base.p = 1000000", "TiB", "data"]),
        # A 10**6 x 10**6 weight matrix: 10**12 parameters.
        (
            "[base]\np = 11\n[axes]\nhidden = [[16], [1000000, 1000000]]\n",
            ["hidden=[1000000, 1000000]", "axes.hidden = [1000000, 1000000]", "parameters"],
        ),
    ],
)
def test_a_run_too_large_for_memory_is_refused_before_anything_runs(tmp_path, text, words):
    spec = write(tmp_path, text)
    out = tmp_path / "out"
    proc = run_cli([spec, "--out", out])
    assert_refused(proc, *words, "needs about", "per run", "--max-run-gib")
    assert not out.exists()


# Trains a config given as JSON in a fresh interpreter, as a local sweep worker does (the
# worker's function, then the result encoded for the client); prints by how much the peak
# resident memory rose above the resident memory just before the run. Linux's VmHWM, reset
# just before the run (clear_refs 5): getrusage's ru_maxrss would not do, since it also counts
# the pages of the forking parent (here pytest) that the child held before exec.
MEASURE_PEAK = """
import json, sys
from numstab.sweep import _config_kwargs, execute, run_id
from numstab.run import TrainConfig

def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

config = TrainConfig(**json.loads(sys.argv[1]))
task = {"id": run_id(config), "config": _config_kwargs(config), "threads": 1}
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kib("VmRSS")
result = execute(task)
assert result["status"] == "ok", result["error"]
message = json.dumps(result)
print((status_kib("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="measures with Linux's /proc/self"
)
@pytest.mark.parametrize(
    "kw",
    [
        {"p": 150, "steps": 2},  # activations dominate (float32)
        {"p": 113, "steps": 2, "dtype": "float64"},
        {"p": 97, "steps": 2, "encoding": "binary", "dtype": "float16"},
        {"p": 11, "hidden": [16, 16], "steps": 5000, "log_every": 1},  # metrics dominate
    ],
)
def test_the_memory_estimate_bounds_a_real_run(kw):
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE_PEAK, json.dumps(kw)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    measured = int(proc.stdout)
    estimate = estimate_run_memory(TrainConfig(**kw)).total
    # The documented claim (numstab/footprint.py): an upper bound of the measured growth, and
    # at most twice it plus the fixed overhead term.
    assert measured <= estimate <= 2 * measured + OVERHEAD_BYTES, (measured, estimate)


def test_the_memory_limit_is_a_parameter(tmp_path):
    need = estimate_run_memory(TrainConfig(**TINY["base"])).total
    with pytest.raises(sweep.SpecError, match="needs about"):
        sweep.parse_spec(TINY, max_run_bytes=need - 1)
    assert len(sweep.parse_spec(TINY, max_run_bytes=need).runs) == 1
    assert len(sweep.parse_spec(TINY, max_run_bytes=None).runs) == 1
    spec = write(tmp_path, "[base]\np = 11\nhidden = [16, 16]\nsteps = 5\n")
    assert_refused(run_cli([spec, "--dry-run", "--max-run-gib", 1e-6]), "needs about")
    assert_refused(run_cli([spec, "--dry-run", "--max-run-gib", 0]), "--max-run-gib", "0")
    assert run_cli([spec, "--dry-run", "--max-run-gib", 1]).returncode == 0


def test_the_default_memory_limit_is_half_the_physical_memory():
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # The smallest modulus whose run needs more than half of this machine's memory.
    p = 2
    while estimate_run_memory(TrainConfig(p=p, steps=1)).total <= physical // 2:
        p *= 2
    lo, hi = p // 2, p
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fits = estimate_run_memory(TrainConfig(p=mid, steps=1)).total <= physical // 2
        lo, hi = (mid, hi) if fits else (lo, mid)
    assert len(sweep.parse_spec({"base": {"p": lo, "steps": 1}}).runs) == 1
    with pytest.raises(sweep.SpecError, match=f"base.p = {hi}"):
        sweep.parse_spec({"base": {"p": hi, "steps": 1}})


def test_a_huge_grid_is_refused_from_its_axis_lengths(tmp_path):
    # 10**9 valid runs: expanding the grid would take hours and gigabytes; the count is a
    # product of the axis lengths.
    fields = ["seed", "steps", "log_every", "lr", "beta1", "beta2", "eps", "alpha", "weight_decay"]
    axes = {
        "seed": range(10),
        "steps": range(1, 11),
        "log_every": range(1, 11),
        "lr": [0.01 * (i + 1) for i in range(10)],
        "beta1": [0.5 + 0.01 * i for i in range(10)],
        "beta2": [0.9 + 0.001 * i for i in range(10)],
        "eps": [10.0 ** -(i + 5) for i in range(10)],
        "alpha": [1.0 + i for i in range(10)],
        "weight_decay": [0.1 * i for i in range(10)],
    }
    assert list(axes) == fields
    text = "[base]\np = 11\nhidden = [16, 16]\n\n[axes]\n" + "".join(
        f"{k} = [{', '.join(repr(v) for v in vs)}]\n" for k, vs in axes.items()
    )
    spec = write(tmp_path, text)
    proc = run_cli([spec, "--dry-run"], timeout=60)
    assert_refused(proc, "1,000,000,000 runs", "more than 10,000", "--allow-large")


def test_allow_large_lifts_the_run_count_limit(tmp_path):
    three = {**TINY, "axes": {"seed": [0, 1, 2]}}
    with pytest.raises(sweep.SpecError, match="3 runs .* more than 2"):
        sweep.parse_spec(three, max_runs=2)
    assert len(sweep.parse_spec(three, max_runs=3).runs) == 3
    assert len(sweep.parse_spec(three, max_runs=None).runs) == 3
    n = sweep.MAX_RUNS + 1
    lrs = ", ".join(repr((i + 1) * 1e-5) for i in range(n))
    spec = write(
        tmp_path, f"[base]\np = 11\nhidden = [16, 16]\nsteps = 5\n\n[axes]\nlr = [{lrs}]\n"
    )
    assert_refused(run_cli([spec, "--dry-run"]), f"{n:,} runs", "--allow-large")
    proc = run_cli([spec, "--dry-run", "--allow-large"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{n} runs in ")


def test_backend_cupy_is_checked_before_the_sweep_starts(tmp_path):
    try:
        get_backend("cupy")
        usable = True
    except RuntimeError:
        usable = False
    spec = write(tmp_path, '[base]\np = 11\nhidden = [16, 16]\nsteps = 5\nbackend = "cupy"\n')
    out = tmp_path / "out"
    proc = run_cli([spec, "--out", out, "--quiet"], timeout=300)
    if usable:  # a GPU machine: the run trains there
        assert proc.returncode == 0, proc.stderr
    else:
        assert_refused(proc, 'backend = "cupy"', "CuPy" if "CuPy" in proc.stderr else "GPU")
        assert not out.exists()


# --- format aliases and duplicates --------------------------------------------------------------


def test_format_aliases_are_one_run_and_the_dry_run_says_so(tmp_path):
    base = {"p": 11, "hidden": [16, 16], "steps": 5}
    aliased = sweep.parse_spec(
        {
            "base": {**base, "loss_dtype": "double"},
            "axes": {"dtype": ["fp16", "float16", "f32", "float32", "FP64"]},
        }
    )
    canonical = sweep.parse_spec(
        {
            "base": {**base, "loss_dtype": "float64"},
            "axes": {"dtype": ["float16", "float32", "float64"]},
        }
    )
    assert [r.id for r in aliased.runs] == [r.id for r in canonical.runs]
    assert [r.axes["dtype"] for r in aliased.runs] == ["float16", "float32", "float64"]
    assert aliased.runs[0].config.loss_dtype == "float64"
    assert aliased.notes == (
        'axes.dtype: "float16" and "fp16" are both "float16": run once',
        'axes.dtype: "float32" and "f32" are both "float32": run once',
    )

    # The other aliased choices too (state_dtype, the loss name), and across [[runs]].
    sw = sweep.parse_spec(
        {
            "base": base,
            "runs": [
                {"state_dtype": "single", "loss": "softmax-stable"},
                {"state_dtype": "float32", "loss": "softmax_stable"},
            ],
        }
    )
    assert len(sw.runs) == 1 and sw.runs[0].config.state_dtype == "float32"
    assert sw.notes == (f"runs[1] is the same run as runs[0] (id {sw.runs[0].id}): run once",)

    spec = write(
        tmp_path,
        '[base]\np = 11\nhidden = [16, 16]\nsteps = 5\n[axes]\ndtype = ["fp16", "float16"]\n',
    )
    proc = run_cli([spec, "--dry-run"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1 runs in ")
    assert 'note: axes.dtype: "float16" and "fp16" are both "float16": run once' in proc.stdout


def test_a_worker_that_cannot_start_stops_the_sweep_with_one_message(tmp_path, monkeypatch):
    # A real process that exits at once, as a worker whose imports fail would.
    monkeypatch.setattr(
        executors, "_worker_command", lambda: [sys.executable, "-c", "raise SystemExit(3)"]
    )
    spec = write(tmp_path, GRID)
    out = tmp_path / "out"
    err = []
    report = sweep.run_sweep(spec, out, workers=2, quiet=True, stderr=_Lines(err))
    assert report.exit_code == 1 and report.executed == [] and report.failed == []
    assert "exited with code 3 before taking a run" in report.error
    assert [r["status"] for r in report.collected["summary"]] == ["incomplete"] * 4
    assert any("exited with code 3" in line for line in err)


class _Lines:
    """A text stream that keeps what is printed to it, line by line."""

    def __init__(self, lines):
        self.lines = lines

    def write(self, text):
        self.lines.extend(text.splitlines())
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return False


# --- collect ---------------------------------------------------------------------------------


def _fake_run(out, rid, seed, lr, status, sc50, test_acc):
    d = out / rid
    d.mkdir(parents=True)
    (d / "config.json").write_text(
        json.dumps(
            {"id": rid, "axes": {"lr": lr, "seed": seed}, "columns": ["lr", "seed"], "config": {}}
        )
    )
    (d / "summary.json").write_text(
        json.dumps(
            {
                "id": rid,
                "status": status,
                "error": None if status == "ok" else {"type": "NonFiniteError", "message": "nan"},
                "sc_onset_step": None if sc50 is None else sc50 - 10,
                "sc50_step": sc50,
                "train100_step": 20,
                "grok_step": None,
                "final": {"step": 200, "train_acc": 1.0, "test_acc": test_acc},
                "wall_seconds": 1.5,
            }
        )
    )
    (d / "metrics.csv").write_text(",".join(CSV_HEADER) + f"\n0,{rid},train,loss,,{seed + lr!r}\n")


def test_collect_groups_over_seeds_and_counts_missing_values(tmp_path):
    out = tmp_path / "sweep"
    _fake_run(out, "aaaaaaaaaaa1", 0, 0.1, "ok", 100, 0.5)
    _fake_run(out, "aaaaaaaaaaa2", 1, 0.1, "ok", None, 0.25)
    _fake_run(out, "aaaaaaaaaaa3", 2, 0.1, "ok", 140, 0.125)
    _fake_run(out, "aaaaaaaaaaa4", 3, 0.1, "failed", 5, 0.0)
    _fake_run(out, "0000000000b1", 0, 0.01, "ok", 300, 0.75)
    (out / "0000000000c1").mkdir()
    (out / "0000000000c1" / "config.json").write_text(
        json.dumps(
            {"id": "0000000000c1", "axes": {"lr": 0.01, "seed": 1}, "columns": ["lr", "seed"]}
        )
    )
    (out / "notes").mkdir()  # not a run folder

    res = sweep.collect(out)
    assert res["columns"] == ["lr", "seed"]
    assert [(r["lr"], r["seed"], r["status"]) for r in res["summary"]] == [
        (0.01, 0, "ok"),
        (0.01, 1, "incomplete"),
        (0.1, 0, "ok"),
        (0.1, 1, "ok"),
        (0.1, 2, "ok"),
        (0.1, 3, "failed"),
    ]
    g01, g1 = res["grouped"]
    assert (g1["lr"], g1["seeds"], g1["n_runs"], g1["n_ok"], g1["n_failed"]) == (
        0.1,
        "0 1 2 3",
        4,
        3,
        1,
    )
    assert (g01["n_ok"], g01["n_incomplete"]) == (1, 1)
    # SC-50 reached by 2 of the 3 ok seeds; the failed run is not averaged.
    assert g1["sc50_step_n"] == 2 and g1["sc50_step_mean"] == 120.0
    assert g1["sc50_step_std"] == pytest.approx(np.std([100, 140], ddof=1))
    assert g1["grok_step_n"] == 0 and g1["grok_step_mean"] is None
    assert g1["final_test_acc_n"] == 3
    assert g1["final_test_acc_mean"] == pytest.approx(np.mean([0.5, 0.25, 0.125]))
    assert g1["final_test_acc_std"] == pytest.approx(np.std([0.5, 0.25, 0.125], ddof=1))
    assert g01["final_test_acc_std"] is None  # one value: no sample std

    grouped = read_csv(out / "collected_grouped.csv")
    assert grouped[1]["sc50_step_n"] == "2" and grouped[1]["grok_step_mean"] == ""
    assert float(grouped[1]["sc50_step_std"]) == statistics.stdev([100, 140])
    summary = read_csv(out / "collected_summary.csv")
    assert summary[3]["sc50_step"] == "" and summary[5]["error"] == "NonFiniteError: nan"
    metrics = read_csv(out / "collected_metrics.csv")
    assert [m["run_id"] for m in metrics] == [
        "0000000000b1",
        "aaaaaaaaaaa1",
        "aaaaaaaaaaa2",
        "aaaaaaaaaaa3",
        "aaaaaaaaaaa4",
    ]
    assert list(metrics[0]) == ["run_id", *CSV_HEADER]
    assert res["metrics_rows"] == 5


def test_collect_command(local_grid, capsys):
    _, out, report = local_grid
    assert cli_sweep.main(["collect", str(out)]) == 0
    text = capsys.readouterr().out
    assert all(rid in text for rid in report.planned) and "4 runs collected" in text
    assert cli_sweep.main(["collect", str(out / "nope")]) == 2


def test_bundled_specs_load_by_name_from_any_folder(tmp_path, monkeypatch):
    # The SPECs ship inside the package (an installed numstab has them): every bundled name
    # loads from a folder that holds no SPEC, and a figure SPEC's [reproduce] table is left
    # to scripts/reproduce.py.
    monkeypatch.chdir(tmp_path)
    names = sweep.bundled_specs()
    assert {"example", "fig1", "fig2", "extra"} <= set(names)
    for name, path in names.items():
        assert os.path.dirname(path) == os.path.join(os.path.dirname(numstab.__file__), "specs")
        sw = sweep.load_spec(name)
        assert sw.runs and sweep.load_spec(name + ".toml").runs == sw.runs
    with pytest.raises(sweep.SpecError, match="bundled SPECs, by name: .*example"):
        sweep.load_spec("no-such-spec")


# --- module layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["main", "build_parser", "build_collect_parser"])
def test_the_command_line_moved_and_its_old_names_warn(name):
    with pytest.warns(DeprecationWarning, match=f"numstab.cli.sweep.{name}"):
        assert getattr(sweep, name) is getattr(cli_sweep, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        sweep.no_such_name  # noqa: B018


def test_the_sweep_package_does_not_import_its_command_line():
    # A fresh interpreter: importing the package (as a worker does) leaves the command line
    # alone, so numstab.cli.sweep can import the package without a cycle; every name of
    # __all__ resolves.
    code = (
        "import sys, warnings; import numstab.sweep as s; "
        "print('numstab.cli.sweep' in sys.modules); "
        "warnings.simplefilter('ignore'); print(all(getattr(s, n) for n in s.__all__))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
