"""A hand-written ReLU MLP: parameters, PyTorch-default initialisation, forward and backward.

``logits = α · (relu(... relu(x W1 + b1) ...) W_L + b_L)``, weights stored ``(n_in, n_out)``
so that a layer is ``x @ W``. With index inputs (modular arithmetic: ``x = (a, p + b)``) the
first layer is a gather, ``W1[a] + W1[p + b]``, bit-identical to ``onehot(x) @ W1``.

All arithmetic follows a :class:`~numstab.precision.PrecisionPolicy`: parameters in
``policy.storage``, matrix products accumulated in ``policy.compute`` and rounded once, to
``policy.activations`` in the forward and ``policy.gradients`` in the backward (each
``storage`` unless set: :meth:`~numstab.precision.PrecisionPolicy.for_role`). For a
bias-free network the output is positively homogeneous of degree L (the number of linear
layers): ``f(cθ) = c^L f(θ)`` for ``c > 0``.

The arithmetic is backend-generic (see :mod:`numstab.functional`): parameters and inputs of
one backend (NumPy, CuPy, or an array-API library for float32/float64) give results of that
backend, with NumPy's bits wherever the backend's elementary operations agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from numstab import kernels, workspace
from numstab.backend import namespace
from numstab.fastround import quantize_into
from numstab.functional import (
    GatherPlan,
    gather_backward,
    gather_forward,
    linear_backward,
    linear_forward,
    quantize,
    relu_backward,
    relu_forward,
)
from numstab.precision import PrecisionPolicy, get_format

__all__ = ["MLPConfig", "backward", "forward", "init_params", "param_names"]

INPUT_KINDS = ("index", "dense")


@dataclass(frozen=True)
class MLPConfig:
    """Shape of the network.

    Attributes
    ----------
    n_inputs : int
        Input width (``2p`` for one-hot modular arithmetic, the row count of ``W1``).
    n_classes : int
        Output width.
    hidden : tuple of int
        Hidden widths (paper: ``(200, 200)``).
    bias : bool
        Whether the linear layers have biases (paper: none for modular arithmetic).
    alpha : float
        Logit multiplier applied to the last layer's output.
    input_kind : {"index", "dense"}
        ``index``: inputs are integer row indices (N, k) into ``W1``; ``dense``: float (N, n_in).
    """

    n_inputs: int
    n_classes: int
    hidden: tuple[int, ...] = (200, 200)
    bias: bool = False
    alpha: float = 1.0
    input_kind: str = "index"

    def __post_init__(self):
        for name in ("n_inputs", "n_classes"):
            _check_width(name, getattr(self, name))
        try:
            hidden = tuple(self.hidden)
        except TypeError:
            raise ValueError(
                f"hidden must be a sequence of positive integers, got {self.hidden!r}"
            ) from None
        for h in hidden:
            _check_width(f"hidden widths {hidden!r}: each", h)
        object.__setattr__(self, "hidden", tuple(int(h) for h in hidden))
        object.__setattr__(self, "n_inputs", int(self.n_inputs))
        object.__setattr__(self, "n_classes", int(self.n_classes))
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"unknown input_kind {self.input_kind!r}; valid: index, dense")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.number)):
            raise ValueError(f"alpha must be a finite non-zero number, got {self.alpha!r}")
        if not np.isfinite(self.alpha) or self.alpha == 0:
            raise ValueError(f"alpha must be finite and non-zero, got {self.alpha!r}")

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.n_inputs, *self.hidden, self.n_classes)

    @property
    def n_layers(self) -> int:
        return len(self.hidden) + 1

    def to_dict(self) -> dict:
        return asdict(self)


def _check_width(name: str, v) -> None:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def param_names(config: MLPConfig) -> list[str]:
    """``["W1", ("b1",) "W2", ...]`` in layer order."""
    names = []
    for i in range(1, config.n_layers + 1):
        names.append(f"W{i}")
        if config.bias:
            names.append(f"b{i}")
    return names


def init_params(
    config: MLPConfig, seed, fmt="float32", *, xp=None, scale: float = 1.0
) -> dict[str, np.ndarray]:
    """PyTorch ``nn.Linear`` default initialisation, rounded to ``fmt``.

    ``W, b ~ U(-1/√fan_in, 1/√fan_in)`` (what ``kaiming_uniform_(a=√5)`` amounts to), drawn in
    float64 from ``np.random.default_rng(seed)`` layer by layer (weight, then bias), then
    rounded to the storage format. The distribution matches PyTorch; the random stream does not.
    ``scale`` multiplies every weight (not the biases) in float64 before the rounding (the
    paper's Fig. 14 scales the initial weights by 100).

    ``xp``: the array namespace of the parameters (default NumPy). The draws are always made
    on the host, then moved to ``xp`` and rounded there, so every backend starts from the
    same values.

    Returns
    -------
    dict of name -> array in the carrier dtype of ``fmt``
    """
    fmt = get_format(fmt)
    move = (lambda a: a) if xp is None or xp is np else xp.asarray
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    params = {}
    widths = config.widths
    for i in range(config.n_layers):
        fan_in, fan_out = widths[i], widths[i + 1]
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, (fan_in, fan_out))
        params[f"W{i + 1}"] = quantize(move(w if scale == 1 else w * scale), fmt)
        if config.bias:
            params[f"b{i + 1}"] = quantize(move(rng.uniform(-bound, bound, fan_out)), fmt)
    return params


def forward(params, x, config: MLPConfig, policy: PrecisionPolicy):
    """Logits of the MLP.

    Parameters
    ----------
    params : dict of name -> array (storage carrier dtype), one backend
    x : array, shape (N, k) int for ``index`` inputs, (N, n_inputs) float for ``dense``
    config : MLPConfig
    policy : PrecisionPolicy

    Returns
    -------
    logits : ndarray, shape (N, n_classes), storage carrier dtype
        Values of ``policy.activations`` (``storage`` unless set).
    cache : list
        Per-layer caches for :func:`backward`.
    """
    policy = policy.for_role("activations")  # the precision roles: results in their format
    caches = []
    L = config.n_layers
    b = params.get("b1")
    if config.input_kind == "index":
        h, c = gather_forward(x, params["W1"], b, policy)
    else:
        h, c = linear_forward(quantize(x, policy.storage), params["W1"], b, policy)
    caches.append(c)
    for i in range(2, L + 1):
        h, r = relu_forward(h)
        caches.append(r)
        h, c = linear_forward(h, params[f"W{i}"], params.get(f"b{i}"), policy)
        caches.append(c)
    if config.alpha != 1.0:
        h = quantize(h * namespace(h).asarray(config.alpha, dtype=h.dtype), policy.storage)
    return h, caches


def backward(
    dlogits, caches, config: MLPConfig, policy: PrecisionPolicy, plan: GatherPlan | None = None
) -> dict[str, np.ndarray]:
    """Parameter gradients given the logit gradient.

    Parameters
    ----------
    dlogits : ndarray, shape (N, n_classes)
        Any float dtype; rounded to the gradient format first (``policy.gradients``, else
        storage: as a framework casts the loss-format gradient back to the parameters' dtype).
    caches : from :func:`forward`
    plan : GatherPlan
        Required for ``index`` inputs (the segment-sum order of the first layer's backward).

    Returns
    -------
    dict of name -> ndarray, the same names and shapes as the parameters
        Values of ``policy.gradients`` (``storage`` unless set).
    """
    policy = policy.for_role("gradients")  # the precision roles: results in their format
    grads = {}
    L = config.n_layers
    g = quantize_into(dlogits, policy.storage)
    if config.alpha != 1.0:
        g = quantize(g * namespace(g).asarray(config.alpha, dtype=g.dtype), policy.storage)
    for i in range(L, 1, -1):
        dx, dw, db = linear_backward(g, caches[2 * (i - 1)], policy)
        grads[f"W{i}"] = dw
        if db is not None:
            grads[f"b{i}"] = db
        g = _relu_backward(dx, caches[2 * (i - 1) - 1])
    if config.input_kind == "index":
        if plan is None:
            raise ValueError("index inputs need a GatherPlan for the first layer's backward")
        dw, db = gather_backward(g, caches[0], plan, policy)
    else:
        _, dw, db = linear_backward(g, caches[0], policy, need_dx=False)
    grads["W1"] = dw
    if db is not None:
        grads["b1"] = db
    return {k: grads[k] for k in param_names(config)}


def _relu_backward(dy, y):
    """:func:`~numstab.functional.relu_backward`, fused where it applies: the same bits."""
    if not (kernels.applies(dy, y) and dy.shape == y.shape):
        return relu_backward(dy, y)
    g = workspace.empty(dy.shape, dy.dtype)
    kernels.relu_grad(dy.reshape(-1), y.reshape(-1), g.reshape(-1))
    return g
