"""MSE on one-hot targets, softmax temperature and label smoothing (the losses' options).

References: exact rational / mpmath values (:mod:`numstab.exact`'s ``mse``, ``mse_grad``,
``log_softmax``, ``cross_entropy`` on exact inputs), closed forms computed with IEEE float32
scalar arithmetic, and the op-by-op fidelity check (every recorded operation against its exact
value, :mod:`numstab.fidelity`). Tolerances are error bounds derived beside each assertion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import mpmath
import numpy as np
import pytest
from helpers import SOME, gamma
from hypothesis import example, given
from hypothesis import strategies as st

from numstab import exact
from numstab.fidelity import op_fidelity
from numstab.losses import loss_backward, loss_forward
from numstab.losses.rounding import recording
from numstab.run import Run, TrainConfig
from numstab.sweep.spec import canonical_json, run_id

U64 = 2.0**-53
U32 = 2.0**-24

rows = st.integers(1, 4).flatmap(
    lambda n: st.integers(2, 8).flatmap(
        lambda c: st.tuples(
            st.lists(
                st.lists(st.floats(-60, 60, allow_nan=False, width=64), min_size=c, max_size=c),
                min_size=n,
                max_size=n,
            ),
            st.lists(st.integers(0, c - 1), min_size=n, max_size=n),
        )
    )
)


def _f(v) -> float:
    return float(v)


# --- every operation correctly rounded, in every format --------------------------------------

VARIANTS = {
    "mse": ({"loss": "mse"}, {"sub", "mul", "div"}),
    "smoothing": ({"label_smoothing": 0.1}, {"mul_sub", "mul", "add"}),
    "temperature": ({"temperature": 0.7}, {"div", "exp", "dl_p_minus_one"}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_a_training_step_is_correctly_rounded_op_by_op(dtype, variant):
    options, names = VARIANTS[variant]
    cfg = TrainConfig(p=23, hidden=(32, 32), steps=20, lr=0.05, dtype=dtype, seed=1, **options)
    run = Run(cfg)
    for _ in range(6):
        run.advance(log=False)
    with recording() as ops:
        run.advance(log=False)
    reports = op_fidelity(ops, samples=48, seed=0)
    assert names <= set(reports), set(reports)
    for name, r in reports.items():
        assert r.n_correct == r.n, (dtype, variant, name, r)


# --- MSE against the exact value ---------------------------------------------------------------


@SOME
@given(rows, st.sampled_from(["float32", "float64"]))
@example(([[1.0, 0.0, 0.0]], [0]), "float32")  # a perfect fit: loss and gradient exactly 0
@example(([[1e-30, -3e-39, 0.5]], [2]), "float32")  # squares below float32's range
def test_mse_against_exact(case, fmt):
    z, y = np.array(case[0]), np.array(case[1])
    dtype, u = (np.float32, U32) if fmt == "float32" else (np.float64, U64)
    z = z.astype(dtype)
    c = z.shape[1]
    loss, cache = loss_forward(z, y, kind="mse", fmt=fmt)
    g = loss_backward(cache, 1.0)
    want = np.array([_f(v) for v in exact.mse(z, y)])
    # C squares, C - 1 additions and one division, each one rounding of non-negative values:
    # within γ_{2C}·exact, plus C half-quanta of the subnormal range (squares that underflow).
    tiny = float(np.finfo(dtype).smallest_subnormal)
    assert np.all(np.abs(loss - want) <= gamma(2 * c, u) * want + c * tiny), (loss, want)
    gw = np.array([[_f(v) for v in r] for r in exact.mse_grad(z, y)])
    # RN(z_y - 1), c = RN(2/C), RN(d·c): three roundings, within γ_3 relative (+ a half-quantum)
    assert np.all(np.abs(g - gw) <= gamma(3, u) * np.abs(gw) + tiny), (g, gw)


def test_mse_is_pytorch_mse_loss_in_float64():
    torch = pytest.importorskip("torch", reason="PyTorch is the reference here")
    rng = np.random.default_rng(3)
    z, y = rng.standard_normal((32, 7)) * 4, rng.integers(0, 7, 32)
    loss, cache = loss_forward(z, y, kind="mse", fmt="float64")
    g = loss_backward(cache, 1 / 32)
    zt = torch.tensor(z, requires_grad=True)
    ref = torch.nn.functional.mse_loss(zt, torch.nn.functional.one_hot(torch.tensor(y), 7).double())
    ref.backward()
    # both sides: sums of 7·32 non-negative terms, a few roundings per entry
    assert abs(loss.mean() - ref.item()) <= gamma(7 * 32 + 4, U64) * ref.item()
    assert np.allclose(g, zt.grad.numpy(), rtol=gamma(6, U64), atol=0)


# --- label smoothing ---------------------------------------------------------------------------


def _exact_smoothed(z, y, eps):
    """Exact loss (N,) and gradient (N, C) of label smoothing ε (ε taken as given)."""
    lsm = exact.log_softmax(z)
    n, c = z.shape
    e = mpmath.mpf(eps)
    loss = [
        -(1 - e) * lsm[i, y[i]] - e / c * mpmath.fsum(lsm[i, k] for k in range(c))
        for i in range(n)
    ]
    p = exact.softmax(z)
    grad = [[p[i, k] - e / c - (1 - e if k == y[i] else 0) for k in range(c)] for i in range(n)]
    return np.array([_f(v) for v in loss]), np.array([[_f(v) for v in r] for r in grad]), lsm


@SOME
@given(rows, st.sampled_from([0.1, 0.25, 0.6]))
@example(([[0.0, -200.0, -200.0]], [0]), 0.1)  # collapsed in float64 without smoothing
def test_label_smoothing_against_exact_float64(case, eps):
    z, y = np.array(case[0]), np.array(case[1])
    c = z.shape[1]
    loss, cache = loss_forward(z, y, fmt="float64", label_smoothing=eps)
    g = loss_backward(cache, 1.0)
    want, gw, lsm = _exact_smoothed(z, y, eps)
    ell = -np.array([[_f(v) for v in r] for r in lsm])  # exact -log p_k >= 0
    # Each computed -lsm_k is within E_k = 4u·ℓ_k + γ_{2C+2} of ℓ_k (d_k and lse rounded, S
    # within γ_{C+1} + C·u relative: the exp of a rounded d_k adds |d_k|·u·e^{d_k} <= u/e per
    # term). The loss adds the sum of C non-negative terms and four roundings: γ_{C+8}·L, plus
    # the weights' share (1 - ε + ε) of the E_k.
    e_k = 4 * U64 * ell + gamma(2 * c + 2, U64)
    assert np.all(np.abs(loss - want) <= gamma(c + 8, U64) * want + 2 * e_k.max(axis=1))
    # g_k = RN(p_k - c_k): p_k = RN(exp(lsm_k)) is within u + E_k relative, c_k (the rounded
    # weights) within 2u·q_k, and the final rounding u·|g|.
    p = np.exp(-ell)
    q = np.where(np.arange(c) == y[:, None], 1 - eps + eps / c, eps / c)
    tol = U64 * np.abs(gw) + 1.01 * p * (U64 + e_k) + 3 * U64 * q
    assert np.all(np.abs(g - gw) <= tol), (g, gw)


def test_label_smoothing_keeps_the_gradient_of_a_collapsed_row():
    # float32 softmax of [0, -200, -200]: p = (1, 0, 0) exactly, so without smoothing both the
    # loss and the logit gradient are exactly 0 (Softmax Collapse).
    z, y = np.array([[0.0, -200.0, -200.0]], np.float32), np.array([0])
    loss, cache = loss_forward(z, y, fmt="float32")
    assert loss[0] == 0 and not loss_backward(cache, 1.0).any()
    eps = np.float32(0.3)
    loss, cache = loss_forward(z, y, fmt="float32", label_smoothing=0.3)
    g = loss_backward(cache, 1.0)
    # Closed form in IEEE float32 scalar arithmetic: a = RN(ε/C), b = RN(RN(1 - ε) + a);
    # g_k = RN(0 - a) off target, g_y = RN(1 - b) (p_y = 1 exactly, dl = 1).
    a = eps / np.float32(3)
    b = (np.float32(1) - eps) + a
    assert g[0, 1] == g[0, 2] == -a and g[0, 1] < 0
    assert g[0, 0] == np.float32(1) - b
    # loss = RN(RN(1 - ε)·0 + RN(a·Σ ℓ_k)): ℓ_k = 200 + lse with lse = 0 exactly here
    assert loss[0] == a * np.float32(400)


# --- temperature -------------------------------------------------------------------------------


@SOME
@given(rows, st.sampled_from([0.3, 0.7, 2.5, 10.0]), st.sampled_from(["softmax", "stablemax"]))
@example(([[0.0, 0.0]], [0]), 0.7, "softmax")  # zero logits (mpmath takes no Fraction 0)
def test_temperature_against_exact_float64(case, t, kind):
    z, y = np.array(case[0]), np.array(case[1])
    c = z.shape[1]
    loss, cache = loss_forward(z, y, fmt="float64", kind=kind, temperature=t)
    g = loss_backward(cache, 1.0)
    ctx = exact.context(200)
    # z/T exactly (a Fraction), then to 200 bits: numerator and denominator are exact mpfs
    q = [[Fraction(v) / Fraction(t) for v in r] for r in z]
    zt = np.array([[ctx.mpf(f.numerator) / f.denominator for f in r] for r in q], dtype=object)
    if kind == "softmax":
        want = np.array([_f(v) for v in exact.cross_entropy(zt, y)])
        gw = np.array([[_f(v) for v in r] for r in exact.cross_entropy_grad(zt, y)]) / t
    else:
        want = np.array([_f(v) for v in exact.stablemax_cross_entropy(zt, y)])
        gw = [[_f(v) for v in r] for r in exact.stablemax_cross_entropy_grad(zt, y)]
        gw = np.array(gw) / t
    # The loss is of RN(z/T): each logit moved by at most u·|z/T| (relative), which moves the
    # loss by at most 2·max|δz| (its gradient has l1 norm <= 2 for softmax, and StableMax's
    # derivative of log s is at most 1 per logit: <= 2·max|δz| too), then the loss's own
    # roundings (a sum of C terms and a few operations: γ_{C+6} relative, plus an absolute
    # γ_{C+6} for a loss near 0).
    dz = U64 * np.abs(z / t).max(axis=1)
    assert np.all(np.abs(loss - want) <= 2 * dz + gamma(c + 6, U64) * (1 + want))
    # The gradient: each entry within γ_{C+8} + 4·max|δz| of its size (|g_k| <= p_k + δ_ky,
    # so the bound is taken on |gw| + 1/T per row), then RN(g / T) adds u.
    scale = np.abs(gw) + 1 / t
    tol = (gamma(c + 8, U64) + 4 * dz[:, None] * (1 + np.abs(z / t).max())) * scale
    assert np.all(np.abs(g - gw) <= tol), (g, gw)


# --- run options -------------------------------------------------------------------------------


def test_new_options_at_their_neutral_value_keep_every_run_id():
    base = TrainConfig()
    text = canonical_json(base)
    assert "temperature" not in text and "label_smoothing" not in text
    assert run_id(base.replace(temperature=2.0)) != run_id(base)
    assert run_id(base.replace(label_smoothing=0.1)) != run_id(base)
    # and the id of an explicit neutral value is the default's
    assert run_id(base.replace(temperature=1)) == run_id(base)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--label-smoothing", "1"], "--label-smoothing: must be a finite number in [0,"),
        (["train", "--temperature", "0"], "--temperature: must be a finite number > 0"),
        (["train", "--loss", "stablemax", "--label-smoothing", "0.1"], "defined for the softmax"),
        (["compare", "--loss", "mse"], "--loss mse: compare's exact audit covers"),
    ],
)
def test_bad_option_values_exit_2_with_one_line(argv, message, tmp_path):
    cmd = [sys.executable, "-m", f"numstab.{argv[0]}", *argv[1:], "--steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # a refused command writes nothing


def test_mse_run_trains_and_records_its_options(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "numstab.train", "--loss", "mse", "--temperature", "2",
           "--steps", "20", "--log-every", "10", "--out", str(out), "--quiet"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    text = json.dumps(summary)
    assert '"loss": "mse"' in text and '"temperature": 2.0' in text
