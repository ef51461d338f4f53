"""Tests for numstab.testing: the strategies deliver what they promise, and check_vjp
accepts a right vector-Jacobian product and rejects one that is wrong by a few ulps times the
condition of the check.

The strategy properties are checked in exact arithmetic (``numstab.exact`` tails, Fractions);
the check_vjp tests use maps whose exact gradient is known in closed form.
"""

from __future__ import annotations

import importlib
import sys
from fractions import Fraction

import numpy as np
import pytest
from helpers import FEW, SOME, U, dyadic, frac, gamma
from hypothesis import given
from hypothesis import strategies as st

from numstab import exact
from numstab import testing as nt
from numstab.audit import sc_gap_window
from numstab.precision import available_formats, get_format, quantize

ALL_FORMATS = list(available_formats())


def representable(z, fmt):
    """Every element is a value of ``fmt`` (NaN included)."""
    return np.array_equal(quantize(z, fmt), z, equal_nan=True)


def stablemax_tail(row, eps) -> Fraction:
    """Exact StableMax tail ``Σ_{k≠k*} s(z_k) / s(z_k*)`` of a finite row (Fractions)."""
    e = Fraction(eps)
    s = [x + 1 if x >= 0 else 1 / (1 - x + e) for x in map(frac, row)]
    k = int(np.argmax(row))
    return sum(s[j] for j in range(len(s)) if j != k) / s[k]


# --- the strategies -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@FEW
@given(data=st.data())
def test_logits_strategy(fmt, data):
    f = get_format(fmt)
    native = data.draw(st.booleans())
    z = data.draw(nt.logits(dtype=fmt, n_rows=3, n_classes=st.integers(1, 5), native=native))
    assert z.shape[0] == 3 and 1 <= z.shape[1] <= 5
    assert z.dtype == (f.dtype if native else f.carrier)
    zc = z.astype(f.carrier)
    assert np.isfinite(zc).all() and representable(zc, fmt)
    w = data.draw(
        nt.logits(dtype=fmt, n_rows=2, n_classes=4, allow_nonfinite=True, min_value=-5, max_value=5)
    )
    fin = w[np.isfinite(w)]
    assert representable(w, fmt) and (np.abs(fin) <= 5 + 1e-2).all()


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("side", ["below", "above"])
@FEW
@given(data=st.data())
def test_near_collapse_strategy_band(fmt, side, data):
    band = data.draw(st.sampled_from([0.25, 1e-9, 1e-18]))
    z = data.draw(
        nt.logits_near_collapse(fmt, st.integers(2, 60), n_rows=2, side=side, rel_band=band)
    )
    assert representable(z, fmt) and z.dtype == get_format(fmt).carrier
    u = exact.context().ldexp(1, -get_format(fmt).precision)
    for s, row in zip(exact.tail_sum(z), z, strict=True):
        assert (row == row.max()).sum() == 1  # a unique maximum
        if side == "below":
            assert u - u * band <= s < u
        else:
            assert u < s <= u + u * band


@pytest.mark.parametrize("fmt", [f for f in ALL_FORMATS if f != "float16"])
@FEW
@given(data=st.data())
def test_near_collapse_strategy_stablemax(fmt, data):
    eps = data.draw(st.sampled_from([0.0, 1e-30]))
    z = data.draw(
        nt.logits_near_collapse(
            fmt,
            st.integers(2, 60),
            n_rows=2,
            side="below",
            rel_band=1e-9,
            kind="stablemax",
            eps=eps,
        )
    )
    u = Fraction(1, 2 ** get_format(fmt).precision)
    for row in z:
        assert u * (1 - Fraction(1e-9)) <= stablemax_tail(row, eps) < u


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@FEW
@given(data=st.data())
def test_other_strategies(fmt, data):
    f = get_format(fmt)
    ctx = exact.context()
    # gap window: every gap within the padded window plus jitter (and rounding of one ulp)
    n = data.draw(st.integers(2, 20))
    z = data.draw(nt.logits_in_gap_window(fmt, n, n_rows=2, jitter=0.5))
    lo, hi = sc_gap_window(fmt, n)
    pad = 0.1 * (hi - lo) + 1e-3
    for row in z.astype(np.float64):
        gaps = row.max() - np.delete(row, np.argmax(row))
        p = min(f.precision, 53)  # longdouble rows live on the float64 grid
        slack = 2.0 ** (1 - p) * (abs(row).max() + 1)  # rounding of m - g - j
        assert (gaps >= lo - pad - slack).all() and (gaps <= hi + pad + 0.5 + slack).all()
    # ties: the maximum occurs at least twice
    z = data.draw(nt.logits_with_ties(fmt, st.integers(2, 10), n_rows=3))
    assert representable(z, fmt)
    assert all((row == row.max()).sum() >= 2 for row in z)
    # huge gaps: every other logit at least min_gap below the maximum (exactly)
    z = data.draw(nt.logits_huge_gap(fmt, st.integers(2, 10), n_rows=2, min_gap=1e4))
    assert representable(z, fmt)
    for row in z:
        k = int(np.argmax(row))
        assert all(frac(row[k]) - frac(v) >= 10**4 for j, v in enumerate(row) if j != k)
    # subnormal tails: exact exp(z_k - max) in [smallest subnormal, tiny - smallest]
    z = data.draw(nt.logits_subnormal_tail(fmt, st.integers(2, 10), n_rows=2))
    assert representable(z, fmt)
    small = ctx.ldexp(1, f.emin - f.precision + 1)
    tiny = ctx.ldexp(1, f.emin)
    for row in exact.to_exact(z):
        m = max(row)
        terms = [ctx.exp(v - m) for v in row if v != m]
        assert len(terms) == len(row) - 1 and all(small <= t <= tiny - small for t in terms)
    # one class and non-finite rows
    z = data.draw(nt.one_class_logits(fmt, n_rows=3))
    assert z.shape == (3, 1) and representable(z, fmt)
    z = data.draw(nt.nonfinite_logits(fmt, st.integers(1, 6), n_rows=3))
    assert (~np.isfinite(z)).any(axis=1).all() and representable(z, fmt)


@SOME
@given(data=st.data())
def test_labels_for_and_pairs(data):
    z = data.draw(nt.logits(n_rows=st.integers(0, 6), n_classes=st.integers(1, 6)))
    for target in ("any", "argmax", "mixed"):
        y = data.draw(nt.labels_for(z, target=target))
        assert y.dtype == np.int64 and y.shape == (z.shape[0],)
        assert ((0 <= y) & (y < z.shape[1])).all()
        if target == "argmax":
            np.testing.assert_array_equal(y, np.argmax(z, axis=1))
    zz, yy = data.draw(nt.logits_and_labels(nt.logits_with_ties("float16", 4), target="argmax"))
    assert yy[0] == np.argmax(zz[0])


def test_formats_strategy_and_validation():
    assert set(nt.formats().elements) == set(available_formats())
    assert "longdouble" not in nt.formats(include_longdouble=False).elements
    assert set(nt.formats(include_emulated=False).elements) <= {"float32", "float64", "longdouble"}
    with pytest.raises(ValueError, match="n_classes"):
        nt.logits_near_collapse("float32", 1)
    with pytest.raises(ValueError, match="rel_band"):
        nt.logits_near_collapse("float32", 3, rel_band=1.5)
    with pytest.raises(ValueError, match="'middle'"):
        nt.logits_near_collapse("float32", 3, side="middle")
    with pytest.raises(ValueError, match="'float8'"):
        nt.logits(dtype="float8")
    with pytest.raises(ValueError, match="min_gap"):
        nt.logits_huge_gap("float16", 3, min_gap=1e5)
    with pytest.raises(ValueError, match="'sometimes'"):
        nt.labels_for(np.zeros((1, 2)), target="sometimes")


def test_import_without_hypothesis_says_how_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "hypothesis" or m.startswith("hypothesis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    monkeypatch.delitem(sys.modules, "numstab.testing")
    with pytest.raises(ImportError, match=r"pip install 'numstab\[test\]'"):
        importlib.import_module("numstab.testing")


# --- check_vjp ------------------------------------------------------------------------------

N_IN, N_OUT = 7, 5


def linear_problem(seed):
    """``f(x) = x W`` with dyadic ``x``, ``W``; the exact VJP is ``R Wᵀ``.

    Error bounds (float64): each output is a dot product of ``N_IN`` terms,
    ``|fl(x W) - x W| <= γ_{N_IN} |x||W|``; each VJP entry one of ``N_OUT`` terms.
    """
    rng = np.random.default_rng(seed)
    W = dyadic(rng, (N_IN, N_OUT))
    x = dyadic(rng, (4, N_IN))
    v = dyadic(rng, x.shape)
    kw = {
        "direction": v,
        "rng": rng,
        "h": 2.0**-4,  # f is linear: no truncation error, so a large step is free
        "f_err": lambda p: gamma(N_IN) * (np.abs(p) @ np.abs(W)),
        "vjp_err": lambda R: gamma(N_OUT) * (np.abs(R) @ np.abs(W).T),
    }
    return W, x, v, kw


@pytest.mark.parametrize("seed", range(4))
def test_check_vjp_accepts_the_right_vjp_and_rejects_one_a_few_ulps_off(seed):
    """The derived tolerance is a few ulps times the condition ``<|g|, |v|> / |<g, v>|``,
    and a VJP moved by four times that tolerance (along ``sign(v)``, so that the move shows
    fully in ``<g, v>``) is rejected."""
    W, x, v, kw = linear_problem(seed)
    rep = nt.check_vjp(lambda p: p @ W, lambda p, R: R @ W.T, x, **kw)
    assert abs(rep.fd - rep.vjp) <= rep.tol
    # tol: (γ_{N_IN} + 2u) <|R|, |x±hv||W|> / h  +  (γ_{N_OUT} + u) <|g|, |v|>  + rounding.
    assert rep.tol <= 2**-40 * rep.scale
    rho = 4 * rep.tol / rep.scale  # about 2**-38 relative: a few ulps times the condition

    def wrong(p, R):
        g = R @ W.T
        return g + rho * np.abs(g) * np.sign(v)

    with pytest.raises(AssertionError, match="disagrees with central differences"):
        nt.check_vjp(lambda p: p @ W, wrong, x, **kw)
    with pytest.raises(AssertionError, match="disagrees"):  # a factor-2 slip
        nt.check_vjp(lambda p: p @ W, lambda p, R: 2 * (R @ W.T), x, **kw)


@pytest.mark.parametrize("seed", range(3))
def test_check_vjp_with_truncation_error_cubic(seed):
    """``f(x) = x³`` elementwise: ``F'''(t) = 6 Σ R_i v_i³`` exactly, so ``third`` is a
    bound; ``x·x·x`` has 2 roundings, ``3·(x·x)·R`` 3."""
    rng = np.random.default_rng(10 + seed)
    x = dyadic(rng, (3, 4))
    kw = {
        "rng": rng,
        "h": 2.0**-16,
        "f_err": lambda p: gamma(2) * np.abs(p) ** 3,
        "vjp_err": lambda R: gamma(3) * 3 * x**2 * np.abs(R),
        "third": lambda v, R: 6 * float(np.sum(np.abs(R) * np.abs(v) ** 3)),
    }
    rep = nt.check_vjp(lambda p: p * p * p, lambda p, R: 3 * (p * p) * R, x, **kw)
    assert rep.tol <= 2**-25 * rep.scale
    with pytest.raises(AssertionError, match="disagrees"):
        nt.check_vjp(lambda p: p * p * p, lambda p, R: 3.0001 * (p * p) * R, x, **kw)


def test_check_vjp_default_error_model_and_step():
    """Defaults: relative error 4u per value, ``h = 2**round(log2(u) / 3)`` (2**-18 in
    float64): sharp enough (below 100 sqrt(u) of the scale) for a smooth function."""
    x = np.array([0.5, -1.25, 2.0, 0.75])
    rep = nt.check_vjp(
        lambda p: p * p, lambda p, R: 2 * p * R, x, third=0.0, rng=np.random.default_rng(1)
    )
    assert abs(rep.fd - rep.vjp) <= rep.tol <= 100 * np.sqrt(U) * rep.scale


def test_check_vjp_refuses_inexact_points_and_loose_tolerances():
    W, x, _, kw = linear_problem(0)
    with pytest.raises(ValueError, match="multiples of 2"):
        nt.check_vjp(lambda p: p @ W, lambda p, R: R @ W.T, x + 0.1, **kw)
    with pytest.raises(ValueError, match="power of two"):
        nt.check_vjp(lambda p: p @ W, lambda p, R: R @ W.T, x, h=0.3)
    with pytest.raises(AssertionError, match="not sharp"):
        nt.check_vjp(lambda p: p @ W, lambda p, R: R @ W.T, x, rel_err=1e-3, h=2.0**-4)
    with pytest.raises(AssertionError, match="structure"):
        nt.check_vjp(lambda p: p @ W, lambda p, R: (R @ W.T)[:, :-1], x, **kw)
