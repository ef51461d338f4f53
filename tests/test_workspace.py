"""numstab.workspace: arrays are reused only when nothing refers to them, and reuse never
changes a result."""

import numpy as np
import pytest

from numstab import workspace
from numstab.run import Run, TrainConfig

SHAPE = (300, 200)  # 240 kB of float32: above workspace.MIN_BYTES


def test_a_held_array_is_never_handed_out_again():
    ws = workspace.Workspace()
    a = ws.empty(SHAPE, np.float32)
    b = ws.empty(SHAPE, np.float32)
    assert a is not b  # a is still referenced here
    view = a[:10]
    del a
    c = ws.empty(SHAPE, np.float32)
    assert c is not view.base  # a view keeps its base held
    assert c is not b
    del view, c
    d = ws.empty(SHAPE, np.float32)
    e = ws.empty(SHAPE, np.float32)
    assert d is not e and d is not b and e is not b


def test_a_released_array_is_reused():
    ws = workspace.Workspace()
    a = ws.empty(SHAPE, np.float32)
    addr = a.__array_interface__["data"][0]
    del a
    b = ws.empty(SHAPE, np.float32)
    assert b.__array_interface__["data"][0] == addr
    assert ws.empty(SHAPE, np.float64).dtype == np.float64  # another key, another array


def test_the_pool_is_bounded():
    ws = workspace.Workspace()
    held = [ws.empty(SHAPE, np.float32) for _ in range(workspace.MAX_PER_KEY + 3)]
    assert len({id(a) for a in held}) == len(held)
    assert ws.nbytes == workspace.MAX_PER_KEY * held[0].nbytes


def test_outside_a_workspace_and_for_small_arrays_allocation_is_plain():
    a = workspace.empty(SHAPE, np.float32)
    addr = a.__array_interface__["data"][0]
    del a
    with workspace.using(workspace.Workspace()):
        small = workspace.empty((4,), np.float32)
        assert workspace.empty((4,), np.float32) is not small
    assert workspace.empty(SHAPE, np.float32).flags.owndata
    assert isinstance(addr, int)


@pytest.mark.parametrize("fn", [np.add, np.subtract, np.multiply, np.true_divide, np.maximum])
def test_ufunc_gives_the_operators_bits(fn):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(SHAPE) * 10.0 ** rng.integers(-45, 38, SHAPE)).astype(np.float32)
    y = (rng.standard_normal(SHAPE) * 10.0 ** rng.integers(-45, 38, SHAPE)).astype(np.float32)
    x.flat[:6] = [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45]
    ref = {
        np.add: lambda: x + y,
        np.subtract: lambda: x - y,
        np.multiply: lambda: x * y,
        np.true_divide: lambda: x / y,
        np.maximum: lambda: np.maximum(x, y),  # NumPy's own, allocating its result
    }[fn]
    with np.errstate(all="ignore"), workspace.using(workspace.Workspace()):
        got = workspace.ufunc(fn, x, y)
        got_scalar = workspace.ufunc(fn, x, 0.5)
        want = ref()
    assert got.dtype == np.float32 and got_scalar.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_a_run_never_overwrites_arrays_a_caller_holds():
    run = Run(TrainConfig(steps=3))
    kept = []

    def inspect(run, ev, grads):
        kept.append((ev.logits, ev.logits.copy(), ev.dz, ev.dz.copy()))

    for _ in range(3):
        run.advance(log=False, inspect=inspect)
    for logits, logits0, dz, dz0 in kept:
        assert np.array_equal(logits, logits0) and np.array_equal(dz, dz0)
    assert kept[0][0] is not kept[1][0]
    assert run.workspace.nbytes > 0


def test_clear_lets_the_kept_arrays_go():
    ws = workspace.Workspace()
    a = ws.empty(SHAPE, np.float32)
    del a
    assert ws.nbytes > 0
    ws.clear()
    assert ws.nbytes == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.longdouble])
def test_metrics_float64_copies_from_a_workspace_give_the_plain_values(dtype):
    """``numstab.metrics`` takes its float64 (longdouble) copies from the active workspace:
    the norms and cosines are those of ``astype`` copies made outside one (the reference:
    ``numpy.dot`` of fresh float64 arrays), bit for bit, call after call (the copies are
    reused, never shared between the two operands of one product)."""
    from numstab.metrics import param_norms_and_cosines

    rng = np.random.default_rng(5)
    shapes = {"w1": (130, 140), "w2": (90, 200)}  # above MIN_BYTES once in float64
    a = {k: (rng.standard_normal(s) * 50).astype(dtype) for k, s in shapes.items()}
    b = {k: (rng.standard_normal(s) * 50).astype(dtype) for k, s in shapes.items()}
    wide = np.longdouble if dtype == np.longdouble else np.float64
    for k in shapes:
        x, y = a[k].astype(wide).ravel(), b[k].astype(wide).ravel()
        want = (
            float(np.sqrt(x @ x)),
            float(np.sqrt(y @ y)),
            float(x @ y) / np.sqrt(float(x @ x) * float(y @ y)),
        )
        ws = workspace.Workspace()
        with workspace.using(ws):
            for _ in range(3):
                na, nb, cos = param_norms_and_cosines(a, b)
                assert (na[k], nb[k], cos[k]) == want
        assert ws.nbytes > 0  # the copies came from the workspace
