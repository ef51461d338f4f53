"""Arrays of other frameworks in the audit: intake, shapes, streaming, framework orders.

The references are independent of the code under test: values compared with the framework's
own float64 conversion of the same tensor, memory sharing checked with the framework's own
pointer, bfloat16 bits compared with ``ml_dtypes``' rounding of the exact values.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from numstab.audit import absorbed, audit_cross_entropy, sc_fraction, ulp_error
from numstab.interop import as_numpy, format_arg

try:
    import torch
except ImportError:  # optional: the test extra installs it
    torch = None
try:
    import jax
    import jax.numpy as jnp
except ImportError:  # optional: not in any extra
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
