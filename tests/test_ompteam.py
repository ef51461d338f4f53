"""numstab.ompteam finds torch's OpenMP runtime among the loaded libraries, and nothing where
torch is absent or runs on another thread pool. (Its use, the fused kernel on torch's team,
is tested in tests/test_kernels.py; the monitor's in tests/test_monitor.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from numstab import ompteam

torch = pytest.importorskip("torch")  # optional: the team is torch's


@pytest.fixture
def fresh(monkeypatch):
    """of_torch() looks again (its answer is kept per process)."""
    monkeypatch.setattr(ompteam, "_FOUND", {})


def test_the_team_is_torchs_loaded_openmp_runtime(fresh):
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip(f"torch's parallel backend here is not OpenMP ({torch.__version__})")
    team = ompteam.of_torch()
    assert team is not None and team.path in ompteam._loaded_runtimes()
    assert ompteam.OPENMP_LIBRARIES.search(team.path.rsplit("/", 1)[-1])
    assert ompteam.of_torch() is team  # looked up once


def test_no_team_where_torch_runs_another_thread_pool(fresh, monkeypatch):
    monkeypatch.setattr(
        torch.__config__, "parallel_info", lambda: "ATen parallel backend: native thread pool"
    )
    assert ompteam.of_torch() is None


def test_a_runtime_that_is_not_loaded_is_not_loaded_by_the_lookup(tmp_path):
    assert ompteam._open(str(tmp_path / "libgomp.so.1")) is None  # no such library
    assert ompteam._open(sys.executable) is None  # not a library the process loaded


def test_no_team_without_torch_imported():
    code = (
        "import sys; from numstab import ompteam; "
        "print(ompteam.of_torch(), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "False"]


def test_the_trial_keeps_the_faster_way_and_tries_again():
    """Call 0 untimed on the team, calls 1-4 alternate (odd on the team), then the way with
    the lower median (call 10 too, untimed) until calls 11-14 try again; the team's calls are
    counted."""
    trial = ompteam.Trial(calls=2, every=10)
    seconds = {True: 3.0, False: 1.0}  # alone faster
    ways = []
    for _ in range(14):
        way = trial.choose()
        ways.append(way)
        trial.record(way, seconds[way])
        if len(ways) == 10:
            seconds = {True: 1.0, False: 3.0}  # the team faster from the second trial on
    assert ways[:5] == [True, True, False, True, False]
    assert ways[5:10] == [False] * 5  # alone, the faster
    assert ways[10:] == [False, True, False, True]  # untimed, then the second trial
    assert trial.on_team is False and trial.team_calls == ways.count(True)
    trial.record(trial.choose(), 1.0)  # its last call: the team now faster
    assert trial.on_team is True
    with pytest.raises(ValueError, match="every > 2"):
        ompteam.Trial(calls=2, every=4)
