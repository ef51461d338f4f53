"""Sweeps under real faults: real signals to a real sweep, a real worker killed, real pipes.

Every test here starts ``python -m numstab.sweep`` (or a script) as a separate process and
does to it what a user or the system would: SIGINT / SIGTERM, ``kill -9`` of a pool worker,
``| head``. Processes are found through ``/proc`` (Linux); whatever a test started is killed by
PID in its cleanup, whatever the outcome.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import read_head_then_close

from numstab import sweep

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self"), reason="finds worker processes through /proc (Linux)"
)

# A run that ends in well under a second, and one that would train for hours (10**8 steps of a
# 11-class problem; 100 logged steps, so its memory estimate stays small).
QUICK = "steps = 5\nlog_every = 5\n"
ENDLESS = "steps = 100000000\nlog_every = 1000000\n"
BASE = "[base]\np = 11\nhidden = [16, 16]\n"

# After a signal the sweep stops its workers with SIGTERM and waits at most 2 s before SIGKILL
# (docs/sweep.md); it notices the signal within its 0.2 s polling interval. 5 s leaves 2.8 s
# for scheduling on a loaded 2-core machine.
STOP_BOUND_S = 5.0


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid``."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and int(st[1]) == pid and st[0] != "Z":
                out.append(int(name))
    return out


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def cpu_seconds(pid: int) -> float:
    st = _stat(pid)
    if st is None:
        return 0.0
    # utime and stime are fields 14 and 15 of /proc/PID/stat, here 11 and 12 (after the name).
    return (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_sweep(spec: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "numstab.sweep", spec, "--out", str(out), "--quiet", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def reap(proc: subprocess.Popen, others: list[int]) -> None:
    """Kill (by PID) whatever this test started and is still running."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in others:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def read_summary(out: Path) -> dict:
    with open(out / "collected_summary.csv", newline="") as f:
        return {r["run_id"]: r for r in csv.DictReader(f)}


# --- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_local_sweep_keeps_finished_runs_and_stops_the_workers(
    tmp_path, signum, code
):
    spec = tmp_path / "spec.toml"
    spec.write_text(f"{BASE}\n[[runs]]\n{QUICK}\n[[runs]]\nseed = 1\n{ENDLESS}")
    quick, endless = (r.id for r in sweep.load_spec(spec).runs)
    out = tmp_path / "out"
    proc = start_sweep(str(spec), out, "--workers", "2")
    workers: list[int] = []
    try:
        wait_for(lambda: (out / quick / "summary.json").exists(), 120, "the quick run")
        workers = wait_for(lambda: children(proc.pid), 30, "the pool workers")
        assert proc.poll() is None, proc.communicate()
        t0 = time.monotonic()
        os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        stopped = [p for p in workers if not alive(p)]
        assert proc.returncode == code, err
        assert "Traceback" not in err, err
        assert "interrupted" in err
        # Stopped before the sweep exits, and the sweep exits promptly (see STOP_BOUND_S).
        assert stopped == workers, [cmdline(p) for p in workers if alive(p)]
        assert elapsed < STOP_BOUND_S, elapsed
        # The finished run is kept and collected; the one in flight is left incomplete.
        rows = read_summary(out)
        assert rows[quick]["status"] == "ok" and rows[endless]["status"] == "incomplete"
        assert not (out / endless / "summary.json").exists()
        assert (out / endless / "config.json").exists()
    finally:
        reap(proc, workers)


# --- a worker killed --------------------------------------------------------------------------


def test_a_killed_worker_fails_only_its_run_and_the_others_still_run(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        f"{BASE}\n[[runs]]\n{ENDLESS}"
        + "".join(f"\n[[runs]]\nseed = {s}\n{QUICK}" for s in (1, 2, 3))
    )
    ids = [r.id for r in sweep.load_spec(spec).runs]
    out = tmp_path / "out"
    # One worker: it takes the endless run first; the three others have not started.
    proc = start_sweep(str(spec), out, "--workers", "1")
    seen: list[int] = []
    try:

        def training_worker():
            ws = [p for p in children(proc.pid) if "resource_tracker" not in cmdline(p)]
            seen.extend(p for p in ws if p not in seen)
            # Importing the worker's modules costs under 1 s of CPU: beyond 2.5 s it trains.
            return next((p for p in ws if cpu_seconds(p) > 2.5), None)

        victim = wait_for(training_worker, 120, "the worker training the endless run")
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
        seen.extend(children(proc.pid) if proc.poll() is None else [])
        assert proc.returncode == 1, err
        rows = read_summary(out)
        assert [rows[i]["status"] for i in ids] == ["failed", "ok", "ok", "ok"], err
        s = json.loads((out / ids[0] / "summary.json").read_text())
        assert s["error"]["type"] == "WorkerDied", s["error"]
        assert "SIGKILL" in s["error"]["message"] and str(victim) in s["error"]["message"]
        assert re.search(rf"{ids[0]}.*WorkerDied", err) and "1 run(s) failed" in err
    finally:
        reap(proc, seen)


# --- a sweep killed outright, then continued from its checkpoints ---------------------------------

# 3 000 steps of the 11-class problem: about 2 s of training here, checkpointed every 100.
LONG = "steps = 3000\nlog_every = 50\n"


def test_a_sweep_killed_outright_continues_its_run_from_the_last_checkpoint_bit_for_bit(
    tmp_path,
):
    # What a machine that goes away does: SIGKILL to the sweep and its worker, no handler
    # runs. The next invocation continues the run from its last checkpoint, and its
    # metrics.csv is byte for byte that of an uninterrupted sweep.
    spec = tmp_path / "spec.toml"
    spec.write_text(f"{BASE}\n[[runs]]\n{LONG}")
    (rid,) = (r.id for r in sweep.load_spec(spec).runs)
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert sweep.run_sweep(str(spec), ref, quiet=True).exit_code == 0

    proc = start_sweep(str(spec), out, "--checkpoint-every", "100")
    seen: list[int] = []
    try:

        def checkpointed():
            seen.extend(p for p in children(proc.pid) if p not in seen)
            return (out / rid / "checkpoint.json").exists()

        wait_for(checkpointed, 120, "the run's first checkpoint")
        for pid in [proc.pid, *seen]:
            with contextlib.suppress(ProcessLookupError):  # a helper process already gone
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    finally:
        reap(proc, seen)
    assert not (out / rid / "summary.json").exists()  # killed in flight: incomplete

    again = subprocess.run(
        [sys.executable, "-m", "numstab.sweep", str(spec), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "1 to run (1 from their checkpoints)" in again.stdout, again.stdout
    s = json.loads((out / rid / "summary.json").read_text())
    # The kill came after the first checkpoint and (2 s of training) before the last.
    assert 100 <= s["resumed_from_step"] < 3000 and s["resumed_from_step"] % 100 == 0, s
    assert len(s["wall_seconds_legs"]) == 2 and s["blas_threads"] == 1
    assert s["wall_seconds"] == pytest.approx(sum(s["wall_seconds_legs"]))
    assert (out / rid / "metrics.csv").read_bytes() == (ref / rid / "metrics.csv").read_bytes()


# --- scripts without a main guard --------------------------------------------------------------


def _doc_block(page: str, index: int) -> str:
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.MULTILINE | re.DOTALL)
    return blocks[index]


def test_the_documented_api_runs_as_a_script_without_a_main_guard(tmp_path):
    code = _doc_block("sweep.md", 0)
    assert "__main__" not in code  # the scenario: a script with no guard at all
    script = tmp_path / "api_example.py"
    script.write_text(code + '\nprint("script done")\n')
    tmp = tmp_path / "tmp"  # the script's tempfile.mkdtemp() goes here
    tmp.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,  # the example loads the bundled SPEC "example" by name, from any folder
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    assert proc.returncode == 0, proc.stderr
    # The script ran once: the workers never re-executed it.
    assert proc.stdout.count("script done") == 1, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    # The example removes its folder at the end: nothing is left behind.
    assert list(tmp.iterdir()) == []


def test_the_documented_script_with_a_guard_runs(tmp_path):
    code = _doc_block("sweep.md", 1)
    assert 'if __name__ == "__main__":' in code
    script = tmp_path / "run_tiny.py"
    script.write_text(code)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["status"] for r in read_summary(tmp_path / "runs" / "tiny").values()] == ["ok"] * 2


# --- a closed stdout --------------------------------------------------------------------------


def test_dry_run_into_a_pipe_closed_early_ends_quietly_with_141(tmp_path):
    # 3000 runs: about 200 KB of table, far more than a pipe holds (64 KiB on Linux), so the
    # sweep is still writing when the reader goes away.
    spec = tmp_path / "spec.toml"
    lrs = ", ".join(repr((i + 1) * 1e-4) for i in range(3000))
    spec.write_text(f"{BASE}steps = 5\n\n[axes]\nlr = [{lrs}]\n")
    head, rc, err = read_head_then_close(
        [sys.executable, "-m", "numstab.sweep", str(spec), "--dry-run"], 3  # `| head -3`
    )
    assert head[0].startswith(b"3000 runs in ")
    assert rc == 141, err
    assert err == ""
