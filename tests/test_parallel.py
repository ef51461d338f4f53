"""numstab.parallel: elementwise passes split over threads give the same bits at 1 and 2
threads (the correctly rounded exp/log, and a whole training step)."""

import itertools

import numpy as np
import pytest

from numstab import elementary, parallel, workspace
from numstab.run import Run, TrainConfig


def test_map_blocks_covers_the_range_in_order():
    with parallel.using(3):
        parts = parallel.map_blocks(lambda a, b: (a, b), 10_000, 64)
    assert parts[0][0] == 0 and parts[-1][1] == 10_000 and len(parts) == 3
    assert all(p[1] == q[0] and p[1] % 64 == 0 for p, q in itertools.pairwise(parts))
    with parallel.using(2):
        assert parallel.map_blocks(lambda a, b: (a, b), 100, 64) == [(0, 100)]  # too small
    with pytest.raises(ValueError, match="threads must be >= 1"):
        with parallel.using(0):
            pass


@pytest.mark.parametrize("name", ["exp", "log"])
@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16"])
def test_correct_rounding_is_the_same_at_1_and_2_threads(name, fmt):
    rng = np.random.default_rng(3)
    n = 3 * (1 << 16) + 5  # several chunks, a ragged end
    if name == "exp":
        x = rng.uniform(-110, 10, n).astype(np.float32)  # subnormal and overflowing results
    else:
        x = np.abs(rng.standard_normal(n).astype(np.float32)) * np.float32(100)
    x[:3] = [np.nan, -np.inf, 0.0]
    out = {}
    for k in (1, 2):
        with parallel.using(k), workspace.using(workspace.Workspace()):
            out[k] = np.array(elementary.apply(name, x, elementary.get_format(fmt), "correct", np))
    assert np.array_equal(out[1].view(np.uint32), out[2].view(np.uint32))
    # and the 2-thread result is correctly rounded where checked exactly (a sample)
    idx = rng.choice(n, 200, replace=False)
    ref = elementary.exact_round(name, x[idx], fmt)
    same = (out[2][idx] == ref) | (np.isnan(out[2][idx]) & np.isnan(ref))
    assert same.all()


def test_a_run_gives_the_same_bits_at_1_and_2_elementwise_threads():
    params = {}
    for k in (1, 2):
        run = Run(TrainConfig(steps=3), elementwise_threads=k)
        for _ in range(3):
            run.advance(log=False)
        params[k] = run.params
    for name, p in params[1].items():
        assert np.array_equal(p.view(np.uint32), params[2][name].view(np.uint32)), name


def test_blas_limit_caps_numpys_blas_in_the_block_and_restores_it():
    """Inside ``blas_limit(1)`` every BLAS library NumPy loaded runs on one thread (read back
    through threadpoolctl, an independent reader); after the block each has its own count
    again, also when the block raises; a limit above the current count changes nothing."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def counts():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    with threadpool_limits(limits=2, user_api="blas"):
        before = counts()
        assert max(before) == 2
        with parallel.blas_limit(1):
            assert counts() == [1] * len(before)
        assert counts() == before
        with pytest.raises(RuntimeError), parallel.blas_limit(1):
            raise RuntimeError("inside")
        assert counts() == before
        with parallel.blas_limit(8):
            assert counts() == before
