"""The activation and gradient roles of the precision policy, checked where they apply.

A tiny dense MLP (2 inputs, one hidden layer of 2, 2 classes) whose weights have few
significand bits, so that every float32 product and sum of the GEMMs is exact: each layer's
result is then one rounding of an exact Fraction, the reference here (an independent Fraction
oracle of the formats' grids, tests/fraction_rounding.py).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from fraction_rounding import round_fraction

from numstab.mlp import MLPConfig, backward, forward
from numstab.precision import PrecisionPolicy, get_format
from numstab.run import TrainConfig
from numstab.sweep import run_id

CONFIG = MLPConfig(n_inputs=2, n_classes=2, hidden=(2,), input_kind="dense")
PARAMS = {  # at most 5 significand bits each: products with 4-bit values are float32-exact
    "W1": np.array([[0.3125, -0.6875], [1.125, 0.4375]], dtype=np.float32),
    "W2": np.array([[0.875, -1.25], [-0.5625, 0.75]], dtype=np.float32),
}
X = np.array([[0.6, 0.9], [-0.35, 1.3]], dtype=np.float32)
DLOGITS = np.array([[0.3, -0.55], [-0.21, 0.17]], dtype=np.float32)


def _mat(a):
    return [[Fraction(float(v)) for v in row] for row in np.asarray(a)]


def _matmul(a, b):
    cols = _transpose(b)
    return [[sum(x * y for x, y in zip(row, col, strict=True)) for col in cols] for row in a]


def _round(a, name):
    fmt = get_format(name)
    return [[round_fraction(v, fmt, fmt.rounding) for v in row] for row in a]


def _transpose(a):
    return [list(r) for r in zip(*a, strict=True)]


def _reference(act: str, grad: str):
    """Forward and backward of the tiny MLP in exact arithmetic, one rounding per result."""
    x = _round(_mat(X), act)  # the dense input is an activation
    h = _round(_matmul(x, _mat(PARAMS["W1"])), act)
    r = [[max(v, Fraction(0)) for v in row] for row in h]
    logits = _round(_matmul(r, _mat(PARAMS["W2"])), act)
    g = _round(_mat(DLOGITS), grad)
    dw2 = _round(_matmul(_transpose(r), g), grad)
    dr = _round(_matmul(g, _transpose(_mat(PARAMS["W2"]))), grad)
    g1 = [[d if hv > 0 else Fraction(0) for d, hv in zip(dr_row, h_row, strict=True)]
          for dr_row, h_row in zip(dr, h, strict=True)]
    dw1 = _round(_matmul(_transpose(x), g1), grad)
    return logits, {"W1": dw1, "W2": dw2}


@pytest.mark.parametrize(
    ("act", "grad"),
    [("e4m3@up", "e3m2@down"), ("float16@toward_zero", "bfloat16@odd"),
     ("e5m2@odd", "e4m3@toward_zero")],
)
def test_each_role_rounds_its_own_results(act, grad):
    policy = PrecisionPolicy(
        storage="float32", compute="float32", loss="float32", activations=act, gradients=grad
    )
    logits, caches = forward(PARAMS, X, CONFIG, policy)
    grads = backward(DLOGITS, caches, CONFIG, policy)
    want_logits, want_grads = _reference(act, grad)
    assert _mat(logits) == want_logits
    for name in ("W1", "W2"):
        assert _mat(grads[name]) == want_grads[name], name
    # the roles changed something: storage-only arithmetic gives other values here
    plain = PrecisionPolicy.uniform("float32")
    assert not np.array_equal(forward(PARAMS, X, CONFIG, plain)[0], logits)
    assert policy.to_dict()["activations"] == get_format(act).name
    assert policy.to_dict()["gradients"] == get_format(grad).name


def test_roles_are_checked():
    with pytest.raises(ValueError, match="carrier"):
        PrecisionPolicy(storage="float64", compute="float64", loss="float64",
                        activations="float16")
    with pytest.raises(ValueError, match="wider than the compute"):
        PrecisionPolicy(storage="bfloat16", compute="float16", loss="bfloat16",
                        gradients="float32")
    plain = PrecisionPolicy.uniform("float32")
    assert plain.for_role("activations") is plain
    assert "activations" not in plain.to_dict()


def test_run_options_keep_old_ids_and_record_the_roles():
    base = TrainConfig(p=7, hidden=(8,), steps=2)
    same = base.replace(activation_dtype="float32", gradient_rounding="nearest")
    assert run_id(base) != run_id(same)  # recorded (not neutral) values name the run
    assert run_id(base) == run_id(base.replace(activation_dtype=None))
    assert same.policy == base.policy  # the storage format itself: no role set
    cfg = base.replace(dtype="float16", activation_dtype="bf16", gradient_rounding="sr",
                       gradient_subnormals="ftz")
    pol = cfg.policy.to_dict()
    assert pol["activations"] == "bfloat16"
    assert pol["gradients"] == "float16@stochastic@ftz"
    assert cfg.to_dict()["activation_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="applies to model 'mlp' only"):
        TrainConfig(model="transformer", activation_rounding="up")
