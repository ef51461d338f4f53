"""The benchmark suite runs end to end in its smoke mode (no timing assertions)."""

import importlib.util
import json
import statistics
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"
TABLE_HEADER = "sec case"  # the start of the table's column header


def run_bench(tmp_path, *extra, block_torch=False):
    args = ["--quick", "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "b.json")]
    if block_torch:
        # Simulate an environment without PyTorch: `import torch` raises ImportError.
        code = (
            "import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = [{str(BENCH)!r}, *{[*args, *extra]!r}]; "
            f"runpy.run_path({str(BENCH)!r}, run_name='__main__')"
        )
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, str(BENCH), *args, *extra]
    # A hang guard, not a speed check: --quick takes ~25 s of CPU, and its wall time on a
    # loaded 2-core machine was measured at 152 s (load 7).
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_quick_runs_and_prints_the_table(tmp_path):
    r = run_bench(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert TABLE_HEADER in out
    assert "targets (measured / target)" in out
    for sec in ("1 ", "1b ", "2 ", "2b ", "3 ", "4 ", "fmt "):
        assert any(line.startswith(sec) for line in out.splitlines()), sec
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"env", "records", "targets", "facts"} <= set(data)
    assert data["facts"]["audit"]["verdicts_identical"] is True
    # The formats section measured every case against the float16 nearest-even step.
    assert set(data["facts"]["formats"]) == {
        "float16",
        "float16 stochastic",
        "float16 stochastic update",
        "float8_e4m3fn",
        "float8_e5m2",
    }
    # The machine's GEMM peak is the best of NumPy's and (where installed) torch's BLAS,
    # each library's rates kept beside it.
    libs = {"NumPy's BLAS", "torch's BLAS"} if find_spec("torch") else {"NumPy's BLAS"}
    for dt in ("float32", "float64"):
        gemm = data["facts"]["limit"]["gemm"][dt]
        rates = gemm["flops_per_s_by_blas"]
        assert set(rates) == libs
        assert gemm["peak"] == max(max(r.values()) for r in rates.values())
        assert gemm["peak"] == rates[gemm["peak_blas"]][str(gemm["peak_threads"])]  # JSON keys
    # The monitor's overhead, round by round, sits inside its interval (torch installed).
    for phases in data["facts"].get("monitor", {}).values():
        for f in phases.values():
            lo, hi = f["paired_overhead_ci90"]
            assert lo <= f["paired_overhead"] <= hi
    # The checkpoint was cached and is reused by a second run.
    assert list((tmp_path / "cache").glob("late-*.npz"))


def test_quick_without_torch_reports_not_installed(tmp_path):
    r = run_bench(tmp_path, "--sections", "1", block_torch=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert TABLE_HEADER in r.stdout
    torch_rows = [line for line in r.stdout.splitlines() if "PyTorch" in line and "step" in line]
    assert torch_rows and all("not installed" in line for line in torch_rows)
    # without torch the peak is NumPy's BLAS alone
    assert "GEMM peak for the step's shapes" in r.stdout and "torch's BLAS" not in r.stdout


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_overhead_is_the_median_of_the_rounds_ratios():
    paired = _bench_module()._paired
    rng = np.random.default_rng(7)
    base = rng.uniform(0.02, 0.04, 41)
    # a load that drifts over the rounds hits both cases of a round: the ratios stay 1.07
    other = base * 1.07
    med, lo, hi = paired(base, other)
    # (x * 1.07) / x - 1 rounds three times, each by under 2**-52 of ~1: 0.07 within 1e-12
    assert abs(med - 0.07) < 1e-12 and abs(lo - 0.07) < 1e-12 and abs(hi - 0.07) < 1e-12
    # the median of the per-round ratios, against the standard library's median
    other = base * rng.uniform(1.0, 1.2, base.size)
    med, lo, hi = paired(base, other)
    ratios = [float(o) / float(b) - 1.0 for b, o in zip(base, other, strict=True)]
    assert med == statistics.median(ratios)
    # a percentile interval of medians of resampled rounds: within the ratios' range, around
    # the median, and narrower at a lower level
    assert min(ratios) <= lo <= med <= hi <= max(ratios)
    lo50, hi50 = paired(base, other, level=0.5)[1:]
    assert lo <= lo50 <= hi50 <= hi
