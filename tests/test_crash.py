"""Nothing already written is destroyed: real processes killed, refused, starved of disk.

Every test runs ``python -m numstab.train`` / ``python -m numstab.compare`` as a separate
process. Kills are SIGKILL at seeded random delays (nothing runs after them: no handler, no
``finally``); a full disk is ``RLIMIT_FSIZE`` in the child with SIGXFSZ ignored, so a write past
the limit fails with EFBIG as it would with ENOSPC. The reference for "nothing lost" is always
an uninterrupted process with the same options, compared byte for byte.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from numstab.run.checkpoint import MANIFEST, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
# A run of ~60 small steps: 11 classes, 8-wide layers; a checkpoint at every step, so most of
# its wall time is spent inside checkpoint writes (each one fsyncs twice).
TINY = ["--hidden", "8", "--modulus", "11", "--quiet"]
TRAIN = [*TINY, "--steps", "60", "--checkpoint-every", "1"]
COMPARE = [*TINY, "--steps", "30", "--audit-every", "10", "--log-every", "5",
           "--checkpoint-every", "1"]


def cli(module: str, *args, limit_bytes: int | None = None, wait: bool = True):
    """Run ``python -m numstab.<module> args`` (optionally under RLIMIT_FSIZE)."""
    cmd = [sys.executable, "-m", f"numstab.{module}", *map(str, args)]
    pre = None
    if limit_bytes is not None:
        import resource

        def pre():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write, don't kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=pre)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=pre)


def snapshot(d: Path) -> dict:
    """Every entry of ``d``: bytes, mtime (ns) and inode (an atomic rewrite changes the inode)."""
    out = {}
    for p in sorted(d.iterdir()):
        st = p.stat()
        out[p.name] = (p.read_bytes(), st.st_mtime_ns, st.st_ino)
    return out


def arrays_bytes(d: Path) -> dict:
    """The checkpoint's arrays as (dtype, shape, bytes), after full verification."""
    ck = load_checkpoint(d)
    return {k: (a.dtype.str, a.shape, a.tobytes()) for k, a in ck.arrays.items()}


def text_of(path: Path) -> str:
    """A CSV file's text as written (its ``\\r\\n`` line ends kept)."""
    return path.read_bytes().decode()


def csv_rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted train and compare runs: their directories."""
    base = tmp_path_factory.mktemp("reference")
    t, c = base / "train", base / "compare"
    procs = [cli("train", *TRAIN, "--out", t, wait=False),
             cli("compare", *COMPARE, "--out", c, wait=False)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    return {"train": t, "compare": c}


# --- SIGKILL at random points, then resume: byte-identical to the uninterrupted run ----------


@pytest.mark.parametrize(
    "module, argv, kills, window",
    [("train", TRAIN, 5, (0.6, 2.6)), ("compare", COMPARE, 3, (1.0, 3.0))],
    ids=["train", "compare"],
)
def test_sigkill_at_random_points_then_resume_is_byte_identical(
    module, argv, kills, window, reference, tmp_path
):
    ref = reference[module]
    ref_csv = text_of(ref / "metrics.csv")
    d = tmp_path / "run"
    rng = np.random.default_rng(20250105)  # the delays are seeded: a failure can be replayed

    def start():
        if (d / MANIFEST).exists():
            return cli(module, "--resume", d, "--quiet", wait=False)
        return cli(module, *argv, "--out", d, wait=False)

    for _ in range(kills):
        proc = start()
        time.sleep(rng.uniform(*window))
        proc.kill()  # SIGKILL; a no-op when the process already ended
        proc.communicate(timeout=60)
        if proc.returncode == 0:
            break  # it finished before the kill
        # Whatever the kill interrupted, the last checkpoint loads and the CSV holds every row
        # it has (so a resume rebuilds the CSV from it) and only rows of the real run.
        ck_rows = len(load_checkpoint(d).arrays["metrics/step"]) if (d / MANIFEST).exists() else 0
        text = text_of(d / "metrics.csv") if (d / "metrics.csv").exists() else ""
        assert ref_csv.startswith(text)
        assert max(len(csv_rows(text)) - 1, 0) >= ck_rows
    proc = start()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert (d / "metrics.csv").read_bytes() == (ref / "metrics.csv").read_bytes()
    assert arrays_bytes(d) == arrays_bytes(ref)
    assert load_checkpoint(d).manifest["runs"] == load_checkpoint(ref).manifest["runs"]
    assert not [p.name for p in d.iterdir() if p.name.startswith(".tmp-")]


# --- a refused resume touches no file ----------------------------------------------------------


def _other_opt_dtype(run: str):
    """Optimizer state saved as float64 where the run keeps float32, with its manifest entry
    (dtype, shape, SHA-256) and checksum rewritten to match: only restoring it can tell."""

    def corrupt(d: Path) -> None:
        m = json.loads((d / MANIFEST).read_text())
        key = f"{run}/opt/W2/exp_avg"
        _edit_arrays(lambda a: a.update({key: a[key].astype(np.float64)}))(d, m)
        m["manifest_sha256"] = _digest(m)
        (d / MANIFEST).write_text(json.dumps(m, indent=1))

    return corrupt


@pytest.mark.parametrize(
    "module, corrupt, change, named",
    [("train", None, ["--lr", "0.02"], "--lr"),
     ("compare", None, ["--lr", "0.02"], "--lr"),
     ("compare", None, ["--audit-every", "7"], "--audit-every"),
     ("train", _other_opt_dtype("run"), [], "run/opt"),
     ("compare", _other_opt_dtype("test"), [], "test/opt")],
    ids=["train-lr", "compare-lr", "compare-audit-every", "train-opt-dtype", "compare-opt-dtype"],
)
def test_refused_resume_changes_no_file(module, corrupt, change, named, reference, tmp_path):
    # Refused before training (an option differs) or only when the checkpoint is restored
    # (state the model cannot take): either way metrics.csv and every other file stay as they
    # were, byte for byte, same inode and mtime (an atomic rewrite would change the inode).
    d = tmp_path / "run"
    shutil.copytree(reference[module], d)
    if corrupt is not None:
        corrupt(d)
    before = snapshot(d)
    proc = cli(module, "--resume", d, *change)
    assert proc.returncode == 2
    assert snapshot(d) == before
    line = one_line_error(proc)
    assert named in line and "resume" in line


def test_kill_at_the_first_write_of_a_resume_keeps_the_rows(reference, tmp_path):
    # Continuing the finished 60-step run to 80 steps: the resume's first change to
    # metrics.csv is noticed (polling its inode, size and mtime) and the process is killed at
    # once. The CSV must still hold every row before step 60, in order.
    d = tmp_path / "run"
    shutil.copytree(reference["train"], d)
    path = d / "metrics.csv"
    text = text_of(path)
    rows = csv_rows(text)
    keep = [r for r in rows[1:] if int(r[0]) < 60]
    assert 0 < len(keep) < len(rows) - 1
    prefix = "".join(",".join(r) + "\r\n" for r in [rows[0], *keep])
    assert text.startswith(prefix)

    def sig():
        st = path.stat()
        return st.st_ino, st.st_size, st.st_mtime_ns

    first = sig()
    proc = cli("train", "--resume", d, "--steps", "80", wait=False)
    try:
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            with contextlib.suppress(FileNotFoundError):
                if sig() != first:
                    break
            time.sleep(0.0005)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert sig() != first, "the resume never wrote metrics.csv"
    assert text_of(path).startswith(prefix)


@pytest.mark.parametrize("module", ["train", "compare"])
def test_resume_of_a_missing_or_checkpointless_directory_touches_nothing(module, tmp_path):
    missing = tmp_path / "missing"
    proc = cli(module, *TINY, "--resume", missing)
    assert proc.returncode == 2 and str(missing) in one_line_error(proc)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("mine")
    before = snapshot(empty)
    proc = cli(module, *TINY, "--resume", empty)
    assert proc.returncode == 2 and MANIFEST in one_line_error(proc)
    assert snapshot(empty) == before


def test_resume_with_a_full_disk_keeps_the_metrics(reference, tmp_path):
    # Continuing the finished 60-step run to 80 steps rebuilds the CSV without its final rows
    # (all but the last few hundred bytes); with room for no file above half the CSV that
    # rewrite fails: exit 4, and every file is as it was (no summary of a run that never ran).
    d = tmp_path / "run"
    shutil.copytree(reference["train"], d)
    before = snapshot(d)
    limit = len(before["metrics.csv"][0]) // 2
    proc = cli("train", "--resume", d, "--steps", "80", limit_bytes=limit)
    assert proc.returncode == 4
    line = one_line_error(proc)
    assert "metrics.csv" in line and os.strerror(errno.EFBIG) in line
    assert snapshot(d) == before


# --- a full disk mid-run ----------------------------------------------------------------------


def test_full_disk_mid_run_exits_4_and_the_last_checkpoint_resumes(reference, tmp_path):
    # The arrays file grows with the logged rows (measured: 8 kB at step 0, 14 kB at step 1,
    # +6 kB per logged step, 45 kB at step 60). A limit halfway between the final CSV and the
    # final arrays file lets the CSV and the summary be written and fails a checkpoint write
    # mid-run.
    ref = reference["train"]
    npz = (ref / load_checkpoint(ref).manifest["arrays_file"]).stat().st_size
    csv_size = (ref / "metrics.csv").stat().st_size
    limit = (npz + csv_size) // 2
    assert (ref / "summary.json").stat().st_size < limit
    d = tmp_path / "run"
    proc = cli("train", *TRAIN, "--out", d, limit_bytes=limit)
    assert proc.returncode == 4, proc.stderr
    line = one_line_error(proc)
    assert os.strerror(errno.EFBIG) in line and ".npz" in line and "--resume" in line
    status = json.loads((d / "summary.json").read_text())["status"]
    assert status["kind"] == "output-error"
    ck = load_checkpoint(d)
    assert 0 < status["checkpoint_step"] == ck.manifest["runs"]["run"]["step"] < 60
    assert status["step"] >= status["checkpoint_step"]
    ref_csv = text_of(reference["train"] / "metrics.csv")
    assert ref_csv.startswith(text_of(d / "metrics.csv"))
    assert not [p.name for p in d.iterdir() if p.name.startswith(".tmp-")]
    proc = cli("train", "--resume", d, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (d / "metrics.csv").read_bytes() == (reference["train"] / "metrics.csv").read_bytes()
    assert arrays_bytes(d) == arrays_bytes(reference["train"])


def test_full_disk_while_logging_leaves_only_whole_rows(reference, tmp_path):
    # Logging every step without checkpoints, the CSV (~10 kB per 6 logged steps) is the first
    # file to outgrow twice the size of a summary; the summary itself fits.
    d = tmp_path / "run"
    limit = 2 * (reference["train"] / "summary.json").stat().st_size
    proc = cli("train", *TINY, "--steps", "60", "--log-every", "1", "--out", d,
               limit_bytes=limit)
    assert proc.returncode == 4, proc.stderr
    assert "metrics.csv" in one_line_error(proc)
    data = (d / "metrics.csv").read_bytes()
    assert 0 < len(data) <= limit and data.endswith(b"\r\n")
    rows = csv_rows(data.decode())
    assert rows[0] == ["step", "run", "split", "metric", "layer", "value"]
    assert all(len(r) == 6 for r in rows[1:])
    for r in rows[1:]:
        int(r[0]), float(r[5])  # whole, parseable rows only
    status = json.loads((d / "summary.json").read_text())["status"]
    assert status["kind"] == "output-error" and status["checkpoint_step"] is None
    assert status["step"] > max(int(r[0]) for r in rows[1:])  # the rows it could not write


# --- one writer per directory; leftovers of killed writers -----------------------------------


def test_a_second_writer_is_refused_and_the_first_is_unharmed(tmp_path):
    d = tmp_path / "run"
    first = cli("train", *TINY, "--steps", "100000", "--log-every", "50",
                "--checkpoint-every", "500", "--out", d, wait=False)
    try:
        deadline = time.time() + 60
        while not (d / MANIFEST).exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        for module, args in [("train", [*TINY, "--steps", "20", "--out", d]),
                             ("compare", [*TINY, "--steps", "20", "--out", d]),
                             ("train", ["--resume", d])]:
            proc = cli(module, *args)
            assert proc.returncode == 2, (module, proc.stderr)
            assert f"another numstab process is writing to {str(d)!r}" in one_line_error(proc)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 130, err
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
    data = (d / "metrics.csv").read_bytes()
    assert b"\0" not in data
    rows = csv_rows(data.decode())
    assert {r[1] for r in rows[1:]} == {"run"}
    ck = load_checkpoint(d)
    assert len(rows) - 1 == len(ck.arrays["metrics/step"])


def test_the_claim_ends_with_the_command_in_process(tmp_path, capsys):
    """Called in-process, a command releases its directory when it returns, and is refused
    while another claim holds it (flock locks belong to open files, not processes)."""
    from numstab.cli import compare
    from numstab.cli.train import train_main
    from numstab.run import outdir

    d = tmp_path / "run"
    assert train_main([*TINY, "--steps", "3", "--out", str(d)]) == 0
    assert train_main(["--resume", str(d), "--quiet"]) == 0
    with outdir.claim(d):
        capsys.readouterr()
        assert compare.main([*TINY, "--steps", "3", "--out", str(d)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"python -m numstab.compare: error: another numstab process is writing "
                       f"to {str(d)!r}; wait for it to end, or write into another folder"]
    assert compare.main([*TINY, "--steps", "3", "--out", str(d)]) == 0


def test_leftovers_of_killed_writers_are_removed_on_the_next_start(reference, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(reference["train"], d)
    leftovers = [".tmp-k3j2h1g0-checkpoint-000031-0a1b2c3d.npz", ".tmp-abcdefgh-summary.json",
                 ".tmp-zyxwvuts-metrics.csv", ".write-test-q1w2e3r4", "compare.png.tmp.png",
                 "checkpoint-000030-deadbeef.npz"]  # an arrays file no manifest names
    for name in leftovers:
        (d / name).write_bytes(b"partial")
    (d / "notes.txt").write_text("mine")
    proc = cli("train", "--resume", d)
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in d.iterdir()}
    assert not names & set(leftovers)
    assert {"notes.txt", MANIFEST, load_checkpoint(d).manifest["arrays_file"]} <= names


# --- every manifest field is validated ------------------------------------------------------


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _digest(m: dict) -> str:
    """The manifest checksum as the format defines it: SHA-256 of the canonical JSON (sorted
    keys, no spaces) of every field but ``manifest_sha256``."""
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _edit_arrays(fn):
    def edit(d: Path, m: dict) -> None:
        npz = d / m["arrays_file"]
        with np.load(npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        fn(arrays)
        np.savez(npz, **arrays)  # a well-formed file whose manifest entries match it
        m["arrays"] = {k: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": _sha(a)}
                       for k, a in arrays.items()}
    return edit


def _run(m):
    return m["runs"]["run"]


def _other_rng_state(m):
    s = _run(m)["rng_state"]["state"]
    s["state"] = (s["state"] + 1) % 2**128  # a valid PCG64 state, just not the run's


# (name, edit(dir, manifest), recompute manifest_sha256?, the field the message must name, the
# file it must blame). With the checksum recomputed only the field's own validation can refuse.
M, A = MANIFEST, ".npz"
CORRUPTIONS = [
    ("runs missing", lambda d, m: m.pop("runs"), True, "runs", M),
    ("run without config", lambda d, m: _run(m).pop("config"), True, "runs.run.config", M),
    ("step not a number", lambda d, m: _run(m).update(step="abc"), True, "runs.run.step", M),
    ("step negative", lambda d, m: _run(m).update(step=-5), True, "runs.run.step", M),
    ("step moved back", lambda d, m: _run(m).update(step=30), True, "runs.run.step", M),
    ("opt_step changed", lambda d, m: _run(m).update(opt_step=39), True, "runs.run.opt_step", M),
    ("rng_state garbage", lambda d, m: _run(m).update(rng_state="garbage"), True,
     "runs.run.rng_state", M),
    ("extra a list", lambda d, m: m.update(extra=[]), True, "extra", M),
    ("opt state wrong shape",
     _edit_arrays(lambda a: a.update({"run/opt/W2/exp_avg": np.zeros(3, np.float32)})), True,
     "run/opt/W2/exp_avg", A),
    ("opt state other dtype",
     _edit_arrays(lambda a: a.update({"run/opt/W2/exp_avg": a["run/opt/W2/exp_avg"].astype(
         np.float64)})), True, "run/opt/", A),
    ("metric column ragged",
     _edit_arrays(lambda a: a.update({"metrics/value": a["metrics/value"][:-1]})), True,
     "metrics/value", A),
    ("metric column missing", _edit_arrays(lambda a: a.pop("metrics/layer")), True,
     "metrics/layer", M),
    ("array entry without dtype", lambda d, m: m["arrays"]["run/param/W1"].pop("dtype"), True,
     "arrays.run/param/W1", M),
    ("arrays a list", lambda d, m: m.update(arrays=sorted(m["arrays"])), True, "arrays", M),
    ("arrays_file outside", lambda d, m: m.update(arrays_file="../checkpoint-000040.npz"), True,
     "arrays_file", M),
    ("unknown field", lambda d, m: m.update(comment="edited"), True, "comment", M),
    ("config edited", lambda d, m: _run(m)["config"].update(lr=0.05), False, "manifest_sha256",
     M),
    ("rng_state edited", lambda d, m: _other_rng_state(m), False, "manifest_sha256", M),
]


def test_every_corrupted_manifest_field_is_refused_naming_it(tmp_path):
    """Each corruption: ``--resume`` exits 2 with one line naming the field and the file at
    fault, and no file in the directory changes. The processes run in parallel; every failure
    is reported."""
    base = tmp_path / "base"
    proc = cli("train", *TINY, "--steps", "40", "--out", base)
    assert proc.returncode == 0, proc.stderr
    cases = []
    for i, (name, edit, redigest, field, blamed) in enumerate(CORRUPTIONS):
        d = tmp_path / f"case{i}"
        shutil.copytree(base, d)
        m = json.loads((d / MANIFEST).read_text())
        edit(d, m)
        if redigest:
            m["manifest_sha256"] = _digest(m)
        (d / MANIFEST).write_text(json.dumps(m, indent=1))
        cases.append((name, field, blamed, d, snapshot(d), cli("train", "--resume", d,
                                                                 wait=False)))
    failures = []
    for name, field, blamed, d, before, p in cases:
        _, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        ok = (p.returncode == 2 and len(lines) == 1 and f"cannot resume: {field}" in lines[0]
              and lines[0].endswith(f"{blamed}')") and snapshot(d) == before)
        if not ok:
            failures.append(f"{name}: rc {p.returncode}, stderr {err.strip()!r}")
    assert not failures, "\n".join(failures)
