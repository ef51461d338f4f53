"""The transformer's fast sample-axis sums give NumPy's bits.

``numstab.transformer.colsum.column_sum`` evaluates NumPy's pairwise tree on whole rows; the
reference is NumPy's own reduction, ``numpy.sum`` along the contiguous last axis of the
transposed copy (what :func:`numstab.functional.linear_backward` computes for ``db``). Bits
are compared exactly: the two make the same additions in the same order or they do not.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import numpy_pairwise_sum
from hypothesis import given, settings
from hypothesis import strategies as st

from numstab.functional import linear_backward as functional_linear_backward
from numstab.functional import linear_forward
from numstab.precision import PrecisionPolicy, get_format, quantize
from numstab.transformer.colsum import column_sum, linear_backward
from numstab.transformer.dropout import SITES, DropoutKey, multiplier

# sizes around the tree's joints: below 8 (no unrolling), 8..128 (one leaf), past 128 and
# 256 (leaves of unequal lengths), and the paper's batches (5017 pairs; 2 positions).
SIZES = [0, 1, 7, 8, 9, 16, 17, 127, 128, 129, 136, 255, 257, 1000, 5017, 10034]


def _reference(g, dtype):
    """NumPy's pairwise tree down each column, added to its identity as numpy.sum does
    (written out scalar by scalar: numpy.sum itself splits rows above 8192 terms on
    NumPy 2.2)."""
    cols = np.asarray(g, dtype=dtype).T
    return np.array([numpy_pairwise_sum(c, dtype) for c in cols], dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", SIZES)
def test_column_sum_is_numpys_pairwise_sum(dtype, n):
    rng = np.random.default_rng(n)
    # magnitudes over 60 decades: every addition rounds, so any other order shows
    g = (rng.standard_normal((n, 5)) * 10.0 ** rng.integers(-30, 30, (n, 5))).astype(dtype)
    got = column_sum(g, PrecisionPolicy.uniform(dtype))
    assert got.dtype == np.dtype(dtype) and got.shape == (5,)
    assert got.tobytes() == _reference(g, dtype).tobytes()


def test_column_sum_detects_another_order():
    """The data above separates orders: sequential summation gives other bits."""
    g = (np.random.default_rng(1).standard_normal((1000, 5)) * 1e3).astype(np.float32)
    got = column_sum(g, PrecisionPolicy.uniform("float32"))
    assert got.tobytes() != np.add.reduce(g, axis=0).tobytes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_column_sum_special_values(dtype):
    """Signed zeros (an all -0.0 column sums to +0.0, as NumPy's reduction does), inf, NaN."""
    n = 300
    g = np.zeros((n, 4), dtype=dtype)
    g[:, 0] = -0.0
    g[:, 1] = -0.0
    g[200, 1] = np.inf
    g[:, 2] = 1.0
    g[5, 2], g[290, 2] = np.inf, -np.inf  # inf - inf: NaN
    g[:, 3] = np.finfo(dtype).max  # overflows to inf
    with np.errstate(over="ignore", invalid="ignore"):
        got = column_sum(g, PrecisionPolicy.uniform(dtype))
        want = _reference(g, dtype)
    assert got.tobytes() == want.tobytes()
    assert np.signbit(got[0]) == np.False_ and got[1] == np.inf
    assert np.isnan(got[2]) and got[3] == np.inf


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_column_sum_16_bit_storage(fmt):
    """16-bit storage: the sum in the float32 compute carrier, then one rounding."""
    policy = PrecisionPolicy.uniform(fmt)
    g = quantize(np.random.default_rng(2).standard_normal((700, 6)).astype(np.float32),
                 get_format(fmt))
    want = quantize(_reference(g, np.float32), get_format(fmt))
    assert column_sum(g, policy).tobytes() == want.tobytes()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 600),
    cols=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(["float32", "float64"]),
)
def test_column_sum_any_length(n, cols, seed, dtype):
    g = np.random.default_rng(seed).standard_normal((n, cols)).astype(dtype)
    got = column_sum(g, PrecisionPolicy.uniform(dtype))
    assert got.tobytes() == _reference(g, dtype).tobytes()


@pytest.mark.parametrize("fmt", ["float32", "float16"])
def test_linear_backward_is_functionals(fmt):
    """The transformer's linear backward: numstab.functional's (dx, dw, db), bit for bit."""
    policy = PrecisionPolicy.uniform(fmt)
    rng = np.random.default_rng(3)
    f = get_format(fmt)
    x = quantize(rng.standard_normal((300, 7)).astype(np.float32), f)
    w = quantize(rng.standard_normal((7, 5)).astype(np.float32), f)
    b = quantize(rng.standard_normal(5).astype(np.float32), f)
    dy = quantize(rng.standard_normal((300, 5)).astype(np.float32), f)
    for bias in (b, None):
        _, cache = linear_forward(x, w, bias, policy)
        got = linear_backward(dy, cache, policy)
        want = functional_linear_backward(dy, cache, policy)
        for a, c in zip(got, want, strict=True):
            assert (a is None and c is None) or a.tobytes() == c.tobytes()


@pytest.mark.parametrize("shape", [(0,), (3,), (65536,), (65537,), (300, 700), (7, 3, 5000)])
@pytest.mark.parametrize("fmt", ["float64", "float32", "float16"])
def test_dropout_mask_is_its_documented_stream(shape, fmt):
    """The mask drawn in pieces is the documented one: element i dropped when u[i] < p for
    ``u = default_rng(SeedSequence(seed, spawn_key=(1, step, site))).random(shape)``, kept
    ones multiplied by RN(1/(1 - p)) (pieces of 65 536 numbers: shapes across the joints)."""
    key, p, site = DropoutKey(seed=5, step=11), 0.1, "feedforward"
    ss = np.random.SeedSequence(5, spawn_key=(1, 11, SITES.index(site)))
    u = np.random.default_rng(ss).random(shape)
    f = get_format(fmt)
    scale = quantize(np.asarray(1 / (1 - p)), f)
    want = np.where(u < p, np.zeros_like(scale), scale)
    got = multiplier(key, site, shape, p, f)
    assert got.shape == tuple(shape) and got.dtype == want.dtype
    assert got.tobytes() == want.tobytes()
