"""The exact audit under stochastic rounding (numstab.audit_stochastic, audit_cross_entropy).

References, none of them the module's chain:

- a brute-force enumeration of every rounding outcome (Fraction arithmetic, the format's grid
  from its definition) on rows of 3-4 classes in 3- and 4-bit formats;
- a closed form for rows whose largest logit comes first and whose other terms stay below the
  gap ``g = 2**(1-p)`` above 1: ``P(S = 1) = Π_k (1 - c_k / g)``, ``c_k`` the carrier value of
  ``exp(z_k - m)`` (SR is unbiased and ``1 + e`` rounds to 1 with probability ``1 - e/g``);
- the Monte Carlo fraction of the loss as training computes it, whose Wilson interval must
  cover the exact probability.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from fraction_rounding import grid_neighbours
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from numstab.audit import audit_cross_entropy
from numstab.audit_stochastic import collapse_probability, exact_orders, wilson_interval
from numstab.precision import get_format, quantize

# --- the brute-force oracle ----------------------------------------------------------------


def _sr_branches(x: Fraction, fmt):
    """``[(value, probability)]`` of stochastic rounding of ``x``: up with distance / gap."""
    sign = -1 if x < 0 else 1
    lo, hi = grid_neighbours(abs(x), fmt)
    if lo == hi or abs(x) == lo:
        return [(x, Fraction(1))]
    f = (abs(x) - lo) / (hi - lo)
    return [(sign * lo, 1 - f), (sign * hi, f)]


def _exact32(v: Fraction) -> Fraction:
    """The float32 carrier of an operation: exact for these tiny formats (asserted)."""
    assert Fraction(float(np.float32(float(v)))) == v
    return v


def _exp_carrier(d: Fraction) -> Fraction:
    """The carrier value of ``exp d``: float32 of NumPy's float64 ``exp`` (as the loss)."""
    return Fraction(float(np.float32(np.exp(np.float64(float(d))))))


def _enumerate_collapse(row, fmt) -> Fraction:
    """``P(S = 1)`` by walking every outcome of every rounding (left-to-right sum)."""
    z = [Fraction(float(v)) for v in row]
    m = max(z)

    def terms(k, acc_terms, prob):
        if k == len(z):
            yield acc_terms, prob
            return
        for d, pd in _sr_branches(_exact32(z[k] - m), fmt):
            for e, pe in _sr_branches(_exp_carrier(d), fmt):
                yield from terms(k + 1, [*acc_terms, e], prob * pd * pe)

    def sums(acc, rest, prob):
        if not rest:
            yield acc, prob
            return
        for s, ps in _sr_branches(_exact32(acc + rest[0]), fmt):
            yield from sums(s, rest[1:], prob * ps)

    total = Fraction(0)
    for es, pt in terms(0, [], Fraction(1)):
        for s, ps in sums(es[0], es[1:], pt):
            if s == 1:
                total += ps
    return total


TINY_FORMATS = ("e3m2@sr", "e4m3@sr", "float8_e5m2@sr", "float8_e4m3@sr")


@settings(max_examples=40, deadline=None, database=None)
@given(
    name=st.sampled_from(TINY_FORMATS),
    data=st.data(),
    n=st.integers(3, 4),
)
def test_exact_probability_against_enumeration(name, data, n):
    fmt = get_format(name)
    # logits of the format, gaps up to 6: every carrier value is float32-exact and every
    # probability a multiple of 2**-32, so the definition (distance / gap) is what is drawn
    raw = data.draw(st.lists(st.floats(-6.0, 0.0), min_size=n, max_size=n))
    row = quantize(np.array(raw, dtype=np.float32), fmt.plain)
    want = _enumerate_collapse(row, fmt)
    for order in exact_orders(fmt, n):
        assert collapse_probability(row, fmt, order) == want, (name, row, order)


# --- the closed form --------------------------------------------------------------------------

#: Format -> range of ``z_k - m`` where the tail terms stay below the gap above 1 and
#: ``1 + e`` is exact in float32 (lowest bit of ``e`` at least 2**-23).
_CLOSED_FORM = {
    "float16@sr": (-9.0, -6.95),
    "bfloat16@sr": (-11.0, -4.86),
    "e4m3@sr": (-6.0, -2.08),
    "float8_e5m2@sr": (-11.0, -1.39),
}


@settings(max_examples=40, deadline=None, database=None)
@given(name=st.sampled_from(sorted(_CLOSED_FORM)), data=st.data())
def test_exact_probability_closed_form(name, data):
    fmt = get_format(name)
    lo, hi = _CLOSED_FORM[name]
    tail = data.draw(st.lists(st.floats(lo, hi), min_size=1, max_size=40))
    row = np.concatenate([[0.0], quantize(np.array(tail), fmt.plain)])
    g = Fraction(2) ** (1 - fmt.precision)
    # the range holds before rounding the logits to the format; after it, a term may reach g
    assume(all(_exp_carrier(Fraction(float(v))) <= g for v in row[1:]))
    want = Fraction(1)
    for v in row[1:]:
        want *= 1 - _exp_carrier(Fraction(float(v))) / g
    assert collapse_probability(row, fmt, "sequential") == want


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, database=None)
@given(
    name=st.sampled_from((*TINY_FORMATS, "float16@sr", "bfloat16@sr@ftz")),
    raw=st.lists(st.floats(-40.0, 10.0), min_size=1, max_size=12),
)
def test_probability_properties(name, raw):
    fmt = get_format(name)
    row = quantize(np.array(raw, dtype=np.float32), fmt.plain)
    p = collapse_probability(row, fmt, "sequential")
    if p is None:
        return
    assert 0 <= p <= 1
    top = row == row.max()
    if row.size == 1:
        assert p == 1
    elif top.sum() > 1:
        assert p == 0  # two terms of 1: the sum is at least 2
    # a tail further from the max collapses at least as often (every term smaller)
    further = np.where(top, row, quantize(row - 4.0, fmt.plain))
    q = collapse_probability(further, fmt, "sequential")
    if q is not None and top.sum() == 1:
        assert q >= p


def test_orders_without_an_exact_chain_give_none():
    row = np.array([0.0, -8.0, -9.0], dtype=np.float32)
    assert collapse_probability(row, "float16@sr", "pairwise") is None  # float32 tree
    assert collapse_probability(row, "bfloat16@sr", "pairwise") is not None  # < 8 classes
    assert collapse_probability(np.zeros(9), "bfloat16@sr", "pairwise") is None
    assert collapse_probability(row, "float16@sr", "sorted") is None
    assert collapse_probability(row, "float16", "sequential") is None  # not stochastic
    assert collapse_probability([0.0, np.inf], "float16@sr", "sequential") is None


# --- the audit: Monte Carlo against the exact value -------------------------------------------


def test_monte_carlo_interval_covers_the_exact_probability():
    rows = np.array(
        [[0, -7.5, -8.0, -9.0], [-8.0, 0, -7.0, -7.25], [-3.0, -9.0, 0, -7.5],
         [0, -12, -12, -12], [0, -1, -2, -3]],
        dtype=np.float32,
    )
    y = np.array([0, 1, 2, 0, 0])
    samples = 3000
    rep = audit_cross_entropy(rows, y, dtype="float16@sr", order="sequential",
                              sr_samples=samples, sr_seed=7, sr_confidence=0.999)
    s = rep.stochastic
    assert s.collapse_exact.all()
    lo, hi = wilson_interval(s.collapse_hits, samples, 0.999)
    for i, row in enumerate(rows):
        p = float(collapse_probability(row, "float16@sr", "sequential"))
        assert s.collapse_probability[i] == p
        assert lo[i] <= p <= hi[i], (i, p, s.collapse_hits[i] / samples)
    # pairwise (float32 tree, one rounding): Monte Carlo alone, labelled so
    pw = audit_cross_entropy(rows, y, dtype="float16@sr", sr_samples=200).stochastic
    assert not pw.collapse_exact.any()
    assert (pw.collapse_low <= pw.collapse_probability).all()
    assert (pw.collapse_probability <= pw.collapse_high).all()


def test_bias_is_measured_against_the_exact_values():
    rows = np.array([[0, -7.5, -8.0, -9.0], [0, -1, -2, -3]], dtype=np.float32)
    rep = audit_cross_entropy(rows, [0, 0], dtype="bfloat16@sr", sr_samples=400)
    s = rep.stochastic
    assert np.allclose(s.loss_bias, s.loss_mean - rep.loss_exact.astype(np.float64))
    assert np.allclose(s.target_grad_bias, s.target_grad_mean - rep.target_grad_exact)
    assert (s.loss_se > 0).all() and (s.target_grad_se > 0).all()
    # SR is unbiased op by op; the loss's only non-linear steps on random values are exp of
    # d (exact here: z - m on the grid) and log S: Jensen gives |E log S - log E S| <= Var S / 2
    # for S >= 1, and Var S <= (C - 1) (g/2)**2 with g = 2**(1-p) the gap above 1 (one
    # rounding per addition). Beyond that the mean is within 6 standard errors.
    g = 2.0**-7
    tol = 6 * s.loss_se + 3 * (g / 2) ** 2 / 2
    assert (np.abs(s.loss_bias) <= tol).all(), (s.loss_bias, tol)
    summ = rep.summary()
    assert summ["sr_samples"] == 400 and summ["sr_interval"] == "wilson"
    # below 8 classes bfloat16's pairwise leaf is a left-to-right chain: exact
    assert summ["sr_collapse_exact_rows"] == 2 and s.collapse_exact.all()


def test_audit_is_reproducible_and_refuses_bad_options():
    z = np.array([[0, -8, -9.0]], dtype=np.float32)
    a = audit_cross_entropy(z, [0], dtype="float16@sr", sr_samples=50, sr_seed=3)
    b = audit_cross_entropy(z, [0], dtype="float16@sr", sr_samples=50, sr_seed=3)
    assert np.array_equal(a.stochastic.loss_mean, b.stochastic.loss_mean)
    assert audit_cross_entropy(z, [0], dtype="float16").stochastic is None
    for kw, word in (({"sr_samples": 1}, "sr_samples"), ({"sr_confidence": 1.0}, "confidence"),
                     ({"sr_seed": -1}, "sr_seed")):
        with pytest.raises(ValueError, match=word):
            audit_cross_entropy(z, [0], dtype="float16@sr", **kw)


def test_wilson_interval():
    lo, hi = wilson_interval(np.array([0, 50, 100]), 100, 0.95)
    assert lo[0] == 0 and hi[2] == 1 and lo[2] < 1 and hi[0] > 0
    # the textbook value for 50/100 at 95 %: 0.5 ± 0.0962
    assert abs(lo[1] - 0.4038) < 1e-4 and abs(hi[1] - 0.5962) < 1e-4


def test_row_blocks_draw_their_own_streams_and_stablemax_is_estimated():
    z = np.tile(np.array([[0, -7.5, -8.0, -9.0]], dtype=np.float32), (4, 1))
    rep = audit_cross_entropy(z, [0] * 4, dtype="float16@sr", block_rows=1, sr_samples=64)
    # identical rows in different blocks: independent streams, so not identical draws
    assert len(set(rep.stochastic.target_grad_mean.tolist())) > 1
    sm = audit_cross_entropy(z, [0] * 4, dtype="bfloat16@sr", kind="stablemax", sr_samples=64)
    s = sm.stochastic
    assert not s.collapse_exact.any()
    assert ((s.collapse_low <= s.collapse_probability)
            & (s.collapse_probability <= s.collapse_high)).all()
    assert np.isfinite(s.loss_bias).all() and np.isfinite(s.target_grad_se).all()
