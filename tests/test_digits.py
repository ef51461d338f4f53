"""The digits task (scikit-learn's 8x8 digits, an offline stand-in for MNIST) and scaled
initial weights (the paper's Fig. 14 setting)."""

from __future__ import annotations

import numpy as np
import pytest

from numstab.data import dense_inputs, get_dataset
from numstab.mlp import MLPConfig, init_params
from numstab.precision import quantize
from numstab.run import Run, TrainConfig

sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="the digits task needs it")


def test_digits_is_sklearn_digits_split_once_and_scaled_exactly():
    ref = sklearn_datasets.load_digits()
    d = get_dataset("digits", train_fraction=0.3, seed=4)
    assert (d.n_classes, d.n_inputs, d.encoding) == (10, 64, "pixels")
    assert d.n_train + d.n_test == ref.data.shape[0] == 1797
    assert d.n_train == int(0.3 * 1797)
    x = np.concatenate([d.x_train, d.x_test]).astype(np.float64)
    y = np.concatenate([d.y_train, d.y_test])
    # the same images, every one once: compare as sets of (pixels, label) rows
    have = sorted(map(tuple, np.column_stack([x * 16, y]).tolist()))
    want = sorted(map(tuple, np.column_stack([ref.data, ref.target]).tolist()))
    assert have == want
    assert x.min() == 0 and x.max() == 1  # grey levels 0..16 divided by 16, exactly
    again = get_dataset("digits", train_fraction=0.3, seed=4)
    assert np.array_equal(again.x_train, d.x_train) and np.array_equal(again.y_test, d.y_test)
    other = get_dataset("digits", train_fraction=0.3, seed=5)
    assert not np.array_equal(other.y_train, d.y_train)


def test_pixels_must_lie_in_the_unit_interval():
    assert dense_inputs(np.array([[0.0, 0.5, 1.0]]), "pixels").tolist() == [[0.0, 0.5, 1.0]]
    with pytest.raises(ValueError, match=r"'pixels' inputs must be in \[0, 1\], got 1.5"):
        dense_inputs(np.array([[0.0, 1.5]]), "pixels")


def test_scaled_initial_weights_are_one_rounding_of_the_scaled_draw():
    cfg = MLPConfig(n_inputs=64, n_classes=10, hidden=(16,), bias=True)
    wide = init_params(cfg, 3, "float64")  # the float64 draws themselves
    scaled = init_params(cfg, 3, "float32", scale=100.0)
    for name, w in wide.items():
        # weights: RN32(RN64(w * 100)), which is RN32(w * 100) (53 >= 2*24 + 2 bits); biases
        # are not scaled
        want = quantize(w * 100.0, "float32") if name.startswith("W") else quantize(w, "float32")
        assert np.array_equal(scaled[name], want), name


def test_fig14_setting_collapses_from_the_start():
    # Weights x100 on digits: logits of size ~1e4 make float32 softmax rows collapse at once
    # (the paper's Fig. 14 claim on MNIST); without the scale nothing collapses early.
    base = TrainConfig(task="digits", hidden=(64, 64), steps=0, log_every=1)
    for scale, collapsed in ((100.0, True), (1.0, False)):
        run = Run(base.replace(init_scale=scale))
        frac = float(np.mean(run.collapse(run.evaluate())))
        assert (frac > 0.9) is collapsed, (scale, frac)
