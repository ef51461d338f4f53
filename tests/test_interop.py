"""Arrays of other frameworks in the audit: intake, shapes, streaming, framework orders.

The references are independent of the code under test: values compared with the framework's
own float64 conversion of the same tensor, memory sharing checked with the framework's own
pointer, bfloat16 bits compared with ``ml_dtypes``' rounding of the exact values.
"""

from __future__ import annotations

import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from numstab.audit import (
    absorbed,
    audit_cross_entropy,
    exact_logit_gradient,
    sc_fraction,
    ulp_error,
)
from numstab.interop import as_numpy, format_arg

try:
    import torch
except ImportError:  # optional: the test extra installs it
    torch = None
try:
    import jax
    import jax.numpy as jnp
except ImportError:  # optional: the test and jax extras install it
    jax = jnp = None

needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")
needs_jax = pytest.mark.skipif(jax is None, reason="jax is not installed (optional)")
needs_cuda = pytest.mark.skipif(
    torch is None or not torch.cuda.is_available(), reason="no CUDA device for torch"
)

BF16 = np.dtype(ml_dtypes.bfloat16)


# --- 1. any array in ----------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_torch_tensors_are_read_without_a_copy_in_their_own_format(dtype):
    t = torch.randn(5, 7, dtype=torch.float64).to(getattr(torch, dtype))
    t = t.t()  # non-contiguous: strides are kept, not copied
    a, fmt = as_numpy(t, "logits")
    assert fmt.name == dtype
    assert a.shape == (7, 5)
    assert a.__array_interface__["data"][0] == t.data_ptr()  # the tensor's own memory
    np.testing.assert_array_equal(a.astype(np.float64), t.double().numpy())


@needs_torch
def test_torch_bfloat16_is_read_bit_for_bit():
    # every bfloat16 bit pattern: the view must give exactly those bits (no float32 trip)
    bits = np.arange(2**16, dtype=np.uint16)
    t = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    a, fmt = as_numpy(t, "x")
    assert a.dtype == BF16 and fmt.name == "bfloat16"
    np.testing.assert_array_equal(a.view(np.uint16), bits)


@needs_torch
def test_tensors_that_require_grad_are_detached_and_audited():
    z = torch.tensor([[0.0, -30.0, -30.0], [0.0, -1.0, -2.0]], requires_grad=True)
    logits = z * 1.0  # a non-leaf tensor in a graph
    assert sc_fraction(logits) == 0.5
    rep = audit_cross_entropy(torch.nn.Parameter(z.detach().bfloat16()), torch.tensor([0, 0]))
    assert rep.dtype == "bfloat16"
    assert rep.collapsed.tolist() == [True, False]
    assert z.grad is None and logits.requires_grad  # nothing changed on the torch side


@needs_torch
def test_torch_dtype_objects_are_formats():
    for tdt, name in [
        (torch.float16, "float16"),
        (torch.half, "float16"),
        (torch.bfloat16, "bfloat16"),
        (torch.float32, "float32"),
        (torch.float64, "float64"),
    ]:
        assert format_arg(tdt).name == name
    z = np.array([[0.0, -9.0]], dtype=np.float32)  # e^-9 = 1.2e-4: absorbed below 2**-11
    assert sc_fraction(z, dtype=torch.bfloat16) == 1.0
    assert sc_fraction(z, dtype=torch.float32) == 0.0
    with pytest.raises(ValueError, match=r"dtype: unknown format torch.int8"):
        sc_fraction(z, dtype=torch.int8)


@needs_torch
def test_unreadable_tensors_are_refused_with_the_argument_name():
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(TypeError, match=r"^logits: cannot read"):
        sc_fraction(sparse)


@needs_cuda
def test_cuda_tensors_are_copied_to_the_host():
    t = torch.tensor([[0.0, -30.0], [0.0, -1.0]], device="cuda", dtype=torch.bfloat16)
    assert sc_fraction(t) == 0.5
    assert audit_cross_entropy(t, torch.tensor([0, 0], device="cuda")).dtype == "bfloat16"


@needs_jax
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_jax_arrays_and_dtypes(dtype):
    z = jnp.asarray([[0.0, -9.0], [0.0, -1.0]], dtype=getattr(jnp, dtype))
    a, fmt = as_numpy(z, "logits")
    assert fmt.name == dtype
    np.testing.assert_array_equal(a.astype(np.float64), np.asarray(z, dtype=np.float64))
    assert format_arg(getattr(jnp, dtype)).name == dtype
    expected = {"float16": 0.5, "bfloat16": 0.5, "float32": 0.0}[dtype]
    assert sc_fraction(z) == expected


def test_array_api_arrays_come_through_dlpack():
    xps = pytest.importorskip("array_api_strict")
    z = xps.asarray([[0.0, -30.0], [0.0, -1.0]], dtype=xps.float32)
    assert sc_fraction(z) == 0.5
    assert format_arg(xps.float64).name == "float64"
    assert sc_fraction(z, dtype=xps.float64) == 0.0
    with pytest.raises(ValueError, match="unknown format array_api_strict.int32"):
        format_arg(xps.int32)


def test_non_native_byte_order_is_read_in_native_order():
    a, fmt = as_numpy(np.array([1.5, -2.0], dtype=">f8"))
    assert a.dtype.isnative and fmt.name == "float64"
    np.testing.assert_array_equal(a, [1.5, -2.0])


def test_elementwise_audits_take_tensors_too():
    if torch is None:
        pytest.skip("torch is not installed")
    one = torch.ones(2, dtype=torch.bfloat16, requires_grad=True)
    assert absorbed(one, torch.tensor([2.0**-8, 2.0**-7], dtype=torch.bfloat16)).tolist() == [
        True,
        False,
    ]
    assert float(ulp_error(torch.tensor([1 + 2.0**-7], dtype=torch.bfloat16), 1.0)[0]) == 1.0


# --- 2. logits of any shape (..., C) -----------------------------------------------------


def _known_collapse(shape, c, seed=0):
    """Logits of shape ``shape + (c,)`` whose rows either collapse in float32 whatever the
    order (the others 40 below the top: (c - 1) e^-40 < 2**-25) or never do (1 below), and
    the mask saying which: a reference by construction, not by computation."""
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < 0.5
    gap = np.where(mask, 40.0, 1.0)[..., None]
    z = -gap * np.ones((*shape, c))
    top = rng.integers(0, c, shape)
    np.put_along_axis(z, top[..., None], 0.0, axis=-1)
    return z.astype(np.float32), top, mask


@pytest.mark.parametrize("shape", [(), (5,), (2, 3), (2, 3, 4)])
def test_logits_of_any_shape_keep_their_leading_shape(shape):
    z, top, mask = _known_collapse(shape, 11)
    assert sc_fraction(z) == np.count_nonzero(mask) / mask.size
    rep = audit_cross_entropy(z, top)
    for name in (
        "loss",
        "loss_exact",
        "collapsed",
        "collapsed_exact",
        "target_grad",
        "used_mpmath",
    ):
        assert getattr(rep, name).shape == shape, name
    np.testing.assert_array_equal(rep.collapsed, mask)
    np.testing.assert_array_equal(rep.zero_loss, mask)  # collapsed at the top: loss 0
    assert len(rep) == mask.size
    assert rep.summary()["sc_fraction_measured"] == np.count_nonzero(mask) / mask.size
    g = exact_logit_gradient(z, top)
    assert g.shape == (*shape, 11)
    # off-target entries: e^-gap / (1 + (c - 1) e^-gap), in float64 (well inside its bound)
    e = np.exp(-np.where(mask, 40.0, 1.0))
    off = np.take_along_axis(g, ((top + 1) % 11)[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(off, e / (1 + 10 * e), rtol=1e-13)


def test_labels_must_have_the_leading_shape():
    z = np.zeros((2, 3, 4), dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"labels must have shape \(2, 3\) .* \(2, 3, 4\), got \(6,\)"
    ):
        audit_cross_entropy(z, np.zeros(6, dtype=int))
    y = np.zeros((2, 3), dtype=int)
    y[1, 2] = 4
    with pytest.raises(ValueError, match=r"labels\[1, 2\]: 4 is out of range"):
        audit_cross_entropy(z, y)
    with pytest.raises(ValueError, match="class axis"):
        sc_fraction(np.float32(1.0))


# --- 3. streaming in row blocks -----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_results_do_not_depend_on_the_block_size(dtype):
    z, top, _ = _known_collapse((3, 7), 300, seed=1)
    rng = np.random.default_rng(2)
    z = (z + rng.standard_normal(z.shape).astype(np.float32) * 0.5).astype(
        BF16 if dtype == "bfloat16" else np.float32
    )
    whole = audit_cross_entropy(z, top, block_rows=21)  # one block: no streaming
    assert 0 < whole.summary()["sc_fraction_measured"] < 1  # both kinds of rows
    grad = exact_logit_gradient(z, top, block_rows=21)
    for rows in (1, 4, 20, None):
        rep = audit_cross_entropy(z, top, block_rows=rows)
        for name, v in vars(whole).items():
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(getattr(rep, name), v, err_msg=name)
        assert sc_fraction(z, block_rows=rows) == whole.summary()["sc_fraction_measured"]
        np.testing.assert_array_equal(exact_logit_gradient(z, top, block_rows=rows), grad)
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="block_rows must be a positive integer"):
            sc_fraction(z, block_rows=bad)


def _peak_bytes(fn, *args, **kw) -> int:
    tracemalloc.start()
    try:
        fn(*args, **kw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_streaming_keeps_peak_memory_below_the_documented_bound(dtype):
    # docs/interop.md: peak <= 12 * block_rows * C * 8 bytes + 1 KiB per row + 1 MiB (plus
    # the (..., C) float64 result of exact_logit_gradient). The bound is per block, so a
    # whole-array audit of the same input must exceed it: the test can fail.
    n, c, rows = 2048, 512, 32
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((n, c)) * 8).astype(BF16 if dtype == "bfloat16" else np.float64)
    y = rng.integers(0, c, n)
    bound = 12 * rows * c * 8 + 1024 * n + 2**20
    assert _peak_bytes(sc_fraction, z, block_rows=rows) <= bound
    assert _peak_bytes(audit_cross_entropy, z, y, block_rows=rows) <= bound
    assert _peak_bytes(exact_logit_gradient, z, y, block_rows=rows) <= bound + n * c * 8
    assert _peak_bytes(audit_cross_entropy, z, y, block_rows=n) > 4 * bound
