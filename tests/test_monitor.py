"""numstab.monitor: the collapse window, the metrics against independent references, the files,
and the proof against numstab's own engine (the paper's MLP in PyTorch from the same weights).

torch tests skip without torch, JAX tests without jax (optional dependencies).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import warnings

import ml_dtypes
import numpy as np
import pytest
from helpers import lanes8_loop
from threadpoolctl import threadpool_limits

from numstab.losses import LOSS_KINDS, collapse_mask, loss_backward, loss_forward, row_verdicts
from numstab.metrics import accuracy
from numstab.monitor.core import batch_metrics
from numstab.precision import REDUCTION_ORDERS, get_format
from numstab.run import Run, TrainConfig

try:
    import torch
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
try:
    import jax
except ImportError:  # pragma: no cover
    jax = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (optional)")
needs_jax = pytest.mark.skipif(jax is None, reason="jax is not installed (optional)")


@pytest.fixture(autouse=True)
def _one_thread():
    """One BLAS and one torch thread: two are several times slower on loaded 2-core hosts."""
    threads = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    if torch is not None:
        torch.set_num_threads(threads)


FORMATS = ("float16", "bfloat16", "float32", "float64")


# --- 1. the collapse window: screened metrics equal numstab's loss on every row -----------


def _adversarial(fmt, n_classes=7, seed=0):
    """Rows with max 0 and the others at gaps scanning the collapse threshold of ``fmt``
    (every term at the threshold, one term at it, ties at the top, a NaN row, -inf entries)."""
    f = get_format(fmt)
    rng = np.random.default_rng(seed)
    centre = f.precision * math.log(2)
    gaps = centre + np.linspace(-4, 4, 161)
    rows = []
    for g in gaps:
        rows.append(np.r_[0.0, -g * np.ones(n_classes - 1)])  # all others at the gap
        rows.append(np.r_[0.0, -g, -3 * g * np.ones(n_classes - 2)])  # one near term
        rows.append(np.r_[0.0, -g + rng.uniform(-1, 1, n_classes - 1)])
    rows.append(np.r_[0.0, 0.0, -100.0 * np.ones(n_classes - 2)])
    rows.append(np.r_[np.nan, np.zeros(n_classes - 1)])
    rows.append(np.r_[0.0, -np.inf * np.ones(n_classes - 1)])
    z = np.array(rows)
    z = z + rng.uniform(-50, 50, (len(rows), 1))  # shift: the max is not at 0
    z = rng.permuted(z, axis=1)
    y = np.where(rng.random(len(rows)) < 0.7, np.nanargmax(z, axis=1), 1)
    with np.errstate(invalid="ignore"):
        zf = z.astype(np.float32).astype(f.dtype) if fmt == "bfloat16" else z.astype(f.dtype)
    return zf, y


@pytest.mark.parametrize("kind", ["softmax", "stablemax"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_collapse_window_loses_no_collapsed_row(fmt, kind):
    """batch_metrics evaluates only the rows in the collapse window; its fractions must equal
    numstab's loss evaluated on every row, in every order; rows outside the window add only
    their rounding residual to the off-target mass (each |Σ_k g_k| <= 4 u: a sum of C
    entries whose magnitudes total <= 2, each rounded once)."""
    z, y = _adversarial(fmt, n_classes=7 if kind == "softmax" else 5)
    f = get_format(fmt)
    for order in REDUCTION_ORDERS:
        got = batch_metrics(z, y, f, kind=kind, order=order)
        with np.errstate(invalid="ignore"):
            loss, cache = loss_forward(z, y, kind=kind, fmt=f, order=order)
            g = loss_backward(cache, 1.0).astype(np.float64)
            sc = collapse_mask(z, f, kind=kind, order=order)
        n = len(y)
        assert got["accuracy"] == accuracy(z, y)  # ties, a NaN row: numstab's own rule
        assert got["sc_fraction"] == np.count_nonzero(sc) / n, order
        assert got["sc_fraction"] > 0, "the test logits must collapse somewhere"
        assert got["sc_window_fraction"] < 1, "and not everywhere"
        assert got["zero_loss_fraction"] == np.count_nonzero(loss == 0) / n
        zero_grad = g[np.arange(n), y] == 0
        assert got["zero_target_grad_fraction"] == np.count_nonzero(zero_grad) / n
        if kind == "stablemax":
            assert "off_target_mass" not in got  # StableMax's gradient has no zero sum
            continue
        every_row = batch_metrics(z, y, f, kind=kind, order=order, screen=False)
        assert every_row.pop("sc_window_fraction") == 1.0
        assert every_row == {k: v for k, v in got.items() if k != "sc_window_fraction"}, order
        row_mass = np.nan_to_num(g.sum(axis=1), nan=0.0)
        full = float(row_mass.sum()) / n
        assert abs(got["off_target_mass"] - full) <= 4 * f.unit_roundoff, order


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_row_verdicts_equal_the_full_loss(fmt, kind):
    """``row_verdicts`` (softmax: the target column and, in collapsed rows, ``p = e``; the
    other kinds: the full loss) against ``loss_forward``, ``loss_backward(dl = 1)`` and
    ``collapse_mask`` on every row of rows at the collapse threshold, in every order: the
    verdicts bit for bit, the row sum wherever it is formed (softmax: exactly the collapsed
    rows) to float64 rounding: two summation orders of C float64 terms differ by at most
    ``2 C 2**-53 Σ|g_k|``."""
    z, y = _adversarial(fmt, n_classes=7)
    f = get_format(fmt)
    rows = np.arange(len(y))
    for order in REDUCTION_ORDERS:
        collapsed, zero_loss, zero_grad, row_sum = row_verdicts(z, y, f, kind=kind, order=order)
        with np.errstate(invalid="ignore", over="ignore"):
            loss, cache = loss_forward(z, y, kind=kind, fmt=f, order=order)
            g = loss_backward(cache, 1.0).astype(np.float64)
        assert collapsed.any() and not collapsed.all(), "the rows must straddle the threshold"
        assert (collapsed == collapse_mask(z, f, kind=kind, order=order)).all(), order
        assert (zero_loss == (loss == 0)).all(), order
        assert (zero_grad == (g[rows, y] == 0)).all(), order
        formed = ~np.isnan(row_sum)
        if kind == "softmax":
            assert (formed == collapsed).all(), order
        else:
            assert (formed == ~np.isnan(g.sum(axis=1))).all(), order
        got, full = row_sum[formed], g[formed].sum(axis=1)
        bound = 2 * z.shape[1] * 2.0**-53 * np.abs(g[formed]).sum(axis=1)
        with np.errstate(invalid="ignore"):  # an infinite sum (MSE of -inf logits) must match
            assert np.where(np.isfinite(full), np.abs(got - full) <= bound, got == full).all()


def _keeps(z, fmt, seed=0):
    """Entry subsets for the screen: the top entries of these logits and of perturbed ones
    (a stale set, as the monitor carries from step to step), a random third, all, none."""
    from numstab.losses.softmax import top_entries

    rng = np.random.default_rng(seed)
    m = np.max(z, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        moved = z + rng.normal(0, 2, z.shape).astype(z.dtype)
    return {
        "top": top_entries(z, m, fmt),
        "stale": top_entries(moved, m + 1, fmt),
        "random": rng.choice(z.size, z.size // 3, replace=False),
        "all": np.arange(z.size),
        "none": np.arange(0),
    }


@pytest.mark.parametrize("n_classes", [7, 113])
@pytest.mark.parametrize("fmt", FORMATS)
def test_open_rows_proves_only_rows_that_do_not_collapse(fmt, n_classes):
    """``open_rows`` (the lower bound ``S_lo <= S`` from a subset of the terms) against
    numstab's full loss on rows straddling the collapse threshold, in every order: a row it
    proves open is not collapsed and has a non-zero loss and target gradient, for every
    subset of entries; with every entry kept ``S_lo = S``, so it proves exactly the rows with
    ``S > 1`` (every finite row that does not collapse), and with none, no row."""
    from numstab.losses.rounding import Rounding
    from numstab.losses.softmax import open_rows

    f = get_format(fmt)
    z, y = _adversarial(fmt, n_classes=n_classes)
    zc = z.astype(np.float32) if fmt == "bfloat16" else z  # the carrier the loss computes in
    rows = np.arange(len(y))
    finite = np.isfinite(zc).any(axis=1) & ~np.isnan(zc).any(axis=1) & ~np.isposinf(zc).any(axis=1)
    for order in REDUCTION_ORDERS:
        r = Rounding(f, order, "correct", np)
        with np.errstate(invalid="ignore", over="ignore"):
            loss, cache = loss_forward(z, y, fmt=f, order=order)
            g = loss_backward(cache, 1.0)
            collapsed = collapse_mask(z, f, order=order)
        nonzero = (loss != 0) & (g[rows, y] != 0)
        for name, keep in _keeps(zc, f).items():
            with np.errstate(invalid="ignore", over="ignore"):
                proved = open_rows(zc, np.max(zc, axis=1), r, keep)
            assert not (proved & (collapsed | ~nonzero)).any(), (order, name)
            if name == "all":
                assert (proved == (~collapsed & finite)).all(), order
                assert proved.any() and collapsed.any(), "the rows must straddle the threshold"
            if name == "none":
                assert not proved.any()


@pytest.mark.parametrize("fmt", FORMATS)
def test_row_verdicts_with_a_screen_are_those_without(fmt):
    """``row_verdicts`` with ``keep`` (rows proved open skip the exact pass) and ``row_max``
    returns the same arrays as without them, bit for bit (the row sums included, NaN where
    not formed), for every entry subset and order."""
    z, y = _adversarial(fmt, n_classes=113, seed=1)
    zc = z.astype(np.float32) if fmt == "bfloat16" else z
    f = get_format(fmt)
    for order in REDUCTION_ORDERS:
        with np.errstate(invalid="ignore", over="ignore"):
            want = row_verdicts(z, y, f, order=order)
            for name, keep in _keeps(zc, f, seed=2).items():
                got = row_verdicts(z, y, f, order=order, keep=keep, row_max=np.max(zc, axis=1))
                for a, b in zip(want, got, strict=True):
                    assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), name


def test_row_verdicts_refuses_bad_keep_and_row_max():
    z, y = np.zeros((2, 7), np.float32), np.array([0, 1])
    with pytest.raises(TypeError, match="keep must be a 1-D integer array"):
        row_verdicts(z, y, "float32", keep=np.array([0.5]))
    with pytest.raises(ValueError, match="keep must index the 14 entries"):
        row_verdicts(z, y, "float32", keep=np.array([14]))
    with pytest.raises(ValueError, match=r"row_max must have shape \(2,\)"):
        row_verdicts(z, y, "float32", row_max=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):  # every row open
        row_verdicts(z, np.array([0, 7]), "float32", keep=np.arange(14))


def test_top_entries_are_carried_only_for_the_same_batch():
    """TopEntries finds the entries on the first repeat of a batch, carries them for
    ``every`` calls, finds them again, and forgets them when the labels change."""
    from numstab.monitor.core import TopEntries

    f = get_format("float32")
    z, y = _adversarial("float32", n_classes=7)
    m = np.max(z, axis=1)
    top = TopEntries(every=3)
    assert top(z, m, y, f) is None  # first batch: nothing to compare with
    first = top(z, m, y, f)
    assert first is not None and first.size and top(z, m, y, f) is first
    assert top(z, m, y, f) is first and top(z, m, y, f) is not first  # found again
    assert top(z, m, y[::-1].copy(), f) is None  # another batch
    assert top(z, m, y[::-1].copy(), f) is not None
    assert top(z[:, :4], m, y[::-1].copy(), f) is None  # same labels, other classes


@pytest.mark.parametrize(
    "labels, error, match",
    [
        (np.array([0, 7]), ValueError, r"labels must lie in \[0, 7\)"),
        (np.array([0.0, 1.0]), TypeError, "labels must be an integer array"),
        (np.array([0, 1, 2]), ValueError, r"labels must have shape \(2,\)"),
    ],
)
def test_row_verdicts_refuses_bad_labels(labels, error, match):
    with pytest.raises(error, match=match):
        row_verdicts(np.zeros((2, 7), np.float32), labels, "float32")


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_wide_logits_are_rounded_before_the_window(fmt):
    """float32 logits of large magnitude measured in a narrower loss format: rounding them
    moves the gaps by more than the window's factor 4 unless the window sees the rounded
    values (as numstab's loss does)."""
    f = get_format(fmt)
    rng = np.random.default_rng(0)
    n, top = 2000, (60000.0 if fmt == "float16" else 10000.0)
    base = rng.uniform(0.9 * top, top, n)
    g = rng.uniform(0.5, 2.0, n) * f.precision * math.log(2)
    cols = [base, base - g, base - g - rng.uniform(0, 3, n), base - 3 * g]
    z = np.stack(cols, axis=1).astype(np.float32)
    y = np.zeros(n, dtype=np.int64)
    for order in REDUCTION_ORDERS:
        got = batch_metrics(z, y, f, order=order)
        want = collapse_mask(z, f, order=order).mean()
        assert 0 < got["sc_fraction"] == want < 1, order


def test_empty_and_one_class_batches():
    f = get_format("float32")
    empty = batch_metrics(np.zeros((0, 3), np.float32), np.zeros(0, np.int64), f)
    assert math.isnan(empty["sc_fraction"])
    one = batch_metrics(np.zeros((4, 1), np.float32), np.zeros(4, np.int64), f)
    assert one["sc_fraction"] == 1.0 and one["zero_loss_fraction"] == 1.0


# --- 2. Monitor on small PyTorch loops -------------------------------------------------


def _tiny(p=11, hidden=16, seed=0, dtype=None):
    torch.manual_seed(seed)
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    x = torch.cat([torch.eye(p)[a], torch.eye(p)[b]], dim=1)
    y = (a + b) % p
    model = torch.nn.Sequential(
        torch.nn.Linear(2 * p, hidden, bias=False),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, p, bias=False),
    )
    if dtype is not None:
        model, x = model.to(dtype), x.to(dtype)
    return model, x, y


def _loop(mon, model, opt, x, y, steps, crash_at=None):
    for step in range(steps):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        if step == crash_at:
            raise RuntimeError("crash")
        with mon.observe(step, logits, y, loss=loss):
            opt.step()


def _rows(path):
    with open(os.path.join(path, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


@needs_torch
def test_monitor_writes_train_files_that_plot(tmp_path):
    from numstab.monitor import Monitor

    model, x, y = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    out = tmp_path / "run"
    with Monitor(model, opt, out=out, every=2, audit_every=4, config={"label": "tiny"}) as mon:
        _loop(mon, model, opt, x, y, 9)
    rows = _rows(out)
    assert {r["step"] for r in rows} == {"0", "2", "4", "6", "8"}
    names = {(r["metric"], r["layer"]) for r in rows}
    for m in ("accuracy", "sc_fraction", "zero_loss_fraction", "zero_target_grad_fraction"):
        assert (m, "") in names
    for m in ("off_target_mass", "loss", "audit_sc_fraction_exact", "audit_agreement"):
        assert (m, "") in names
    for m in ("weight_norm", "grad_norm", "nlm_cos_grad", "absorbed_update_fraction"):
        assert {(m, "0.weight"), (m, "2.weight"), (m, "global")} <= names
    assert {r["step"] for r in rows if r["metric"] == "audit_agreement"} == {"0", "4", "8"}
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    got = (cfg["order"], cfg["every"], cfg["audit_every"], cfg["label"])
    assert got == ("pairwise", 2, 4, "tiny")
    assert cfg["torch"] == torch.__version__ and summary["status"] == "ok"
    assert summary["run"]["final"]["step"] == 8
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    pytest.importorskip("matplotlib")
    import plot_runs

    png = tmp_path / "run.png"
    argv = [str(out), "--out", str(png), "--plots", "sc_fraction", "nlm_cosine"]
    assert plot_runs.main(argv) == 0
    assert png.stat().st_size > 0


@needs_torch
def test_rows_survive_a_crash(tmp_path):
    from numstab.monitor import Monitor

    model, x, y = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with Monitor(model, opt, out=out) as mon:
            _loop(mon, model, opt, x, y, 10, crash_at=5)
    assert {r["step"] for r in _rows(out)} == {str(s) for s in range(5)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"]["kind"] == "RuntimeError"


@needs_torch
def test_cosine_and_norms_match_torch():
    """cos(θ, −∇L) and ‖θ‖ against torch's own float64 computation."""
    from numstab.monitor import Monitor

    model, x, y = _tiny(dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    mon = Monitor(model, opt)
    _loop(mon, model, opt, x, y, 3)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    opt.zero_grad()
    loss.backward()
    with mon.observe(3, logits, y):
        pass
    got = {(r[3], r[4]): r[5] for r in mon.log.rows if r[0] == 3}
    ws = [p.detach().double().flatten() for p in model.parameters()]
    gs = [-p.grad.double().flatten() for p in model.parameters()]
    for (name, _), w, g in zip(model.named_parameters(), ws, gs, strict=True):
        want = float(torch.dot(w, g) / (w.norm() * g.norm()))
        assert got[("nlm_cos_grad", name)] == pytest.approx(want, rel=1e-12)
        assert got[("weight_norm", name)] == pytest.approx(float(w.norm()), rel=1e-12)
    w, g = torch.cat(ws), torch.cat(gs)
    assert got[("nlm_cos_grad", "global")] == pytest.approx(
        float(torch.dot(w, g) / (w.norm() * g.norm())), rel=1e-12
    )


@needs_torch
@pytest.mark.parametrize("hidden", [16, 800])
def test_background_records_the_same_rows(tmp_path, hidden):
    """``background=True`` measures copies on the monitor's thread: the same metrics.csv rows,
    character for character (the audit's own duration aside), as measuring inline, with the
    loop zeroing its gradients in place (the copies must be taken before the loop moves on)
    and weight decay (θ read before the step); so does ``threads=2``. At ``hidden=800`` the
    first layer's copies (22 × 800 float32) come from the monitor's workspace (above
    ``MIN_BYTES``) and are reused while earlier steps are still pending on its thread."""
    from numstab.monitor import Monitor

    files = []
    for background, threads in ((False, 1), (True, 1), (False, 2)):
        model, x, y = _tiny(seed=3, hidden=hidden)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        out = tmp_path / f"bg{background}{threads}"
        with Monitor(
            model, opt, out=out, background=background, audit_every=4, threads=threads
        ) as mon:
            for step in range(9):
                logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=False)
                loss.backward()
                with mon.observe(step, logits, y, loss=loss):
                    opt.step()
        assert json.loads((out / "summary.json").read_text())["config"]["background"] is background
        assert hidden < 800 or mon._ws.nbytes > 0  # the copies came from the workspace
        rows = (out / "metrics.csv").read_text().splitlines()
        files.append([r for r in rows if ",audit_seconds," not in r])  # a time, not a metric
    assert files[0] == files[1] == files[2] and len(files[0]) > 9 * 15


@needs_torch
def test_default_threads_are_torchs_on_its_openmp_team(tmp_path, monkeypatch):
    """Inline, with torch on an OpenMP team and the fused kernels, the default ``threads`` is
    torch's thread count and the kernel's row blocks run on that team, on the steps its trial
    gives it (the first, then every other one: ``ompteam.Trial``), as summary.json counts
    (``openmp_team_steps``, beside the runtime's path); the rows are those of ``threads=1``,
    character for character (529 rows: split in blocks). In the background, for a model off
    the host (a ``meta`` tensor standing in for a GPU's), or on the NumPy path: one thread, no
    team."""
    from numstab import kernels, ompteam, teamkernels
    from numstab.monitor import Monitor

    team = ompteam.of_torch()
    if team is None or kernels.backend() != "numba":
        pytest.skip("needs torch on an OpenMP team and numba (the fast extra)")
    torch.set_num_threads(2)  # the fixture restores one
    on_team = []
    real = teamkernels.softmax_rows32
    monkeypatch.setattr(teamkernels, "softmax_rows32", lambda *a: on_team.append(1) or real(*a))
    files, summaries = [], []
    for threads in (1, None):
        model, x, y = _tiny(p=23, seed=4)
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        out = tmp_path / f"t{threads}"
        with Monitor(model, opt, out=out, threads=threads) as mon:
            _loop(mon, model, opt, x, y, 6)
        summaries.append(json.loads((out / "summary.json").read_text()))
        files.append((out / "metrics.csv").read_text().splitlines())
    assert files[0] == files[1] and len(files[0]) > 6 * 15
    (c1, cn), (s1, sn) = (s["config"] for s in summaries), summaries
    assert (c1["threads"], c1["openmp_team"], s1["openmp_team_steps"]) == (1, None, 0)
    assert (cn["threads"], cn["openmp_team"]) == (2, team.path)
    assert sn["openmp_team_steps"] == len(on_team) == 4  # steps 0, 1, 3, 5
    torch.set_num_threads(1)  # a background monitor warns when torch fills the cores
    with Monitor(model, background=True) as mon:
        assert (mon.threads, mon.settings()["openmp_team"]) == (1, None)
    torch.set_num_threads(2)
    with Monitor({"w": torch.zeros(3, device="meta", requires_grad=True)}) as mon:
        assert (mon.threads, mon.settings()["openmp_team"]) == (1, None)
    monkeypatch.setenv(kernels.ENV, "numpy")
    with Monitor(model) as mon:
        assert (mon.threads, mon.settings()["openmp_team"]) == (1, None)


@needs_torch
def test_background_warns_when_torch_fills_every_core(monkeypatch):
    from numstab.monitor import Monitor

    w = torch.zeros(3, requires_grad=True)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # the fixture's one torch thread fills it
    with pytest.warns(RuntimeWarning, match="1 threads on 1 cores"):
        Monitor({"w": w}, background=True).close()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Monitor({"w": w}, background=True).close()


@needs_torch
def test_background_error_is_raised_and_recorded(tmp_path):
    """A record that fails on the monitor's thread (a label out of range) raises at close, and
    summary.json says so; the folder is released."""
    from numstab.monitor import Monitor

    model, x, y = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = Monitor(model, opt, out=tmp_path / "m", background=True)
    logits = model(x)
    logits.sum().backward()
    with mon.observe(0, logits, torch.full_like(y, 99)):
        opt.step()
    with pytest.raises(ValueError, match="labels must lie in"):
        mon.close()
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["status"]["kind"] == "ValueError"
    Monitor(model, opt, out=tmp_path / "m").close()  # claimable again


@needs_torch
def test_monitor_skips_the_screen_while_most_rows_are_in_the_window():
    """A batch with 60 % of its rows in the window: screened on the first observed step and
    every RESCREEN_EVERY steps after (window fraction 0.6), evaluated row by row in between
    (window fraction 1); every other metric is the same on every step."""
    from numstab.monitor import Monitor
    from numstab.monitor.pytorch import RESCREEN_EVERY

    n = 50
    z = np.zeros((n, 4), np.float32)
    z[:, 1:] = np.where(np.arange(n)[:, None] < 30, -20.0, -1.0)  # t2 = e^-20 or e^-1
    logits, y = torch.from_numpy(z), torch.zeros(n, dtype=torch.long)
    w = torch.zeros(3, requires_grad=True)
    w.grad = torch.ones(3)
    mon = Monitor({"w": w})
    for step in range(2 * RESCREEN_EVERY + 1):
        with mon.observe(step, logits, y):
            pass
    rows = {}
    for r in mon.log.rows:
        rows.setdefault(r[3], []).append(r[5])
    screened = [0, RESCREEN_EVERY, 2 * RESCREEN_EVERY]
    assert [i for i, v in enumerate(rows["sc_window_fraction"]) if v != 1.0] == screened
    assert rows["sc_window_fraction"][0] == 0.6
    for metric in ("sc_fraction", "zero_loss_fraction", "off_target_mass", "accuracy"):
        assert len(set(rows[metric])) == 1, metric
    assert rows["sc_fraction"][0] == 0.6  # e^-20 < 2**-24: absorbed in float32


@needs_torch
@pytest.mark.parametrize("norm_order", ["lanes8", "blas"])
def test_norms_and_cosines_do_not_depend_on_the_loops_blas_threads(norm_order):
    """The monitor's norms and cosines are the same bits whatever BLAS threads the loop set:
    in the order ``"lanes8"`` (the default) they call no BLAS and equal its definition's
    loop; in ``"blas"`` they run on HOST_BLAS_THREADS threads and equal numstab.metrics
    computed on one thread, under a loop limit of 2 (a dot product of 10^5 entries is split
    across threads by a threaded BLAS, which sums in another order)."""
    from numstab.metrics import param_cosines, param_norms
    from numstab.monitor import Monitor

    g = torch.Generator().manual_seed(0)
    w = torch.randn(400, 250, generator=g, requires_grad=True)
    w.grad = torch.randn(400, 250, generator=g) * 1e-3
    mon = Monitor({"w": w}, norm_order=norm_order)
    with threadpool_limits(2), mon.observe(0, torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)):
        pass
    got = {(r[3], r[4]): r[5] for r in mon.log.rows}
    theta, grad = {"w": w.detach().numpy()}, {"w": w.grad.numpy()}
    if norm_order == "blas":
        with threadpool_limits(1):
            cos, norm = param_cosines(theta, grad, sign=-1.0)["w"], param_norms(theta)["w"]
    else:  # the definition (helpers.lanes8_loop), without NumPy's BLAS
        aa, bb, ab = lanes8_loop(theta["w"].reshape(-1), grad["w"].reshape(-1))
        cos, norm = (0.0 - ab) / math.sqrt(aa * bb), math.sqrt(aa)
    assert got[("nlm_cos_grad", "w")] == cos and got[("weight_norm", "w")] == norm
    assert mon.settings()["host_blas_threads"] == 1
    assert mon.settings()["norm_order"] == norm_order


@pytest.mark.parametrize("sign", [-1.0, 1.0])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_param_metrics_equal_numstab_metrics(dtype, sign):
    """The shared norms and cosines in the order ``"blas"`` (``param_norms_and_cosines``: one
    float64 copy and three dot products per tensor; the training loop's, and the monitor's
    with ``norm_order="blas"``) equal ``param_norms`` and
    ``param_cosines`` (four copies, five products) bit for bit, the sign of zero included:
    ⟨θ, −g⟩ is −⟨θ, g⟩ and ⟨−g, −g⟩ is ⟨g, g⟩ in the same order of additions, for tensors of
    several sizes, a zero gradient, unaligned views, at one BLAS thread."""
    from numstab.metrics import param_cosines, param_norms, param_norms_and_cosines
    from numstab.monitor.core import param_metrics

    rng = np.random.default_rng(0)
    for trial in range(20):
        shapes = [tuple(rng.integers(1, 300, size=rng.integers(1, 3))) for _ in range(3)]
        theta = {
            f"w{i}": (rng.standard_normal(s) * 10.0 ** rng.integers(-3, 3)).astype(dtype)
            for i, s in enumerate(shapes)
        }
        grads = {
            k: (rng.standard_normal(v.shape) * 10.0 ** rng.integers(-4, 1)).astype(dtype)
            for k, v in theta.items()
        }
        grads["w1"][...] = 0 if trial % 4 == 0 else grads["w1"]
        if trial % 5 == 1:  # orthogonal: every product ±0 or of opposite signs, ⟨θ, g⟩ = ±0
            theta["w2"][...], grads["w2"][...] = 0, 0
            theta["w2"].reshape(-1)[0], grads["w2"].reshape(-1)[-1] = 1, -2
        off = trial % 3  # a view starting 0, 1 or 2 elements into its buffer
        grads = {
            k: np.concatenate([np.zeros(off, dtype), v.reshape(-1)])[off:].reshape(v.shape)
            for k, v in grads.items()
        }
        want = {
            "weight_norm": param_norms(theta),
            "grad_norm": param_norms(grads),
            "nlm_cos_grad": param_cosines(theta, grads, sign=sign),
        }
        shared = dict(zip(want, param_norms_and_cosines(theta, grads, sign=sign), strict=True))
        for got in [shared, *([param_metrics(theta, grads, order="blas")] if sign < 0 else [])]:
            assert got.keys() == want.keys()
            for metric, values in want.items():
                assert got[metric].keys() == values.keys()
                for k, v in values.items():
                    w = got[metric][k]
                    assert (math.isnan(v) and math.isnan(w)) or (
                        v == w and math.copysign(1, v) == math.copysign(1, w)
                    ), (metric, k)


@needs_torch
def test_absorbed_updates_counted_by_hand():
    """θ = [1, 2**24, 2**24, 3], ∇ = [1, 1, 1, 0], SGD lr 0.5 in float32: 1 -> 0.5 moves,
    2**24 - 0.5 rounds back to 2**24 (twice), 3 has no update due. Absorbed: 2 of 3."""
    from numstab.monitor import Monitor

    theta = torch.nn.Parameter(torch.tensor([1.0, 2.0**24, 2.0**24, 3.0]))
    opt = torch.optim.SGD([theta], lr=0.5)
    mon = Monitor({"theta": theta}, opt)
    theta.grad = torch.tensor([1.0, 1.0, 1.0, 0.0])
    z = torch.tensor([[0.0, -1.0]])
    with mon.observe(0, z, torch.tensor([0])):
        opt.step()
    got = {(r[3], r[4]): r[5] for r in mon.log.rows}
    assert got[("absorbed_update_fraction", "theta")] == pytest.approx(2 / 3)
    assert got[("absorbed_update_fraction", "global")] == pytest.approx(2 / 3)


@needs_torch
def test_bfloat16_logits_are_measured_in_bfloat16():
    from numstab.monitor import Monitor

    theta = torch.nn.Parameter(torch.ones(2))
    theta.grad = torch.ones(2)
    gaps = [2.0, 5.0, 5.5, 6.0, 9.0]  # bfloat16 (p = 8) collapses from a gap of about 5.5
    z = torch.tensor([[0.0, -g] for g in gaps], dtype=torch.bfloat16)
    y = torch.zeros(len(gaps), dtype=torch.int64)
    mon = Monitor({"theta": theta})
    with mon.observe(0, z.requires_grad_(), y):
        pass
    got = {r[3]: r[5] for r in mon.log.rows if r[4] == ""}
    zb = np.array([[0.0, -g] for g in gaps], dtype=np.float32).astype(ml_dtypes.bfloat16)
    want = collapse_mask(zb, "bfloat16").mean()
    assert 0 < got["sc_fraction"] == want < 1
    # The same logits widened to float32, with the loss format given as a torch dtype.
    mon = Monitor({"theta": theta}, loss_format=torch.bfloat16)
    with mon.observe(0, z.float(), y):
        pass
    assert {r[3]: r[5] for r in mon.log.rows}["sc_fraction"] == want
    assert mon.settings()["loss_format"] == "bfloat16"


@needs_torch
def test_sequence_logits_count_every_position():
    """(batch, time, classes) logits with (batch, time) labels: one row per position."""
    from numstab.monitor import Monitor

    theta = torch.nn.Parameter(torch.ones(2))
    theta.grad = torch.ones(2)
    gaps = torch.tensor([[1.0, 30.0, 2.0], [40.0, 3.0, 50.0]])  # 3 of 6 collapse in float32
    z = torch.stack([torch.zeros_like(gaps), -gaps], dim=-1)
    mon = Monitor({"theta": theta})
    with mon.observe(0, z, torch.zeros(2, 3, dtype=torch.int64)):
        pass
    got = {r[3]: r[5] for r in mon.log.rows if r[4] == ""}
    assert got["sc_fraction"] == 0.5 and got["accuracy"] == 1.0


@needs_torch
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"loss": "hinge"}, "unknown loss"),
        ({"order": "random"}, "unknown order"),
        ({"norm_order": "pairwise"}, "unknown norm_order 'pairwise'; valid: blas, lanes8"),
        ({"every": 0}, "every must be a positive integer"),
        ({"audit_every": 1.5}, "audit_every must be"),
        ({"loss_format": "float7"}, "float7"),
        ({"threads": 0}, "threads must be a positive integer"),
        ({"background": "yes"}, "background must be a bool"),
    ],
)
def test_bad_arguments_are_named(kw, match, tmp_path):
    """Refused before the output folder is touched."""
    from numstab.monitor import Monitor

    model, _, _ = _tiny()
    with pytest.raises((ValueError, TypeError), match=match):
        Monitor(model, out=tmp_path / "m", **kw)
    assert not (tmp_path / "m").exists()


# --- 3. the JAX helper ---------------------------------------------------------------------


@needs_jax
def test_jax_metrics_match_numpy_references():
    import jax.numpy as jnp

    from numstab.monitor import jax_step_metrics

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((5, 3)), dtype=jnp.float32)}
    x = jnp.asarray(rng.standard_normal((8, 5)), dtype=jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 8))

    def loss_fn(p):
        logits = x @ p["w"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), y]), logits

    (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    new = {"w": params["w"] - 0.1 * grads["w"]}
    m = jax_step_metrics(params, grads, logits, y, new_params=new)
    for fmt in ("bfloat16", jnp.bfloat16):  # a name or a JAX dtype
        m16 = jax_step_metrics(params, grads, logits, y, loss_format=fmt)
        z16 = np.asarray(logits).astype(ml_dtypes.bfloat16)
        assert m16["sc_fraction"] == collapse_mask(z16, "bfloat16").mean()
    w, g = np.asarray(params["w"], np.float64).ravel(), -np.asarray(grads["w"], np.float64).ravel()
    want = w @ g / np.linalg.norm(w) / np.linalg.norm(g)
    assert m["nlm_cos_grad"]["['w']"] == pytest.approx(want)
    blas = jax_step_metrics(params, grads, logits, y, norm_order="blas")  # numstab.train's bits
    assert blas["nlm_cos_grad"]["['w']"] == pytest.approx(want)
    with pytest.raises(ValueError, match="norm_order"):
        jax_step_metrics(params, grads, logits, y, norm_order="pairwise")
    assert m["accuracy"] == np.mean(np.argmax(np.asarray(logits), 1) == np.asarray(y))
    assert m["sc_fraction"] == 0.0 and m["absorbed_update_fraction"]["global"] == 0.0
    assert set(m) >= {"zero_loss_fraction", "off_target_mass", "grad_norm", "weight_norm"}


def test_monitor_import_pulls_in_neither_torch_nor_jax():
    import subprocess

    code = "import sys, numstab.monitor; print('torch' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# --- 4. proof: the paper's MLP in PyTorch against numstab's engine, same initial weights ----


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in b)


def _ulp_growth(config: TrainConfig, steps: int) -> np.ndarray:
    """How far numstab's own trajectory moves when every initial weight moves by one ulp
    (random direction): per step, the max relative weight difference and the relative
    difference of the mean training loss, shape (steps + 1, 2)."""
    a, b = Run(config), Run(config)
    rng = np.random.default_rng(1)
    for w in b.params.values():
        away = np.where(rng.random(w.shape) < 0.5, np.inf, -np.inf).astype(w.dtype)
        w[...] = np.nextafter(w, away)
    out = []
    for _ in range(steps + 1):
        la, lb = (float(np.mean(r.evaluate("train").loss.astype(np.float64))) for r in (a, b))
        out.append((_max_rel_diff(a.params, b.params), abs(la - lb) / la))
        a.advance(log=False)
        b.advance(log=False)
    return np.array(out)


def _within_ulp_growth(hist, growth, steps, u):
    """The weights and losses of the two engines differ by at most 16 · (t + 1) · Δ*(t) + 8 u
    (see the float64 test), Δ*(t) the running maximum of numstab's one-ulp growth, 8 u the
    rounding of the two mean losses themselves."""
    t = np.arange(1, steps + 2)[:, None]
    bound = 16 * t * np.maximum.accumulate(growth[: steps + 1], axis=0) + 8 * u
    dl = np.abs(hist[: steps + 1, 1] - hist[: steps + 1, 2]) / hist[: steps + 1, 2]
    got = np.stack([hist[: steps + 1, 0], dl], axis=1)
    assert np.all(got <= bound), f"worst ratio to the bound: {np.max(got / bound, axis=0)}"
    return np.max(got, axis=0), np.max(bound, axis=0)


def _twin_trajectory(config: TrainConfig, steps: int):
    """Train numstab's Run and its PyTorch twin (monitored) side by side; per step the max
    relative weight difference, both losses, and both SC fractions."""
    from numstab.monitor import Monitor
    from numstab.monitor.paper import torch_twin

    run = Run(config)
    twin = torch_twin(run)
    mon = Monitor(twin.model, twin.optimizer)
    hist = []
    for t in range(steps + 1):
        w = {f"W{i + 1}": m.weight.detach().numpy().T for i, m in enumerate(twin.model[::2])}
        dw = _max_rel_diff(w, run.params)
        logits, loss = twin.step()
        with mon.observe(t, logits, twin.y, loss=loss):
            twin.optimizer.step()
        ev = run.evaluate("train")
        ours = float(np.mean(ev.loss.astype(np.float64)))
        sc = float(np.mean(run.collapse(ev)))
        hist.append((dw, float(loss.detach()), ours, sc))
        run.advance(log=False)
    _, torch_sc = mon.log.series("sc_fraction")
    return np.array(hist), torch_sc


def _first(values, pred):
    hit = np.flatnonzero(pred(np.asarray(values)))
    return int(hit[0]) if hit.size else None


@needs_torch
def test_float64_trajectories_agree():
    """float64, p = 31, 300 steps. Tolerance: the two engines round differently by a few ulps
    at each step; one ulp of difference grows at most like numstab's own trajectory under a
    one-ulp perturbation of the initial weights (Δ*, its maximum over the run, measured
    here), so T steps of such injections stay below K · T · Δ* for K ulps a step (the
    forward, backward and update each round several times). K is chosen: with K = 8 the
    worst step used 0.94 of the bound, so K = 16; the same
    for the relative difference of the mean loss. SC fraction: both 0 (float64 does not
    collapse here)."""
    config = TrainConfig(dtype="float64", p=31, steps=300)
    steps = 300
    hist, torch_sc = _twin_trajectory(config, steps)
    _within_ulp_growth(hist, _ulp_growth(config, steps), steps, 2.0**-53)
    assert np.all(hist[:, 3] == 0) and np.all(torch_sc == 0)


#: float32, p = 31, seed 0: numstab's SC-50 step and the band the twin's must lie in. The band
#: is the spread of numstab's own SC-50 step under one-ulp perturbations of the initial weights
#: (docs/monitor.md: 4 perturbations, steps 1 396 to 1 401), widened to ± 40 steps for the
#: PyTorch twin, whose arithmetic differs at every step (measured: 1 418).
SC50_P31 = {"numstab": 1402, "band": 40}


@needs_torch
def test_float32_agrees_until_the_first_collapse():
    """float32, p = 31: the weights agree (same bound as float64, in float32 ulps) until the
    first step where either engine measures a collapsed row; both see it at the same step."""
    config = TrainConfig(dtype="float32", p=31, steps=60)
    hist, torch_sc = _twin_trajectory(config, 60)
    onset_torch = _first(torch_sc, lambda v: v > 0)
    onset_ours = _first(hist[:, 3], lambda v: v > 0)
    assert onset_torch is not None and onset_torch == onset_ours
    _within_ulp_growth(hist, _ulp_growth(config, onset_ours), onset_ours, 2.0**-24)


@needs_torch
def test_float32_sc50_step_lies_in_the_band():  # 1 500 steps of both engines: about a minute
    config = TrainConfig(dtype="float32", p=31, steps=1500)
    hist, torch_sc = _twin_trajectory(config, 1500)
    ours = _first(hist[:, 3], lambda v: v >= 0.5)
    theirs = _first(torch_sc, lambda v: v >= 0.5)
    print(f"SC-50 step: numstab {ours}, PyTorch twin {theirs}")
    assert ours == SC50_P31["numstab"]
    assert theirs is not None and abs(theirs - ours) <= SC50_P31["band"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--width", "30"], "--width must be a multiple of 4"),
        (["--train-fraction", "1.5"], "--train-fraction must lie in (0, 1), got 1.5"),
    ],
)
def test_transformer_script_refuses_bad_values(argv, message, tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import monitor_transformer

    out = tmp_path / "run"
    assert monitor_transformer.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()  # a refused command writes nothing


@pytest.mark.parametrize(
    "z, y, match",
    [
        (np.zeros(3, np.float32), np.zeros(3, np.int64), "logits must be"),
        (np.zeros((3, 2), np.float32), np.zeros(2, np.int64), "labels"),
        (np.zeros((3, 2), np.float32), np.array([0, 1, 2]), r"labels must lie in \[0, 2\)"),
    ],
)
def test_batch_metrics_refuses_bad_shapes(z, y, match):
    with pytest.raises(ValueError, match=match):
        batch_metrics(z, y, get_format("float32"))


@needs_torch
@pytest.mark.parametrize("hidden_layers", [1, 6])
def test_a_monitor_writing_a_file_keeps_two_rows_a_step_in_memory(tmp_path, hidden_layers):
    """With ``out``, every row goes to metrics.csv and the log keeps in memory only the rows
    of ``SUMMARY_SERIES`` (two a step, whatever the number of tensors: a long loop's monitor
    stays small); summary.json's headline numbers equal :func:`summarize` of the full CSV."""
    from numstab.monitor import Monitor
    from numstab.run import MetricLog, summarize

    p, steps = 11, 5
    _, x, y = _tiny(p=p)
    layers = [torch.nn.Linear(2 * p, 16, bias=False), torch.nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [torch.nn.Linear(16, 16, bias=False), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(16, p, bias=False))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    out = tmp_path / "m"
    mon = Monitor(model, opt, out=out)
    _loop(mon, model, opt, x, y, steps)
    mon.close()
    rows = _rows(out)
    n_tensors = hidden_layers + 1
    assert len(rows) == steps * (11 + 4 * n_tensors)  # everything is in the file
    assert len(mon.log.rows) == 2 * steps  # accuracy and sc_fraction, each step
    full = MetricLog()
    for r in rows:
        full.add(int(r["step"]), r["run"], r["split"], r["metric"], float(r["value"]), r["layer"])
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["run"] == json.loads(json.dumps(summarize(full, "run")))
    assert mon.log.latest("weight_norm", layer="global") == full.latest(
        "weight_norm", layer="global"
    )
