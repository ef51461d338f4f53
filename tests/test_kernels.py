"""The fused kernels (numstab.kernels) give the NumPy path's bits, and the NumPy path stays
selectable (NUMSTAB_KERNELS=numpy) and used where numba is absent.

Every comparison is against the NumPy path, an independent implementation (NumPy ufuncs in
the documented order): bit for bit, on inputs drawn from all bit patterns (NaN payloads,
±inf, subnormals, ±0 included) and on the step's own tensors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from fraction_rounding import round_fraction
from helpers import gamma, lanes8_loop
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from numstab import elementary, kernels, parallel
from numstab.functional import relu_forward
from numstab.losses import row_verdicts, softmax
from numstab.mlp import _relu_backward
from numstab.monitor.core import (
    TopEntries,
    batch_metrics,
    collapse_window,
    window_below,
    window_cut,
)
from numstab.optim import Adam, AdamW
from numstab.precision import get_format
from numstab.run import Run, TrainConfig
from numstab.run.footprint import OVERHEAD_BYTES, estimate_run_memory
from numstab.run.runtime import runtime_info

HAVE_NUMBA = kernels._numba() is not None
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba not installed")
UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}


@pytest.fixture(params=["numpy", "numba"])
def path(request, monkeypatch):
    """Each test that takes it runs on the NumPy path and on the fused path."""
    if request.param == "numba" and not HAVE_NUMBA:
        pytest.skip("numba not installed")
    monkeypatch.setenv(kernels.ENV, request.param)
    return request.param


def on(path_name, fn, *args, **kw):
    """``fn(*args)`` with ``NUMSTAB_KERNELS=path_name``."""
    old = os.environ.get(kernels.ENV)
    os.environ[kernels.ENV] = path_name
    try:
        return fn(*args, **kw)
    finally:
        if old is None:
            del os.environ[kernels.ENV]
        else:
            os.environ[kernels.ENV] = old


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(UINT[a.dtype])


def assert_same_bits(a, b, *, nan_payload=True):
    """Every element the same bits; ``nan_payload=False``: where ``b`` is NaN, ``a`` is a NaN
    (payload free: two different NaNs met in one operation, see numstab.kernels)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    differ = bits(a).reshape(-1) != bits(b).reshape(-1)
    if not nan_payload:
        differ &= ~(np.isnan(a.reshape(-1)) & np.isnan(b.reshape(-1)))
    diff = np.flatnonzero(differ)
    assert diff.size == 0, f"{diff.size} elements differ, first at {diff[0]}: {a.flat[diff[0]]!r}"


#: Quiet NaNs of both signs with payloads, infinities, zeros, subnormals, extremes.
SPECIALS = {
    np.dtype(np.float32): np.array(
        [
            0x7FC00000,
            0xFFC00000,
            0x7FC12345,
            0xFFFFFFFF,
            0x7F800000,
            0xFF800000,
            0,
            0x80000000,
            1,
            0x80000001,
            0x007FFFFF,
            0x807FFFFF,
            0x00800000,
            0x7F7FFFFF,
            0xFF7FFFFF,
            0x3F800000,
        ],
        dtype=np.uint32,
    ).view(np.float32),
    np.dtype(np.float64): np.array(
        [
            0x7FF8000000000000,
            0xFFF8000000000000,
            0x7FF8000000012345,
            0x7FF0000000000000,
            0xFFF0000000000000,
            0,
            0x8000000000000000,
            1,
            0x8000000000000001,
            0x000FFFFFFFFFFFFF,
            0x0010000000000000,
            0x7FEFFFFFFFFFFFFF,
            0x3FF0000000000000,
        ],
        dtype=np.uint64,
    ).view(np.float64),
}


def quiet(a):
    """Signalling NaNs made quiet (set the quiet bit): arithmetic never produces them, and
    compilers may pass one through ``x * 1`` where the hardware would quiet it."""
    u = bits(a).copy()
    d = a.dtype
    expo, qbit = (0x7F800000, 0x00400000) if d == np.float32 else (0x7FF << 52, 1 << 51)
    expo, qbit = np.array(expo, u.dtype), np.array(qbit, u.dtype)
    nan = ((u & expo) == expo) & ((u & (qbit - 1)) != 0)
    u[nan] |= qbit
    return u.view(d)


def any_floats(dtype, n=400):
    """Arrays of any bit pattern (signalling NaNs quietened), with the specials mixed in."""
    uint = UINT[np.dtype(dtype)]
    raw = hnp.arrays(uint, st.integers(1, n), elements=st.integers(0, np.iinfo(uint).max))

    def build(u):
        a = quiet(u.view(dtype))
        s = SPECIALS[np.dtype(dtype)]
        k = min(a.size, s.size)
        a[:k] = s[:k]
        return np.random.default_rng(int(u[0] % 1000)).permutation(a)

    return raw.map(build)


# --- selection -----------------------------------------------------------------------------


def test_env_selects_the_path(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "numpy")
    assert kernels.backend() == "numpy" and not kernels.applies(np.ones(3))
    assert kernels.warm() == 0.0
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(ValueError, match="NUMSTAB_KERNELS='fast' is not one of auto"):
        kernels.backend()
    monkeypatch.setenv(kernels.ENV, "auto")
    assert kernels.backend() == ("numba" if HAVE_NUMBA else "numpy")
    monkeypatch.delenv(kernels.ENV)  # unset is auto: the kernels wherever numba is installed
    assert kernels.backend() == ("numba" if HAVE_NUMBA else "numpy")
    assert kernels.overhead_bytes() == (kernels.OVERHEAD_BYTES if HAVE_NUMBA else 0)


def test_without_numba_everything_takes_the_numpy_path(monkeypatch):
    monkeypatch.setitem(kernels._NUMBA, "module", None)
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.backend() == "numpy"
    assert kernels.info()["kernels"] == "numpy"
    monkeypatch.setenv(kernels.ENV, "numba")
    with pytest.raises(ValueError, match="numba is not installed"):
        kernels.backend()


def test_memory_estimates_count_the_kernels_where_they_run(monkeypatch):
    config = TrainConfig(p=23, hidden=(8, 8))
    monkeypatch.setenv(kernels.ENV, "numpy")
    assert kernels.overhead_bytes() == 0
    assert estimate_run_memory(config).overhead == OVERHEAD_BYTES
    monkeypatch.setenv(kernels.ENV, "auto")
    extra = kernels.OVERHEAD_BYTES if HAVE_NUMBA else 0
    assert estimate_run_memory(config).overhead == OVERHEAD_BYTES + extra
    monkeypatch.setitem(kernels._NUMBA, "module", None)  # as if numba were absent
    assert kernels.overhead_bytes() == 0


@pytest.mark.parametrize("value", ["fast", ""])
def test_a_command_refuses_a_bad_path_with_one_line(tmp_path, value):
    """A value NUMSTAB_KERNELS does not name: exit 2, one line naming it, no output folder."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "numstab.train", "--modulus", "11", "--hidden", "8", "8"]
    r = subprocess.run(
        [*cmd, "--steps", "2", "--out", str(out)],
        env={**os.environ, kernels.ENV: value},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"NUMSTAB_KERNELS={value!r}" in lines[0], r.stderr
    assert not out.exists()


def test_the_numpy_path_does_not_import_numba():
    # numba and its LLVM cost a process about 100 MB: not paid where the kernels do not run
    code = (
        "import sys; from numstab.run import Run, TrainConfig; "
        "from numstab.run.runtime import runtime_info; "
        "r = Run(TrainConfig(p=11, hidden=(8, 8)), name='x'); r.advance(); "
        "info = runtime_info(); assert info['kernels'] == 'numpy', info; "
        "print('numba' in sys.modules)"
    )
    env = {**os.environ, kernels.ENV: "numpy"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


@needs_numba
def test_threads_that_first_use_the_kernels_at_once_all_get_them(tmp_path):
    # numstab.parallel's threads may be a process's first users of numba: its CPU target must
    # be loaded once, before any compiles (loaded concurrently, one thread's compilation failed
    # with "Unknown attribute 'view'" on every try). A fresh cache folder, so they compile.
    code = (
        "import threading, numpy as np; from numstab import kernels\n"
        "w = np.linspace(-3.0, 3.0, 64); want = w.astype(np.float32); got = []\n"
        "def use():\n"
        "    of = np.empty(64, np.float32); amb = np.empty(64, bool)\n"
        "    kernels.narrow_round(w, of, amb, *np.uint64([1, 2, 3]), 2.0**-30, 2.0**-126)\n"
        "    got.append(bool((of == want).all()))\n"
        "ts = [threading.Thread(target=use) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]; print(got)"
    )
    env = {**os.environ, kernels.ENV: "numba", "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str([True] * 4), out.stderr[-2000:]


def test_runtime_info_records_the_path(path):
    assert runtime_info()["kernels"] == path


@needs_numba
def test_applies_only_to_contiguous_float32_float64_numpy_arrays(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "numba")
    a = np.ones((4, 4), dtype=np.float32)
    assert kernels.applies(a, a)
    assert not kernels.applies(a, a.astype(np.float64))  # mixed dtypes
    assert not kernels.applies(a[:, ::2])  # not contiguous
    assert not kernels.applies(a.astype(np.float16))
    assert not kernels.applies(a.astype(np.longdouble))


# --- ReLU ----------------------------------------------------------------------------------


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_relu_backward_matches_numpy_bit_for_bit(dtype, data):
    x = data.draw(any_floats(dtype))
    dy = data.draw(any_floats(dtype, n=x.size).map(lambda a: np.resize(a, x.size)))
    ref = relu_forward(x)[0]
    with np.errstate(invalid="ignore"):  # inf · 0
        want = np.multiply(dy, (ref > 0).astype(dtype))
        assert_same_bits(on("numba", _relu_backward, dy, ref), want)
        assert_same_bits(on("numpy", _relu_backward, dy, ref), want)


def test_relu_signed_zeros_and_nan(path):
    x = np.array([-0.0, 0.0, np.nan, -np.nan, -1.0, 2.0, -np.inf, np.inf] * 3, np.float32)
    y, _ = relu_forward(x)
    assert not np.signbit(y[[0, 1, 4, 6]]).any()  # -0 and negatives give +0
    assert np.isnan(y[[2, 3]]).all() and np.signbit(y[3])  # NaN kept with its sign
    dy = np.array([-3.0, 3.0, 1.0, 1.0, 5.0, -2.0, 1.0, np.inf] * 3, np.float32)
    with np.errstate(invalid="ignore"):
        g = _relu_backward(dy, y)
    np.testing.assert_array_equal(g[:8], [-0.0, 0.0, 0.0, 0.0, 0.0, -2.0, 0.0, np.inf])
    assert np.signbit(g[0])  # -3 · 0 = -0: a product, not a select


# --- Adam / AdamW --------------------------------------------------------------------------

ADAMS = [
    AdamW(lr=0.01, betas=(0.9, 0.99), eps=1e-25, weight_decay=0.0, storage_format="float32"),
    AdamW(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, storage_format="float32"),
    AdamW(lr=0.003, betas=(0.3, 0.5), eps=1e-8, weight_decay=1.0, storage_format="float64"),
    Adam(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, storage_format="float64"),
    Adam(lr=0.1, betas=(0.0, 0.9), eps=1e-30, storage_format="float32"),
]


def _adam_steps(opt, params, grads_seq, path_name):
    params = {k: v.copy() for k, v in params.items()}
    state = opt.init_state(params)
    updates = []
    for grads in grads_seq:
        with np.errstate(all="ignore"):
            on(path_name, opt.step, params, grads, state)
        updates.append({k: v.copy() for k, v in state.last_update.items()})
    return params, state, updates


@needs_numba
@pytest.mark.parametrize("opt", ADAMS, ids=lambda o: f"{o.name}-{o.storage_format.name}")
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_adam_matches_numpy_bit_for_bit(opt, data):
    dt = opt.storage_format.carrier
    w = data.draw(any_floats(dt, n=300))
    w[~np.isfinite(w)] = 0.5
    params = {"W": w, "b": np.linspace(-1, 1, 7).astype(dt)}
    steps = []
    for _ in range(3):
        g = data.draw(any_floats(dt, n=w.size).map(lambda a: np.resize(a, w.size)))
        steps.append({"W": g, "b": np.full(7, data.draw(st.floats(-10, 10)), dtype=dt)})
    # one step from finite parameters: every NaN has a single source (the gradient, or an
    # invalid operation), so every bit is fixed; later steps let two NaNs meet
    for n_steps, payload in ((1, True), (3, False)):
        p_ref, s_ref, u_ref = _adam_steps(opt, params, steps[:n_steps], "numpy")
        p_got, s_got, u_got = _adam_steps(opt, params, steps[:n_steps], "numba")
        for k in params:
            assert_same_bits(p_got[k], p_ref[k], nan_payload=payload)
            for t in ("exp_avg", "exp_avg_sq"):
                assert_same_bits(s_got.tensors[k][t], s_ref.tensors[k][t], nan_payload=payload)
            for a, b in zip(u_got, u_ref, strict=True):
                assert_same_bits(a[k], b[k], nan_payload=payload)


def test_adam_fused_path_leaves_gradients_and_records_updates(path):
    opt = ADAMS[1]
    p = {"W": np.linspace(-2, 2, 50, dtype=np.float32)}
    g = {"W": np.linspace(1, -1, 50, dtype=np.float32)}
    g0 = g["W"].copy()
    state = opt.init_state(p)
    opt.step(p, g, state)
    np.testing.assert_array_equal(g["W"], g0)
    assert state.step == 1
    # step 1: m = 0.1 g, v = 0.01 g², bias-corrected: the update is -lr·sign(g) (|g| >> eps)
    decayed = np.linspace(-2, 2, 50, dtype=np.float32) * np.float32(1 - 0.01 * 0.1)
    np.testing.assert_allclose(state.last_update["W"], -0.01 * np.sign(g0), rtol=1e-5)
    np.testing.assert_allclose(p["W"], decayed - 0.01 * np.sign(g0), rtol=1e-5, atol=1e-7)


# --- exp / log -----------------------------------------------------------------------------


@needs_numba
@settings(max_examples=40, deadline=None)
@given(x=any_floats(np.float64, n=3000))
def test_exp64_matches_numpy_bit_for_bit(x):
    # any bit pattern is mostly out of exp's range: add values inside it, near its ends and
    # around 0 (where the fast pass's rounding constant meets -0)
    rng = np.random.default_rng(x.size)
    inside = np.concatenate(
        [
            rng.uniform(-708.39, 709.78, x.size),
            rng.uniform(-1e-3, 1e-3, 200),
            np.array([-708.39, 709.78, -708.3964, 709.79, -745.2, 2.0**-30, -(2.0**-30)]),
            np.ldexp(rng.uniform(-0.5, 0.5, 100), -12),  # kf = ±0
        ]
    )
    xs = np.concatenate([x, inside])
    ref = on("numpy", elementary._exp64, xs, np)
    got = on("numba", elementary._exp64, xs, np)
    assert_same_bits(got, ref)


@needs_numba
@pytest.mark.parametrize("name", ["exp", "log", "log1p", "expm1"])
def test_float32_functions_match_numpy_on_many_patterns(name):
    # 2**20 random float32 patterns plus the specials: every rounding-test outcome occurs
    # (about one element in 2**19 goes to the wider evaluation)
    rng = np.random.default_rng(7)
    u = rng.integers(0, 2**32, 2**20, dtype=np.uint64).astype(np.uint32)
    x = quiet(np.concatenate([SPECIALS[np.dtype(np.float32)], u.view(np.float32)]))
    if name == "exp":  # mostly inside exp's range, the softmax's (d <= 0) and beyond
        x = np.concatenate([x, rng.uniform(-110, 90, 2**20).astype(np.float32)])
    f32 = get_format("float32")
    ref = on("numpy", elementary.apply, name, x, f32, "correct", np)
    got = on("numba", elementary.apply, name, x, f32, "correct", np)
    assert_same_bits(got, ref)


@needs_numba
def test_float32_rounding_test_brackets_subnormal_results():
    """Below 2**-126 the float32 quantum is 2**-149 absolute, so the low-bits test does not
    apply: the fused test brackets ``w`` instead (``w (1 ± 2**-44)``). Closed forms: every
    float64 value within 2**-50 of a subnormal midpoint ``(k + 1/2) 2**-149`` must be left
    undecided, every value 2**-40 away from one, or at a quarter point, decided; and the
    rounding is IEEE's (NumPy's float64 -> float32 cast) on all of them."""
    k = np.arange(0, 2**23, 997, dtype=np.float64)
    mid = (k + 0.5) * 2.0**-149  # exact in float64
    near = np.concatenate([mid, mid * (1 + 2.0**-50), mid * (1 - 2.0**-50)])
    far = np.concatenate([mid * (1 + 2.0**-40), mid * (1 - 2.0**-40), (k + 0.25) * 2.0**-149])
    w = np.concatenate([near, far, -near, -far])
    of, amb = np.empty(w.size, np.float32), np.empty(w.size, bool)
    n_amb = kernels.narrow_round(w, of, amb, *elementary._NARROW_TEST)  # the kernel itself
    want = np.concatenate([np.ones(near.size, bool), np.zeros(far.size, bool)] * 2)
    assert np.array_equal(amb, want) and n_amb == 2 * near.size
    assert_same_bits(of, w.astype(np.float32))


# --- the float32 softmax's rows ----------------------------------------------------------

#: float32 ``d`` whose float64 ``exp`` lies within the first rounding test's window of a
#: float32 midpoint (found by a scan of ``np.exp`` over 40 million uniform draws in [-104, 0]):
#: the kernel settles them with its second test. The first two have subnormal results (the
#: bracket), the others normal ones (the low-bits test).
UNDECIDED_EXP32 = (
    -89.45233154296875,
    -89.24579620361328,
    -87.22110748291016,
    -75.0694808959961,
    -51.63494110107422,
    -44.57970428466797,
    -24.896316528320312,
    -12.392520904541016,
    -7.190371036529541,
    -2.944237232208252,
    -0.5839310884475708,
    -0.01921960338950157,
)


def _logits_near_collapse(rng, n, c):
    """Logits whose rows straddle float32 Softmax Collapse (a target gap of 0 to 30 over
    N(0, 6) noise: some rows collapse, most not), with terms in every range of ``exp``: normal,
    subnormal (d < -87.3), rounding to 0 (d < -104) and far below."""
    z = (rng.standard_normal((n, c)) * 6).astype(np.float32)
    y = rng.integers(0, c, n)
    z[np.arange(n), y] += rng.uniform(0, 30, n).astype(np.float32)
    z[: n // 8] *= np.float32(8)  # wide rows: subnormal and vanishing terms
    return z, y


@pytest.mark.parametrize("c", [1, 5, 8, 9, 113, 128, 129, 136, 300, 1000, 8193])
def test_softmax_row_verdicts_match_numpy_on_both_paths(path, c):
    """``row_verdicts`` in float32 (``pairwise``): the fused kernel (one pass per row:
    ``exp``, the float32 sum in NumPy's pairwise tree at every class count, the tree's
    shapes for up to 8, 128 and over 128 terms included, and the float64 gradient sum)
    against the NumPy path, an independent implementation; special rows included (NaN, ±inf,
    a tie at the maximum, all equal, a -inf entry, the undecided ``exp`` inputs)."""
    rng = np.random.default_rng(c)
    z, y = _logits_near_collapse(rng, 1500, c)
    z[0, 0] = np.nan
    z[1] = -np.inf
    z[2, 0] = np.inf
    z[3] = 0
    z[4, y[4]] = np.float32(40)
    z[4, (y[4] + 1) % c] = np.float32(40)  # tie at the maximum
    z[5, 0] = -np.inf
    for row, d in enumerate(UNDECIDED_EXP32, start=6):
        z[row] = np.float32(-300)
        z[row, y[row]] = 0
        z[row, (y[row] + 1) % c] = d if c > 1 else 0
    y[-1] = -1  # a negative label counts from the end, on both paths
    f32 = get_format("float32")
    assert softmax.fuses(z, f32, "pairwise") == (path == "numba")
    ref = on("numpy", row_verdicts, z, y, "float32")
    got = row_verdicts(z, y, "float32")
    with parallel.using(2):  # the kernel's rows in blocks on two threads
        got2 = row_verdicts(z, y, "float32")
    for a, b, b2 in zip(ref, got, got2, strict=True):
        assert a.dtype == b.dtype == b2.dtype
        assert np.array_equal(a, b, equal_nan=True) and np.array_equal(a, b2, equal_nan=True)
    assert 0 < ref[0].sum() < z.shape[0]  # some rows collapse, some do not


def _exp_rn32(d: float) -> float:
    """``e**d`` correctly rounded to float32, from mpmath at 200 bits (a Fraction oracle)."""
    import mpmath

    with mpmath.workprec(200):
        m, e = mpmath.exp(mpmath.mpf(d)).man_exp
    v = Fraction(int(m)) * Fraction(2) ** int(e)
    return float(round_fraction(v, get_format("float32"), "nearest"))


def _softmax_kernel(z, settle=None, d_open=np.inf):
    """``kernels.softmax_rows32`` of ``z`` (labels 0), with the second test's window
    ``settle`` instead of ``2**-62`` if given, and rows proved open by a second entry at
    ``d >= d_open`` (default: none, every row evaluated): ``(sum, d_y, row sum, flag, number
    flagged)``."""
    th, tl, tf, c, *rest = elementary.softmax32_consts()
    c = c.copy()
    c[5] = c[5] if settle is None else settle
    c[6] = d_open
    n = z.shape[0]
    out = (np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n), np.empty(n, bool))
    y, hit, win = np.zeros(n, np.int64), np.empty(n, bool), np.empty(n, bool)
    flagged = kernels.softmax_rows32(z, y, np.inf, hit, *out, win, (th, tl, tf, c, *rest))
    assert win.all()  # no entry above +inf: every row evaluated
    return (*out, flagged)


@needs_numba
def test_softmax_kernel_settles_undecided_terms_and_leaves_nan_rows_to_the_caller():
    """Rows ``(0, d, -300, -300)``: each ``d`` of :data:`UNDECIDED_EXP32` is in the first
    test's window (a window of 1 for the second test flags every such row), and the second
    test settles it to ``e**d`` correctly rounded (mpmath): the row's float32 sum is
    ``RN(1 + e)`` and its float64 gradient sum ``e`` itself (``RN(1 - 1) = 0`` at the label,
    the other terms +0). A row with NaN is flagged; one of ordinary terms, or of terms that
    round to 0, is not."""
    n_u = len(UNDECIDED_EXP32)
    z = np.full((n_u + 3, 4), -300, dtype=np.float32)
    z[:, 0] = 0
    z[:n_u, 1] = UNDECIDED_EXP32
    z[n_u, 1] = np.nan
    z[n_u + 1, 1] = np.float32(-7.25)
    total, _, row_sum, flag, flagged = _softmax_kernel(z)
    assert flagged == 1 and flag.tolist() == [False] * n_u + [True, False, False]
    for i, d in enumerate(UNDECIDED_EXP32):
        e = np.float32(_exp_rn32(d))
        assert total[i] == np.float32(1) + e, d
        # the row sum: RN(e_0 - 1) = 0 at the label, then e and the zeros (float64, exact)
        assert row_sum[i] == np.float64(e), d
    assert total[n_u + 1] == np.float32(1) + np.float32(_exp_rn32(-7.25))
    assert total[n_u + 2] == 1 and row_sum[n_u + 2] == 0.0  # every other term rounds to +0
    *_, flag_wide, flagged_wide = _softmax_kernel(z, settle=1.0)
    assert flagged_wide == n_u + 1 and flag_wide.tolist() == [True] * (n_u + 1) + [False] * 2


#: float32 ``d`` whose ``e**d`` lies within ``2**-42.2`` (relative) of a float32 midpoint
#: but outside the first rounding test's window (found by a scan of 24 million draws in
#: ``[-104, -17)``): the fast ``exp`` pass decides them alone, and an error of that pass
#: above about ``2**-43`` would round some of them the wrong way.
NEAR_WINDOW_EXP32 = (
    -80.00550079345703,
    -80.31745147705078,
    -50.76676940917969,
    -24.99212646484375,
    -20.450220108032227,
    -40.53279113769531,
    -83.41502380371094,
    -42.32115936279297,
    -18.608013153076172,
    -55.69775390625,
)


@needs_numba
def test_softmax_kernel_decides_terms_near_a_midpoint_with_its_fast_pass():
    """Rows ``(0, d, -300, -300)``, each ``d`` of :data:`NEAR_WINDOW_EXP32`: no term is in
    the first test's window (none flagged with a second window of 1, which flags every row
    that needs it), the rows collapse (``e <= 2**-24``) and their float64 gradient sum is the
    term itself, ``e**d`` correctly rounded to float32 (mpmath)."""
    z = np.full((len(NEAR_WINDOW_EXP32), 4), -300, dtype=np.float32)
    z[:, 0] = 0
    z[:, 1] = NEAR_WINDOW_EXP32
    total, _, row_sum, _, flagged = _softmax_kernel(z, settle=1.0)
    assert flagged == 0 and (total == 1).all()
    for i, d in enumerate(NEAR_WINDOW_EXP32):
        assert row_sum[i] == _exp_rn32(d), d


@needs_numba
def test_softmax_kernel_terms_are_correctly_rounded():
    """Collapsed rows of 113 terms (``d`` drawn in ``[-104, -25)``, and the near-midpoint
    values of :data:`NEAR_WINDOW_EXP32`, one a row): the kernel's float64
    gradient sum is the float64 pairwise sum of the terms rounded by mpmath (the label's
    ``RN(1 - 1) = 0`` first), so a term rounded one float32 step away (a change of ``2**-24``
    of it, far above the sum's own rounding) would show."""
    rng = np.random.default_rng(17)
    z = (-25 - 79 * rng.random((200, 113))).astype(np.float32)  # row sums below 2**-29
    z[: len(NEAR_WINDOW_EXP32), 5] = NEAR_WINDOW_EXP32  # one a row: each at most 2**-26
    z[:, 0] = 0
    total, _, row_sum, _, flagged = _softmax_kernel(z)
    assert flagged == 0 and (total == 1).all()
    oracle = np.array([[_exp_rn32(float(d)) for d in row] for row in z])
    oracle[:, 0] = 0.0  # RN(e_y - 1) at the label
    assert np.array_equal(row_sum, oracle.sum(axis=1))  # NumPy's pairwise tree, float64


def test_softmax_kernel_proves_rows_open_from_a_second_term_above_2_to_minus_24():
    """``elementary._OPEN32`` is the smallest float32 ``d`` whose term rounds above
    ``2**-24`` (mpmath); the kernel does not evaluate a row with a second entry there (its
    sum is NaN) and evaluates the one whose second entry is one float32 below (its sum is
    then exactly 1: ``RN(1 + 2**-24) = 1``, ties to even)."""
    t = np.float32(elementary._OPEN32)
    below = np.nextafter(t, np.float32(-np.inf))
    assert np.float32(_exp_rn32(float(t))) > 2.0**-24 >= np.float32(_exp_rn32(float(below)))
    z = np.full((3, 5), -300, dtype=np.float32)
    z[:, 0] = 0
    z[0, 3], z[1, 3], z[2, 3] = t, below, -1
    total, _, _, flag, flagged = _softmax_kernel(z, d_open=elementary._OPEN32)
    assert flagged == 0 and not flag.any()
    assert np.isnan(total[0]) and total[1] == 1 and np.isnan(total[2])
    assert _softmax_kernel(z)[0][0] == np.float32(1) + np.float32(_exp_rn32(float(t)))


@needs_numba
@pytest.mark.parametrize("c", [1, 113, 300])
def test_softmax_kernel_on_torchs_openmp_team_gives_the_same_bits(c, monkeypatch):
    """The fused kernel's row blocks run as an OpenMP region on torch's team
    (``numstab.teamkernels``: each thread takes blocks of 256 rows from a shared counter until
    none is left): the same verdicts, hits and rows evaluated, bit for bit, as the kernel on
    the calling thread alone, at 2 and 3 threads, with the collapse window's screen and
    without, on 1 500 rows (a ragged last block) with special rows. The single-thread kernel
    is made to fail inside the team's block: every block ran on the team."""
    torch = pytest.importorskip("torch")  # optional: the team is torch's
    from numstab import ompteam

    team = ompteam.of_torch()
    if team is None:
        pytest.skip(f"torch's parallel backend here is not OpenMP ({torch.__version__})")
    rng = np.random.default_rng(c)
    z, y = _logits_near_collapse(rng, 1500, c)
    z[0, 0], z[1], z[2, 0], z[3] = np.nan, -np.inf, np.inf, 0
    f32 = get_format("float32")
    for below in (window_below(f32), np.inf):
        ref = softmax.screened_verdicts(z, y, f32, below)
        for k in (2, 3):
            with parallel.using(k, team=team), monkeypatch.context() as m:
                m.setattr(kernels, "softmax_rows32", None)  # not called: the team runs it all
                got = softmax.screened_verdicts(z, y, f32, below)
            for field in dataclasses.fields(ref):
                a, b = getattr(ref, field.name), getattr(got, field.name)
                assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), field.name
        assert 0 < ref.collapsed.sum() < z.shape[0]


@needs_numba
def test_batch_metrics_are_the_same_on_both_paths():
    """The monitor's batch metrics (the fused kernel behind them in float32) equal the NumPy
    path's, with the collapse window and without, with carried top entries and without."""
    rng = np.random.default_rng(3)
    z, y = _logits_near_collapse(rng, 2000, 113)
    f32 = get_format("float32")
    for screen in (True, False):
        for top in (None, TopEntries(2)):
            ref = on("numpy", batch_metrics, z, y, f32, screen=screen, top=top)
            got = on("numba", batch_metrics, z, y, f32, screen=screen, top=top)
            assert got == ref
            # the data straddle collapse, and the window (its screen is the kernel's own)
            assert 0.05 < ref["sc_fraction"] < 0.95
            assert 0.05 < ref["sc_window_fraction"] < 0.95 if screen else True


@needs_numba
@pytest.mark.parametrize("c", [1, 2, 113, 300])
def test_screened_verdicts_evaluate_the_rows_in_the_window(c):
    """The fused kernel's own screen: the rows with at most one entry above their maximum plus
    ``below`` (in float64, rounded up to float32: by NumPy here) are the NumPy count's, with
    the collapse window's ``below`` (then :func:`numstab.monitor.core.collapse_window`'s rows
    and :func:`~numstab.monitor.core.window_cut`'s cuts), with others drawn at random and with
    one that puts a row's cut exactly on one of its entries (a tie: not above), and with one
    whose cut is rounded up onto an entry (nearest would round down: above); their verdicts
    are ``row_verdicts``' on the NumPy path, each row evaluated alone; the other rows get
    ``False, False, False, NaN``; the accuracy's hits are ``numpy.argmax``'s."""
    rng = np.random.default_rng(c)
    z, y = _logits_near_collapse(rng, 700, c)
    z[0, 0], z[1] = np.nan, -np.inf
    f32 = get_format("float32")
    m = z.max(axis=1)
    tie = float(z[3, -1]) - float(m[3])  # exact in float64: row 3's cut is its last entry
    # row 4's cut: m + under lies 3/4 of a float32 step below its second entry z2, so
    # rounding to nearest would put the cut a step below z2 (z2 above it), rounding up on it
    z2 = np.sort(z[4])[-2] if c > 1 else z[4, 0]
    gap = float(z2) - float(np.nextafter(z2, np.float32(-np.inf)))  # the step below z2
    under = float(z2) - 0.75 * gap - float(m[4])
    hits = (z.argmax(axis=1) == y) & ~np.isnan(m)
    for below in (window_below(f32), tie, under, *rng.uniform(-40, 0, 3), np.inf):
        with np.errstate(invalid="ignore"):
            lim = m.astype(np.float64) + below
            cut = lim.astype(np.float32)
            cut = np.where(cut < lim, np.nextafter(cut, np.float32(np.inf)), cut)
            want_rows = (z > cut[:, None]).sum(axis=1) <= 1
        if below == window_below(f32):
            assert np.array_equal(want_rows, collapse_window(z, f32, "softmax", 0.0, m))
            assert np.array_equal(cut, window_cut(m, f32, "softmax", 0.0, z.dtype), equal_nan=True)
        if below == tie:
            assert cut[3] == z[3, -1]
        if below == under:
            assert cut[4] == z2 and np.float32(lim[4]) < lim[4] < z2
        got = softmax.screened_verdicts(z, y, f32, below)
        assert np.array_equal(got.hit, hits)
        rows = got.evaluated
        assert np.array_equal(rows, want_rows)
        if c > 1 and np.isfinite(below):
            assert 0 < rows.sum() < rows.size
        else:  # one entry, or no cut: every row
            assert rows.all()
        ref = on("numpy", row_verdicts, z[rows], y[rows], "float32")
        verdicts = (got.collapsed, got.zero_loss, got.zero_target_grad, got.row_sum)
        for a, b in zip(ref, verdicts, strict=True):
            assert np.array_equal(a, b[rows], equal_nan=True)
        assert not (got.collapsed | got.zero_loss | got.zero_target_grad)[~rows].any()
        assert np.isnan(got.row_sum[~rows]).all()


@needs_numba
@settings(max_examples=60, deadline=None)
@given(data=st.data())
@example(data=None)
def test_the_kernels_accuracy_hits_are_numpy_argmax(data):
    """``hit`` of the fused kernel (its maximum from integer keys of the float bits, then the
    label's column against the entries before it) is ``numpy.argmax(z, axis=1) == y`` with
    no NaN in the row, on any float32 bits: ties at the maximum (the first wins), ``-0`` and
    ``+0`` (equal), NaN, ``±inf``, rows of ``-inf``, subnormals."""
    f32 = get_format("float32")
    if data is None:  # pinned rows: ties, signed zeros, NaN, infinities
        z = np.array(
            [[1, 3, 3, 0], [3, 3, 1, 0], [-0.0, 0.0, -1, -2], [0.0, -0.0, -1, -2],
             [np.nan, 5, 5, 1], [5, np.nan, 5, 1], [-np.inf] * 4, [np.inf, 1, np.inf, 0],
             [1e-45, -1e-45, 0, -0.0], [-3, -2, -2, -np.inf]], dtype=np.float32,
        )  # fmt: skip
        y = np.array([1, 1, 0, 1, 1, 0, 0, 0, 0, 2])
    else:
        c = data.draw(st.integers(1, 140))
        z = np.resize(data.draw(any_floats(np.float32, n=c * 8)), (8, c))
        z[:, data.draw(st.integers(0, c - 1))] = z.max(axis=1)  # a tie where there is one
        y = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=8, max_size=8)))
    with np.errstate(invalid="ignore"):
        want = (z.argmax(axis=1) == y) & ~np.isnan(z).any(axis=1)
    assert np.array_equal(softmax.screened_verdicts(z, y, f32).hit, want)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
@example(data=None)
def test_lanes8_dot_products_are_their_definition_on_both_paths(data):
    """``numstab.metrics``' order ``"lanes8"`` (the monitor's norms and cosines) gives the bits
    of its definition (a loop over Python floats) on the compiled pass and on the NumPy path
    (a reduction along the first axis of the products, the tail added lane by lane): float16,
    float32 and float64 tensors of 0 to 300 entries (a partial last row of lanes included),
    ``±0`` (a lane of ``-0`` products stays ``+0``, as it starts at ``+0``), subnormals, huge
    values whose squares overflow."""
    from numstab.metrics import _dots_lanes8

    if data is None:  # pinned: every product -0 (the lanes start at +0), one partial row
        a = np.array([-0.0, 1.0, -0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.0], np.float32)
        b = np.array([1.0, -0.0, 2.0, -0.0, 0.0, 0.0, 0.0, 0.0, 3.0], np.float32)
    else:
        dtype = data.draw(st.sampled_from([np.float16, np.float32, np.float64]))
        n = data.draw(st.integers(0, 300))
        elems = st.floats(width=np.finfo(dtype).bits, allow_nan=False, allow_infinity=False)
        a, b = (data.draw(hnp.arrays(dtype, n, elements=elems)) for _ in range(2))
    want = lanes8_loop(a, b)
    paths = ["numpy", "numba"] if HAVE_NUMBA else ["numpy"]
    with np.errstate(over="ignore", invalid="ignore"):
        for name in paths:
            got = on(name, _dots_lanes8, a, b)
            for g, w in zip(got, want, strict=True):
                assert np.float64(g).tobytes() == np.float64(w).tobytes(), (name, got, want)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_absorbed_updates_are_counted_alike_on_both_paths(data):
    """The monitor's absorbed-update counts (``update_metrics``: the compiled one-pass count
    and the NumPy expression) equal a count over Python floats, ``==`` as IEEE compares
    (``-0 == +0``, NaN unequal to itself), for float32 and float64 tensors of any size, the
    due entries given as bools or as a moment's non-zero entries (NaN among them)."""
    from numstab.monitor.core import update_metrics

    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    n = data.draw(st.integers(0, 200))
    before = data.draw(hnp.arrays(dtype, n, elements=st.sampled_from([0.0, -0.0, 1.5, np.nan])))
    moved = data.draw(hnp.arrays(np.bool_, n))
    after = np.where(moved, before + dtype(1), before)  # NaN + 1 is NaN: never "unchanged"
    flip = data.draw(hnp.arrays(np.bool_, n)) & (after == 0)
    after = np.where(flip, -after, after)  # -0 after +0 (or +0 after -0): unchanged
    want = data.draw(hnp.arrays(np.bool_, n))
    if data.draw(st.booleans()):  # an optimizer's moment: its non-zero entries are due
        want = np.where(want, data.draw(st.sampled_from([1e-30, -2.0, np.nan])), 0.0).astype(dtype)
    marks = [w != 0 for w in want.tolist()]  # NaN != 0
    due = sum(marks)
    same = sum(m and float(a) == float(b) for m, a, b in zip(marks, after, before, strict=True))
    expected = same / max(due, 1)
    for name in ["numpy", "numba"] if HAVE_NUMBA else ["numpy"]:
        got = on(name, update_metrics, {"t": before}, {"t": after}, {"t": want})
        assert got["absorbed_update_fraction"] == {"t": expected, "global": expected}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2000), seed=st.integers(0, 2**32 - 1))
def test_lanes8_dot_products_are_within_their_error_bound(n, seed):
    """``"lanes8"`` against the exact sum (``fractions``) of float32 products: each product is
    exact in float64 (48 significant bits), a lane adds at most ``ceil(n / 8)`` of them and
    the tree three more, so ``|computed - exact| <= γ_k Σ|a_i b_i|`` with ``k = ceil(n / 8)
    + 3`` and ``γ_k = k u / (1 - k u)``, ``u = 2**-53`` (Higham, eq. 4.4)."""
    from numstab.metrics import _dots_lanes8

    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5)).astype(np.float32)
    b = (rng.standard_normal(n) * 10.0 ** rng.integers(-5, 5)).astype(np.float32)
    bound_gamma = gamma(-(-n // 8) + 3, Fraction(1, 2**53))
    fa, fb = [Fraction(float(x)) for x in a], [Fraction(float(x)) for x in b]
    for got, (x, y) in zip(_dots_lanes8(a, b), ((fa, fa), (fb, fb), (fa, fb)), strict=True):
        exact = sum((p * q for p, q in zip(x, y, strict=True)), Fraction(0))
        bound = bound_gamma * sum((abs(p * q) for p, q in zip(x, y, strict=True)), Fraction(0))
        assert abs(Fraction(float(got)) - exact) <= bound


def test_the_kernels_fast_exp_is_within_its_error_bound():
    """The fused kernel's fast float64 ``exp`` (``elementary.softmax32_consts``: the
    256-entry table, the degree-4 polynomial) written out in NumPy with the same operations,
    against mpmath, on every float32 ``d`` in a dense sample of ``[-104, 0]``, the table's
    boundaries and their neighbours: relative error below ``2**-51.3`` (the docstring's
    bound), under the ``2**-45`` the float32 rounding test needs."""
    import mpmath

    _, _, tf, c, *_ = elementary.softmax32_consts()
    inv_f, c1_f, neg_c2_f, c3, c4 = c[7], c[8], c[9], c[3], c[4]
    rng = np.random.default_rng(0)
    k = np.arange(-38400, 1)  # every table point kf ln2/256 in range, and its neighbours
    points = (k * math.log(2) / 256).astype(np.float32)
    d = np.concatenate([
        -104 * rng.random(20000).astype(np.float32), -(2.0 ** -rng.uniform(0, 30, 2000)),
        points, np.nextafter(points, np.float32(0)), np.nextafter(points, np.float32(-np.inf)),
    ]).astype(np.float32)  # fmt: skip
    d = np.unique(d[(d >= -104) & (d <= 0)])[::7]  # 7 500 values; mpmath is the slow part
    dc = d.astype(np.float64)
    magic = 6755399441055744.0
    kf = (dc * inv_f + magic) - magic
    rh = (dc - kf * c1_f) + kf * neg_c2_f
    q = ((rh * c4 + c3) * rh + 0.5) * (rh * rh)
    t = tf[kf.astype(np.int64) & 255]
    w = np.ldexp(t + t * (rh + q), (kf.astype(np.int64) >> 8).astype(np.int32))
    with mpmath.workprec(120):
        err = max(abs(mpmath.mpf(float(wi)) / mpmath.exp(mpmath.mpf(float(di))) - 1)
                  for wi, di in zip(w, d, strict=True))  # fmt: skip
    assert err < 2.0**-51.3, float(mpmath.log(err, 2))


# --- rounding to float16 / bfloat16 ----------------------------------------------------------


@needs_numba
@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_rounding_to_16_bits_matches_numpy_and_quantize(fmt, dtype, data):
    """``quantize_into`` on the fused path (``magic_round``, ``bfloat16_round``) gives the
    NumPy path's bits and ``quantize``'s (an independent reference: ``numstab.precision``),
    on any bit pattern, the rounding boundaries of the target and its overflow threshold."""
    from numstab.fastround import quantize_into
    from numstab.precision import quantize

    f = get_format(fmt)
    x = data.draw(any_floats(dtype, n=2000))
    top, tiny = float(f.max), float(f.smallest_subnormal)
    q = top * 2.0**-f.precision  # half an ulp at the top: the overflow boundary
    edges = np.array([top, top + q, -(top + q), top + q / 2, tiny, tiny / 2,
                      1 + 2.0**-f.precision, 1 + 3 * 2.0**-f.precision], dtype=dtype)  # fmt: skip
    x = np.concatenate([x, edges, np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf)])
    ref = bits(quantize(x, f).astype(np.float32))
    for name in ("numpy", "numba"):
        got = on(name, quantize_into, x, f)
        assert got.dtype == np.float32
        assert_same_bits(got, ref.view(np.float32))


@needs_numba
@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["exp", "log", "log1p", "expm1"])
def test_16_bit_functions_match_numpy_on_many_patterns(fmt, name):
    """The correctly rounded float16 / bfloat16 functions (``narrow_round16``: the rounding
    and the near-midpoint test in one pass) give the NumPy path's bits: every float16 value
    and 2**18 random float32 patterns (specials, subnormal results and overflow included)."""
    rng = np.random.default_rng(11)
    u = rng.integers(0, 2**32, 2**18, dtype=np.uint64).astype(np.uint32)
    every16 = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    # float32 inputs at bfloat16 subnormal midpoints: log1p / expm1 of them is that midpoint
    # in float64, decided only by the subnormal bracket
    mid = np.ldexp(2.0 * np.arange(1, 300) + 1, -134)
    x = quiet(np.concatenate([SPECIALS[np.dtype(np.float32)], u.view(np.float32), every16,
                              mid.astype(np.float32), -mid.astype(np.float32)]))  # fmt: skip
    if name == "exp":  # the softmax's range (d <= 0), the subnormal results and overflow
        x = np.concatenate([x, rng.uniform(-110, 90, 2**18).astype(np.float32)])
    f = get_format(fmt)
    x = np.asarray(x, dtype=np.float32)
    ref = on("numpy", elementary.apply, name, x, f, "correct", np)
    got = on("numba", elementary.apply, name, x, f, "correct", np)
    assert_same_bits(got, ref)


# --- the machine code and the whole step ---------------------------------------------------

_ASM_SCRIPT = r"""
import re, sys
from numstab import kernels
kernels.warm()
for name in ("_relu_grad", "_adam", "_exp64", "_narrow32", "_magic", "_bf16", "_narrow16",
             "_softmax32", "_lanes8"):
    fn = getattr(kernels, name).compiled()
    for sig in fn.signatures:
        asm = fn.inspect_asm(sig)
        fma = re.findall(r"\bv?f[n]?m(?:add|sub)\w*", asm)
        # _softmax32 evaluates exp in float64 from float32 logits by design, _lanes8 sums
        # float32 products in float64
        narrow = "float32" in str(sig[0]) and name not in ("_softmax32", "_lanes8")
        wide = narrow and re.findall(r"cvtss2sd|cvtps2pd|sqrtsd|sqrtpd", asm)
        print(name, sig[0], len(fma), len(wide or []))
"""


@needs_numba
def test_machine_code_has_no_fma_and_float32_stays_float32(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), kernels.ENV: "numba"}
    out = subprocess.run(
        [sys.executable, "-c", _ASM_SCRIPT], env=env, capture_output=True, text=True, check=True
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    # relu_grad, adam, magic, lanes8 in two dtypes; exp64; narrow32; bf16; narrow16; softmax32
    assert len(rows) == 13
    for row in rows:
        assert row[-2:] == ["0", "0"], f"FMA or float64 arithmetic in {row}"
    assert re.search(r"_adam array\(float32", out)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_training_steps_are_the_same_bits_on_both_paths(dtype):
    if not HAVE_NUMBA:
        pytest.skip("numba not installed")
    config = TrainConfig(p=23, hidden=(32, 32), dtype=dtype, lr=0.05)
    runs = {}
    for name in ("numpy", "numba"):
        run = on(name, Run, config, name=name)
        for _ in range(4):
            on(name, run.advance, log=False)
        runs[name] = run
    for k, v in runs["numpy"].params.items():
        assert_same_bits(runs["numba"].params[k], v)
    for k, ts in runs["numpy"].opt_state.tensors.items():
        for t, v in ts.items():
            assert_same_bits(runs["numba"].opt_state.tensors[k][t], v)
