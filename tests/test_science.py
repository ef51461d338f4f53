"""The paper's phenomena at sizes that run in seconds.

Thresholds leave room for seeds: each was set well inside the range measured over seeds
0-2 (numbers in the comments); the paper-size runs are reported in docs/reproduction.md.
"""

import pytest

from numstab.run import TrainConfig, summarize, train

pytestmark = pytest.mark.slow

# The paper's modular-addition setup (p = 113, f = 0.4, bias-free 200-200 MLP, AdamW
# betas (0.9, 0.99), eps 1e-25, no weight decay, softmax cross-entropy, float32).
PAPER = TrainConfig(p=113, hidden=(200, 200), train_fraction=0.4, log_every=25)


def first_step(log, metric, split, pred):
    s, v = log.series(metric, split=split)
    hits = [int(t) for t, x in zip(s, v, strict=True) if pred(x)]
    return hits[0] if hits else None


def test_perp_adamw_generalizes_without_delay():
    """⊥AdamW (per-tensor, the authors' variant) reaches test accuracy >= 0.9 within 300 steps
    (measured: >= 0.93 by step 100-125 on seeds 0-2)."""
    run = train(PAPER.replace(perp_grad="tensor", lr=0.01, steps=300))
    step = first_step(run.log, "accuracy", "test", lambda a: a >= 0.9)
    assert step is not None and step <= 300


def test_plain_adamw_memorizes_without_generalizing():
    """AdamW at lr 0.005 fits the training set but stays below 0.05 test accuracy through
    500 steps (measured: test accuracy <= 0.003 throughout)."""
    run = train(PAPER.replace(lr=0.005, steps=500, log_every=50))
    train_acc = run.log.series("accuracy", split="train")[1]
    test_acc = run.log.series("accuracy", split="test")[1]
    assert train_acc[-1] == 1.0
    assert max(test_acc[1:]) < 0.05


def test_collapse_comes_earlier_in_narrower_formats():
    """In an overfitting run (p = 31, logit multiplier 8) the SC fraction rises first in
    float16, then float32, then float64 (measured onsets 15, 20, 30)."""
    base = TrainConfig(p=31, hidden=(64, 64), lr=0.05, alpha=8.0, steps=60, log_every=5)
    onset = {}
    curves = {}
    for dtype in ("float16", "float32", "float64"):
        run = train(base.replace(dtype=dtype))
        onset[dtype] = summarize(run.log, "run")["sc_onset_step"]
        curves[dtype] = run.log.series("sc_fraction", split="train")[1]
    assert onset["float16"] is not None and onset["float32"] is not None
    assert onset["float64"] is None or onset["float32"] < onset["float64"]
    assert onset["float16"] < onset["float32"]
    # At every logged step the narrower format has at least as much collapse.
    assert all(a >= b >= c for a, b, c in zip(curves["float16"], curves["float32"],
                                              curves["float64"], strict=True))
