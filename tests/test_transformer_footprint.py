"""The memory estimate of a transformer run bounds the run's measured peak.

``numstab.run.footprint.estimate_run_memory`` sizes a transformer run from its own shapes
(parameters, AdamW state, the activations of the batch at the feed-forward layer). The
reference is the operating system's count: the peak resident memory a short run adds
(Linux's VmHWM, reset before the run, as ``tests/test_sweep.py`` measures the MLP's). The band
is the one the MLP's estimate keeps: at least the measured growth, and at most twice it plus
the fixed overhead term (a bound that is loose by more than that would refuse runs that fit).
"""

from __future__ import annotations

import os

import pytest
from test_sweep import test_the_memory_estimate_bounds_a_real_run as bounds_a_real_run

from numstab.run import TrainConfig
from numstab.run.footprint import estimate_run_memory

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="measures with Linux's /proc/self"
)

TRANSFORMER = {"model": "transformer", "steps": 2}

# Sizes where the activations dominate the fixed overhead: the feed-forward width 2048 over a
# few thousand rows. Measured here (MiB, peak growth / estimate): the paper's float32 run
# (p = 113 from 1) 404 / 488, float64 812 / 937, float16 757 / 864, bfloat16 619 / 864.
CASES = [
    {"residue_start": 1},  # the paper's Fig. 6a run, float32, dropout 0.1
    {"p": 71, "dtype": "float16"},  # rounding emulation's temporaries
    {
        "p": 59,
        "dtype": "float64",
        "dropout": 0.0,
        "norm_placement": "pre",
        "attention": "stablemax",
        "steps": 3,
    },
    {"p": 71, "dtype": "bfloat16", "batch_size": 500, "steps": 3},  # mini-batches
]


@pytest.mark.parametrize("kw", CASES)
def test_the_transformer_estimate_bounds_a_real_run(kw):
    bounds_a_real_run({**TRANSFORMER, **kw})  # the MLP's measurement and band


def test_the_transformer_is_not_sized_as_an_mlp():
    """Its own terms: the parameter count of the authors' model (PyTorch's modules hold
    622 065 parameters for p = 113, d 128, f 2048) and activations that grow with d_ff."""
    c = TrainConfig(model="transformer", residue_start=1)
    fp = estimate_run_memory(c)
    assert fp.params == 3 * 622_065 * 4 and fp.optimizer == 3 * 622_065 * 4
    wider = estimate_run_memory(c.replace(d_ff=4096))
    assert wider.activations > 1.5 * fp.activations  # the f-wide arrays dominate
