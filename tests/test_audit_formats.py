"""Which format an audit answers in, and how it reads its arguments.

1. **The array's own format is the default.** ``sc_fraction(z16)`` on a float16 array used to
   answer in float32 (0.0 where float16 gives 0.098): every audit that takes a format now
   defaults to the format of its array (float16, ml_dtypes bfloat16, float32, float64,
   longdouble; torch tensors too), float64 for lists of Python floats and float32 only for
   integer / bool input, which has no format of its own.
2. **Byte order is not a format**: big-endian ``>f2``, ``>f4``, ``>f8`` arrays are read as
   their values.
3. **Every refusal names its argument** (and the element, for a bad entry of a list), and
   nothing but ValueError / TypeError escapes.

References are independent of numstab's summation code: a 2-class row ``[0, -g]`` collapses
when ``fl(1 + fl(e^-g)) == 1`` in the format (every order adds the same two terms), computed
here with NumPy / ml_dtypes scalars of the format (+ is correctly rounded for all of them)
and ``e^-g`` correctly rounded from mpmath; exact gradients come from :mod:`numstab.exact`.
"""

from __future__ import annotations

import math
import re
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from numstab import exact
from numstab import testing as nt
from numstab.audit import (
    absorbed,
    audit_cross_entropy,
    exact_logit_gradient,
    nlm_cosine,
    sc_fraction,
    sc_gap_window,
    ulp_error,
)
from numstab.precision import available_formats, get_format

HAS_LD = "longdouble" in available_formats()
FORMATS = list(available_formats())
NATIVE = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "longdouble": np.dtype(np.longdouble),
}
_BASE = settings().max_examples
_HC = [HealthCheck.too_slow, HealthCheck.filter_too_much]
SOME = settings(max_examples=max(10, _BASE // 2), deadline=None, suppress_health_check=_HC)


# --- the reference: a 2-class row summed in the format itself ---------------------------------


def threshold_gap(fmt) -> float:
    """The gap ``g*`` with ``e^-g* = u(1 + 2**-p)``: ``fl(e^-g) <= u`` iff ``g >= g*``."""
    f = get_format(fmt)
    return f.precision * math.log(2) - math.log1p(f.unit_roundoff)


def own_dtype_collapse(g, fmt):
    """``fl(1 + fl(e^-g)) == 1`` with scalars of the format, ``e^-g`` correctly rounded.

    None when ``e^-g`` lies within a relative ``2**-18`` of the rounding boundary
    ``u(1 + 2**-p)``: there an ``exp`` within a few ulps of float32 (what numstab's 16- and
    32-bit paths use) may round to either side, and the row says nothing about the format.
    """
    f = get_format(fmt)
    ctx = exact.context(256)
    t = ctx.exp(-exact.to_exact(g))
    edge = ctx.mpf(f.unit_roundoff) * (1 + ctx.ldexp(1, -f.precision))
    if abs(t / edge - 1) <= ctx.ldexp(1, -18):
        return None
    T = NATIVE[fmt].type
    one = T(1)
    return bool(one + exact.round_exact(t, fmt) == one)


def two_class_rows(gaps, fmt):
    """Rows ``[0, -g]`` in the format's own dtype (the gaps must be representable)."""
    z = np.zeros((len(gaps), 2), dtype=NATIVE[fmt])
    z[:, 1] = -np.asarray(gaps, dtype=np.float64 if fmt != "longdouble" else np.longdouble)
    return z


@st.composite
def gaps_around(draw, fmt, n_max=6):
    """Gaps on the format's grid within 4 of the format's threshold (where float32's verdict,
    the old default, is the wrong one for every other format) or anywhere in [0, 60]."""
    g0 = threshold_gap(fmt)
    el = st.one_of(st.floats(g0 - 4, g0 + 4), st.floats(0, 60))
    gs = draw(st.lists(el, min_size=1, max_size=n_max))
    T = NATIVE[fmt].type
    return [float(T(g)) for g in gs] if fmt != "longdouble" else [np.longdouble(g) for g in gs]


# --- 1. the array's own format is the default --------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@SOME
@given(data=st.data())
def test_sc_fraction_defaults_to_the_arrays_own_format(fmt, data):
    gaps = data.draw(gaps_around(fmt))
    want = [own_dtype_collapse(g, fmt) for g in gaps]
    assume(all(w is not None for w in want))
    z = two_class_rows(gaps, fmt)
    assert sc_fraction(z) == sum(want) / len(want), (fmt, gaps, want)
    assert sc_fraction(z, dtype=None) == sum(want) / len(want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sc_fraction_of_rows_either_side_of_the_own_threshold(fmt):
    """The regression in one line per format: a row 1 above the format's threshold collapses,
    one 1 below does not, whatever float32 would say (float32 collapses both for float64 and
    longdouble, neither for float16 and bfloat16)."""
    g0 = threshold_gap(fmt)
    gaps = [np.longdouble(g0 + 1), np.longdouble(g0 - 1)] if fmt == "longdouble" else None
    if gaps is None:
        T = NATIVE[fmt].type
        gaps = [float(T(g0 + 1)), float(T(g0 - 1))]
    want = [own_dtype_collapse(g, fmt) for g in gaps]
    assert want == [True, False]
    z = two_class_rows(gaps, fmt)
    assert [sc_fraction(z[i : i + 1]) for i in range(2)] == [1.0, 0.0]


def test_python_floats_are_float64_and_integers_float32():
    """A list of Python floats holds float64 values; integers have no format (float32)."""
    assert own_dtype_collapse(30.0, "float64") is False
    assert own_dtype_collapse(30.0, "float32") is True
    assert sc_fraction([[0.0, -30.0]]) == 0.0  # float64: e^-30 survives 1 + e^-30
    assert sc_fraction(np.array([[0, -30]])) == 1.0  # float32: absorbed
    assert sc_fraction([[0, -30]]) == 1.0  # Python ints: an integer array
    assert audit_cross_entropy([[0.0, -30.0]], [0]).dtype == "float64"
    assert audit_cross_entropy(np.array([[0, -30]]), [0]).dtype == "float32"


@pytest.mark.parametrize("fmt", FORMATS)
def test_audit_cross_entropy_defaults_to_the_arrays_own_format(fmt):
    g0 = threshold_gap(fmt)
    T = NATIVE[fmt].type
    gaps = [T(g0 + 1), T(g0 - 1), T(2)]
    z = two_class_rows(gaps, fmt)
    y = np.array([0, 0, 1])
    rep = audit_cross_entropy(z, y)
    assert rep.dtype == fmt
    want = [own_dtype_collapse(g, fmt) for g in gaps]
    assert rep.collapsed.tolist() == want == [True, False, False]
    # The computed loss of a collapsed row with its label on the max is exactly 0 in its own
    # format; the exact verdict (tail e^-g <= u, decided in mpmath) agrees on these rows.
    assert rep.loss[0] == 0 and rep.zero_target_grad[0]
    tails = exact.tail_sum(z)
    u = exact.context().mpf(get_format(fmt).unit_roundoff)
    assert rep.collapsed_exact.tolist() == [bool(t <= u) for t in tails]


def test_exact_logit_gradient_keeps_float64_logits():
    """float64 logits are no longer rounded to float32 first (a relative change ~1e-8 of
    the gradient, far above the documented bound)."""
    z = np.array([[0.1, 0.2, -0.3], [1e-3, 7.77, -2.5]])
    y = np.array([2, 0])
    g = exact_logit_gradient(z, y)
    ref = exact.round_exact(exact.cross_entropy_grad(z, y), "float64").astype(np.float64)
    d = np.abs(z - z.max(axis=1, keepdims=True)).max()
    bound = (z.shape[1] + d + 2**12) * 2.0**-52  # the documented relative bound
    np.testing.assert_allclose(g, ref, rtol=bound, atol=0)
    # Rounded to float32 (the old default), the logits give a gradient outside that bound.
    g32 = exact.round_exact(exact.cross_entropy_grad(z.astype(np.float32), y), "float64")
    assert np.max(np.abs(g32.astype(np.float64) - ref) / np.abs(ref)) > 1e3 * bound


@pytest.mark.skipif(not HAS_LD, reason="longdouble is not x87 80-bit here")
def test_exact_logit_gradient_keeps_longdouble_logits():
    """longdouble logits (1/3, 2/3, -1/7 to 64 bits) are no longer rounded to float32."""
    one = np.longdouble(1)
    z = np.array([[one / 3, 2 * one / 3, -one / 7]], dtype=np.longdouble)
    y = np.array([1])
    g = exact_logit_gradient(z, y)
    ref = exact.round_exact(exact.cross_entropy_grad(z, y), "float64").astype(np.float64)
    bound = (3 + 1 + 2**12) * 2.0**-52  # the documented relative bound (max gap < 1)
    np.testing.assert_allclose(g, ref, rtol=bound, atol=0)
    g32 = exact.round_exact(exact.cross_entropy_grad(z.astype(np.float32), y), "float64")
    assert np.max(np.abs(g32.astype(np.float64) - ref) / np.abs(ref)) > 1e3 * bound


@pytest.mark.parametrize("fmt", ["float16", "bfloat16", "float32"])
def test_ulp_error_defaults_to_the_computed_format(fmt):
    f = get_format(fmt)
    T = NATIVE[fmt].type
    c = np.array([1 + f.eps, 1 + 3 * f.eps, 1.0], dtype=NATIVE[fmt])
    got = ulp_error(c, [1.0, 1.0, 1.0])  # the exact value 1: ulp(1) = eps of the format
    assert got.tolist() == [1.0, 3.0, 0.0]
    assert ulp_error(T(1 + f.eps), 1.0) == 1.0


def test_ulp_error_of_python_floats_is_in_float64():
    assert ulp_error(1 + 2.0**-52, 1.0) == 1.0
    assert ulp_error([0.1], [0.1]).tolist() == [0.0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_absorbed_defaults_to_the_operands_format(fmt):
    f = get_format(fmt)
    T = NATIVE[fmt].type
    one, u, two_u = T(1), T(f.unit_roundoff), T(2 * f.unit_roundoff)
    # The reference: the sum in the format's own scalar arithmetic.
    assert T(one + u) == one and T(one + two_u) != one
    assert absorbed(np.array([one, one]), np.array([u, two_u])).tolist() == [True, False]
    assert bool(absorbed(one, u)) and not bool(absorbed(one, two_u))
    # A Python float takes the array's format (as in NumPy's promotion of scalars).
    assert bool(absorbed(np.array([one]), f.unit_roundoff)[0])


def test_absorbed_python_floats_and_mixed_formats():
    assert not absorbed(1.0, 2.0**-24)  # float64: 1 + 2**-24 is not 1
    assert absorbed(1.0, 2.0**-53)
    with pytest.raises(ValueError, match=r"fmt.*a is float16.*b is float32.*pass fmt"):
        absorbed(np.float16(1), np.float32(2.0**-11))
    assert absorbed(np.float16(1), np.float32(2.0**-11), "float16")


def test_sc_gap_window_still_needs_a_format():
    with pytest.raises(ValueError, match=r"dtype.*None"):
        sc_gap_window(None, 3)


@pytest.mark.skipif(not HAS_LD, reason="longdouble is not x87 80-bit here")
@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_longdouble_input_to_16_bit_formats_is_rounded_once(fmt):
    """x = 1 + 2**-p + 2**-60 (64 bits) rounds correctly up to 1 + 2**(1-p); through float64
    it would first become the tie 1 + 2**-p and then 1 (ties to even). These calls used to
    raise TypeError ("rounding longdouble input to float16 is not supported")."""
    f = get_format(fmt)
    one = np.longdouble(1)
    x = one + np.ldexp(one, -f.precision) + np.ldexp(one, -60)
    up = 1 + 2.0 ** (1 - f.precision)  # the correct rounding, by hand
    z = np.array([[x, 0]], dtype=np.longdouble)
    want = audit_cross_entropy(np.array([[up, 0.0]]), [1], dtype=fmt)
    got = audit_cross_entropy(z, [1], dtype=fmt)
    assert got.loss_exact.tolist() == want.loss_exact.tolist()
    assert got.loss.tolist() == want.loss.tolist()
    g = exact_logit_gradient(z, [1], dtype=fmt)
    assert g.tolist() == exact_logit_gradient(np.array([[up, 0.0]]), [1], dtype=fmt).tolist()
    ref = exact.round_exact(exact.cross_entropy_grad(np.array([[up, 0.0]]), [1]), "float64")
    np.testing.assert_allclose(g, ref.astype(float), rtol=(2 + 1 + 2**12) * 2.0**-52)
    assert sc_fraction(z, dtype=fmt) == 0.0
    # fl(up + 2**-p) is the tie between up and up + 2**(1-p): even is the latter, so 2**-p
    # is not absorbed; from the wrongly rounded 1 it would be.
    b = np.array([np.ldexp(one, -f.precision)])
    assert absorbed(np.array([x]), b, fmt).tolist() == [False]
    assert absorbed(np.array([one]), b, fmt).tolist() == [True]


def test_empty_label_list_for_no_rows():
    assert len(audit_cross_entropy(np.zeros((0, 3)), [])) == 0
    assert exact_logit_gradient(np.zeros((0, 3)), []).shape == (0, 3)


# --- 2. byte order ------------------------------------------------------------------------------


BIG_ENDIAN = ["float16", "float32", "float64"] + (["longdouble"] if HAS_LD else [])


@pytest.mark.parametrize("fmt", BIG_ENDIAN)
def test_big_endian_arrays_are_their_values(fmt):
    g0 = threshold_gap(fmt)
    T = NATIVE[fmt].type
    gaps = [T(g0 + 1), T(g0 - 1), T(0.5)]
    native = two_class_rows(gaps, fmt)
    big = native.astype(native.dtype.newbyteorder(">"))
    assert not big.dtype.isnative and (big == native).all()
    y = np.array([0, 1, 1], dtype=">i8")
    want = [own_dtype_collapse(g, fmt) for g in gaps]
    assert sc_fraction(big) == sum(want) / 3
    assert sc_fraction(big, dtype=fmt) == sum(want) / 3
    rep = audit_cross_entropy(big, y)
    assert rep.dtype == fmt and rep.collapsed.tolist() == want
    ref = exact.round_exact(exact.cross_entropy_grad(native, y.astype(np.int64)), "float64")
    bound = (2 + 40 + 2**12) * 2.0**-52
    np.testing.assert_allclose(exact_logit_gradient(big, y), ref.astype(float), rtol=bound)
    # ulp_error, absorbed and nlm_cosine read the values too.
    f = get_format(fmt)
    c = (np.ones(1, dtype=NATIVE[fmt]) + T(f.eps)).astype(NATIVE[fmt].newbyteorder(">"))
    assert ulp_error(c, np.array([1.0], dtype=">f8")).tolist() == [1.0]
    assert ulp_error(c, [1.0], NATIVE[fmt].newbyteorder(">")).tolist() == [1.0]
    half_u = np.array([f.unit_roundoff], dtype=NATIVE[fmt]).astype(c.dtype)
    assert absorbed(np.ones(1, c.dtype), half_u).tolist() == [True]
    cos = nlm_cosine({"w": big}, {"w": -big})
    assert cos["w"] == pytest.approx(1.0, abs=4 * 2.0**-52)


# --- 3. torch tensors (optional) -----------------------------------------------------------


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


torch = _torch()
needs_torch = pytest.mark.skipif(
    torch is None, reason="torch is not installed (the test extra installs it)"
)
TORCH_FORMATS = ["float16", "bfloat16", "float32", "float64"]


@needs_torch
@pytest.mark.parametrize("fmt", TORCH_FORMATS)
def test_torch_tensors_are_audited_in_their_own_format(fmt):
    g0 = threshold_gap(fmt)
    T = NATIVE[fmt].type
    gaps = [T(g0 + 1.5), T(g0 - 1.5), T(g0 + 5), T(1)]
    tdt = getattr(torch, fmt)
    t = torch.tensor([[0.0, -float(g)] for g in gaps], dtype=tdt)
    # torch's own verdict, in its own dtype (2 terms: every order adds the same pair).
    own = (torch.exp(t - t.max(dim=1, keepdim=True).values).sum(dim=1) == 1).tolist()
    want = [own_dtype_collapse(g, fmt) for g in gaps]
    assert own == want
    assert sc_fraction(t) == sum(want) / len(want)
    leaf = t.clone().requires_grad_(True)  # a tensor that needs its graph detached
    assert sc_fraction(leaf) == sum(want) / len(want)
    y = torch.tensor([0, 0, 0, 1])
    rep = audit_cross_entropy(torch.nn.Parameter(t.clone()), y)
    assert rep.dtype == fmt and rep.collapsed.tolist() == want
    zq = np.array([[0.0, -float(g)] for g in gaps])  # the tensor's values, exactly
    ref = exact.round_exact(exact.cross_entropy_grad(zq, y.numpy()), "float64")
    bound = (2 + 40 + 2**12) * 2.0**-52
    np.testing.assert_allclose(exact_logit_gradient(t, y), ref.astype(float), rtol=bound)
    f = get_format(fmt)
    c = torch.tensor([1 + f.eps], dtype=tdt)
    assert ulp_error(c, [1.0]).tolist() == [1.0]
    assert absorbed(torch.ones(1, dtype=tdt), torch.tensor([f.unit_roundoff], dtype=tdt))[0]
    assert nlm_cosine({"w": t}, {"w": -t})["w"] == pytest.approx(1.0, abs=4 * 2.0**-52)


@needs_torch
def test_torch_dtypes_are_format_names():
    z = np.array([[0.0, -10.0]], dtype=np.float32)
    assert sc_fraction(z, dtype=torch.float16) == 1.0
    assert sc_fraction(z, dtype=torch.bfloat16) == 1.0
    assert sc_fraction(z, dtype=torch.float32) == 0.0
    with pytest.raises(ValueError, match=r"dtype.*torch.int8"):
        sc_fraction(z, dtype=torch.int8)


# --- 4. every refusal names its argument ------------------------------------------------------


BAD_ELEMENTS = [None, "x", "1.0", 1j, object(), b"0", {}, (1.0, 2.0)]


def _bad(el):
    """Pattern for the element's repr in a message."""
    r = repr(el)
    return re.escape(r[:40])


@st.composite
def poisoned(draw, shape, bad=st.sampled_from(BAD_ELEMENTS)):  # noqa: B008
    """A nested list of floats (drawn from numstab.testing.logits) with one bad entry; returns
    the list, the index of the bad entry and the entry."""
    z = draw(nt.logits(n_rows=shape[0], n_classes=shape[1], dtype="float64"))
    rows = z.tolist()
    i = draw(st.integers(0, shape[0] - 1))
    j = draw(st.integers(0, shape[1] - 1))
    el = draw(bad)
    rows[i][j] = el
    return rows, (i, j), el


def _named(exc_info, name, index=None, el=None):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg  # one line
    assert msg.startswith(name), msg
    if index is not None:
        idx = ", ".join(map(str, index))
        assert f"{name}[{idx}]" in msg, msg
        if not isinstance(el, tuple):  # a tuple entry makes the list ragged: named as such
            assert re.search(_bad(el), msg), msg


@SOME
@given(p=poisoned((3, 4)))
@example(p=([[0.0, 1.0], [0.0, None]], (1, 1), None))
def test_bad_logit_entries_are_named(p):
    rows, (i, j), el = p
    y = [0, 0, 0][: len(rows)]
    for fn, args in [
        (sc_fraction, (rows,)),
        (audit_cross_entropy, (rows, y)),
        (exact_logit_gradient, (rows, y)),
    ]:
        with pytest.raises((TypeError, ValueError)) as info:
            fn(*args)
        if isinstance(el, tuple):  # [.., (1.0, 2.0), ..] makes the rows ragged
            assert re.match(r"logits\b.*(ragged|sequence)", str(info.value)), info.value
        else:
            _named(info, "logits", (i, j), el)


@SOME
@given(p=poisoned((1, 5)), which=st.sampled_from(["computed", "exact_values", "a", "b"]))
@example(p=([[1.0, 1.0, 1.0, None]], (0, 3), None), which="exact_values")
def test_bad_elementwise_entries_are_named(p, which):
    rows, (_, j), el = p
    bad = rows[0]
    good = [1.0] * len(bad)
    fn, args = {
        "computed": (ulp_error, (bad, good, "float32")),
        "exact_values": (ulp_error, (good, bad, "float32")),
        "a": (absorbed, (bad, good, "float32")),
        "b": (absorbed, (good, bad, "float32")),
    }[which]
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args)
    if isinstance(el, tuple):
        assert re.match(rf"{which}\b.*(ragged|sequence)", str(info.value)), info.value
    else:
        _named(info, which, (j,), el)


def test_exact_values_object_arrays_name_the_bad_entry():
    ctx = exact.context()
    e = np.array([ctx.mpf(1), 1.0, 2, None], dtype=object)
    with pytest.raises(TypeError, match=r"^exact_values\[3\]: None is not a real number"):
        ulp_error(np.ones(4), e, "float32")
    e[3] = ctx.mpc(1, 1)
    with pytest.raises(TypeError, match=r"^exact_values\[3\]: mpc"):
        ulp_error(np.ones(4), e, "float32")
    e[3] = np.float16(1)  # a NumPy real scalar is a number
    # |1 - 2| in float32 ulps of the exact value 2 (2**-22): 2**22.
    assert ulp_error(np.ones(4), e, "float32").tolist() == [0.0, 0.0, 2.0**22, 0.0]


@pytest.mark.parametrize("el", [None, "x", 1j, object()])
def test_bad_label_entries_are_named(el):
    z = np.zeros((3, 2))
    for fn in (audit_cross_entropy, exact_logit_gradient):
        with pytest.raises((TypeError, ValueError)) as info:
            fn(z, [0, el, 1])
        _named(info, "labels", (1,), el)


@pytest.mark.parametrize("el", [None, "x", 1j])
def test_bad_tensor_entries_are_named(el):
    with pytest.raises(TypeError) as info:
        nlm_cosine({"w": [1.0, el]}, {"w": [1.0, 2.0]})
    _named(info, "params['w']", (1,), el)
    with pytest.raises(TypeError) as info:
        nlm_cosine({"w": [1.0, 2.0]}, {"w": [[1.0, el]]})
    _named(info, "grads['w']", (0, 1), el)
    with pytest.raises(ValueError, match=r"^params\['w'\].*(ragged|sequence)"):
        nlm_cosine({"w": [[1.0], [1.0, 2.0]]}, {"w": [1.0, 2.0]})


# Arbitrary values for any argument: each call returns or raises ValueError / TypeError whose
# message starts with the argument's name. Nothing else may escape.
HOSTILE = st.one_of(
    st.none(),
    st.text(max_size=5),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.complex_numbers(max_magnitude=1e3),
    st.lists(st.one_of(st.none(), st.floats(), st.text(max_size=2)), max_size=3),
    st.lists(st.lists(st.floats(-5, 5), max_size=3), max_size=3),
    st.sampled_from(
        [
            np.zeros((2, 2), dtype=np.complex64),
            np.array([["a", "b"]]),
            np.zeros((2, 3), dtype=ml_dtypes.float8_e4m3fn),
            np.zeros(2, dtype="V4"),
            np.zeros((2, 3), dtype=">f4"),
            np.arange(6).reshape(2, 3),
            np.array([1, 2**70], dtype=object),
            np.dtype(">f8"),
            {"a": 1},
            object(),
            [[0.0, 1.0], [0.0]],
        ]
    ),
)

GOOD = np.array([[0.0, -1.0, -20.0], [1.0, 0.0, 0.0]], dtype=np.float32)
CALLS = {
    "sc_fraction": (sc_fraction, {"logits": GOOD}, ["dtype", "kind", "order", "eps"]),
    "audit_cross_entropy": (
        audit_cross_entropy,
        {"logits": GOOD, "labels": np.array([0, 1])},
        ["dtype", "kind", "order", "eps", "method"],
    ),
    "exact_logit_gradient": (
        exact_logit_gradient,
        {"logits": GOOD, "labels": np.array([0, 1])},
        ["dtype", "kind", "eps"],
    ),
    "ulp_error": (
        ulp_error,
        {"computed": GOOD, "exact_values": GOOD.astype(np.float64), "fmt": "float32"},
        [],
    ),
    "absorbed": (absorbed, {"a": GOOD, "b": GOOD, "fmt": "float32"}, []),
    "sc_gap_window": (sc_gap_window, {"dtype": "float32", "n_classes": 3}, []),
}
ARGS = [(fn, arg) for fn, (_, pos, kw) in CALLS.items() for arg in [*pos, *kw]]


def names(arg, msg) -> bool:
    """The message is about ``arg``: "eps must ...", "labels[1]: ...", "dtype: ...",
    "unknown kind ...", the second operand of "a (shape ...) and b (shape ...) ...", or the
    other side of "labels must have shape (2,) to match the logits" and of "labels[1]: 1 is
    out of range for logits of 1 classes"."""
    a = re.escape(arg)
    return bool(
        re.match(rf"{a}[\[: ]", msg)
        or re.match(rf"unknown {a} ", msg)
        or re.search(rf" and {a} \(shape", msg)
        or re.search(rf"to match the {a}\b", msg)
        or re.search(rf"for {a} of ", msg)  # a label out of range for the logits' width
    )


def _refusal(func, **kwargs) -> str | None:
    """The message of the TypeError/ValueError ``func(**kwargs)`` refuses with (warnings are
    errors too), or None if it accepts the input."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            func(**kwargs)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(("fn", "arg"), ARGS, ids=[f"{f}-{a}" for f, a in ARGS])
@SOME
@given(value=HOSTILE)
def test_every_refusal_names_its_argument(fn, arg, value):
    func, base, _ = CALLS[fn]
    msg = _refusal(func, **{**base, arg: value})
    if msg is not None:
        assert "\n" not in msg, msg
        assert names(arg, msg), (arg, msg)


@SOME
@given(key=st.sampled_from(["params", "grads"]), value=HOSTILE)
def test_every_nlm_cosine_refusal_names_its_tensor(key, value):
    good = {"w": np.ones(2)}
    msg = _refusal(nlm_cosine, **{"params": good, "grads": good, key: {"w": value}})
    if msg is not None:
        assert "\n" not in msg, msg
        assert f"{key}['w']" in msg or "shape mismatch for 'w'" in msg, msg
