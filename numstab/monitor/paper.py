"""The paper's MLP written in plain PyTorch, from the initial weights of a numstab run.

A reference client of the monitor: the same network, data, loss and optimizer as
:class:`numstab.run.Run` (bias-free ReLU MLP on one-hot ``(a, p + b)`` inputs, mean softmax
cross-entropy over the full batch, ``torch.optim.AdamW`` with the run's hyper-parameters), in
PyTorch's own arithmetic. docs/monitor.md compares the two trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TorchTwin", "torch_twin"]


@dataclass
class TorchTwin:
    """``model`` (``nn.Sequential``), ``optimizer``, the training batch ``x`` (one-hot, the
    model's dtype) and ``y`` (int64), and ``step()``: one full-batch step returning
    ``(logits, loss)`` with the gradient in place and the update not yet applied."""

    model: object
    optimizer: object
    x: object
    y: object

    def step(self):
        import torch.nn.functional as F  # optional dependency

        logits = self.model(self.x)
        loss = F.cross_entropy(logits, self.y)
        self.optimizer.zero_grad()
        loss.backward()
        return logits, loss


def torch_twin(run) -> TorchTwin:
    """The PyTorch twin of a freshly built :class:`numstab.run.Run` (float32 or float64, one-hot
    modular task, AdamW or Adam, no ⊥Grad), with ``W_torch = W_numstab.T`` bit for bit.

    Raises ValueError for a configuration the twin does not cover.
    """
    import torch  # optional dependency

    c = run.config
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(c.dtype)
    if (
        dtype is None
        or c.loss_dtype not in (None, c.dtype)
        or c.loss != "softmax"
        or run.model.input_kind != "index"
        or c.bias
        or c.alpha != 1.0
        or c.optimizer not in ("adam", "adamw")
        or c.perp_grad is not None
        or c.normalized_lr
        or c.batch_size is not None
    ):
        raise ValueError("the twin covers float32/float64 full-batch softmax runs of the paper MLP")
    d = run.data
    idx = torch.from_numpy(np.array(d.x_train, dtype=np.int64))
    eye = torch.eye(d.n_inputs, dtype=dtype)
    x = eye[idx[:, 0]] + eye[idx[:, 1]]
    layers = []
    for i in range(1, run.model.n_layers + 1):
        w = run.params[f"W{i}"]
        lin = torch.nn.Linear(*w.shape, bias=False, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
        layers += [lin, torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    opt_cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
    optimizer = opt_cls(
        model.parameters(),
        lr=c.lr,
        betas=(c.beta1, c.beta2),
        eps=c.eps,
        weight_decay=c.weight_decay,
    )
    y = torch.from_numpy(np.array(d.y_train, dtype=np.int64))
    return TorchTwin(model, optimizer, x, y)
