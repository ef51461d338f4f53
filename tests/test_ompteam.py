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
