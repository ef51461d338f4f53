"""How much memory a training run needs, estimated from its configuration alone.

Nothing is allocated: the estimate is arithmetic on the shapes a
:class:`~numstab.run.TrainConfig` implies, so a run that could never fit (``p = 10**6``: a
trillion training pairs) is refused before its dataset is generated. It is meant to be an upper
bound of the run's peak resident memory above the interpreter's own, within a small factor
(``tests/test_sweep.py`` measures it against real runs).

Terms, for ``N`` samples (``p**2`` pairs, ``p (p - 1)`` for ``div``, or ``parity_samples``),
``D`` inputs (``2p`` one-hot, ``2 bit_width(p)`` binary, ``parity_bits``), ``C`` classes,
``P`` parameters, ``s`` bytes per value of the storage carrier (4 for float16 / bfloat16,
which compute in float32), ``B`` rows alive during a logged step (the training batch, the
full training split when it is a mini-batch, and the test split):

- data: ``N (40 + 2 r)`` with ``r`` the bytes of one input row (16 one-hot, ``4 D`` dense):
  the generator's operand and label arrays, the inputs, and their split copies;
- params: ``3 P s`` (parameters, gradients, the copy kept for the update metrics);
- optimizer: ``(k + 1) P t`` with ``k`` = 2 moments (Adam/AdamW) or 1 (SGD), one recorded
  update, ``t`` bytes per value of the optimizer-state format;
- activations: ``B (Σ_h 3 h c + C (4 c' + 8) + D c)`` for the pre-activations, activations and
  their gradients, the logits with three loss temporaries and one float64 copy for metrics
  (``c``, ``c'``: at least 4 bytes, since the emulated formats compute in float32);
- metrics: ``400`` bytes per logged metric row, kept in memory and as CSV text;
- overhead: 32 MiB for what a run loads and allocates whatever its size (modules imported on
  first use, allocator arenas), plus :data:`numstab.kernels.OVERHEAD_BYTES` where the fused
  kernels will run (numba and its LLVM).

The transformer (``model = "transformer"``) has its own shapes: ``N = n²`` token pairs
(``n = p - residue_start``; ``n (n - 1)`` for ``div`` from 0), ``T = 2`` positions, width
``d``, feed-forward width ``f``, ``h`` heads, ``C = p`` classes and ``P`` parameters
(``p d + 4 d² + 9 d + 2 d f + f + d C + C``). Only the last position passes the attention, so
its activations are per sample, not per token, except the keys and values:

- data: ``N (40 + 2 · 16)`` (two tokens of 8 bytes per row, as the one-hot index inputs);
- params and optimizer: as the MLP's;
- activations: the larger of the training step, ``B (8 f + 24 d + 8 T d + 4 h T) c + B L``
  (the forward's cache, three ``f``-wide arrays: the ReLU output, its dropout and the mask,
  and the backward's temporaries at the feed-forward layer, up to five more), and a logged
  step, which keeps the training pass's cache ``B (3 f + 14 d + 4 T d) c`` while it evaluates
  the larger split without gradients, ``R (3 f + 12 d + 4 T d) c + R L``; ``c`` the compute
  carrier's bytes (at least 4), ``L = C (4 c' + 8)`` the loss's bytes per row as above,
  ``R`` the larger of the test split and (when the training pass differs from the logged
  evaluation: dropout or mini-batches) the training split. The emulated formats (float16,
  bfloat16) round through bit patterns and masks of the array being rounded: ``10 f c`` more
  per training row and ``4 f c`` per evaluated row (fitted to the peaks measured at the
  paper's sizes, ``tests/test_transformer_footprint.py``).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field

from numstab import kernels
from numstab.precision import get_format

__all__ = [
    "MEMORY_FRACTION",
    "Footprint",
    "check_fits",
    "default_max_run_bytes",
    "estimate_run_memory",
    "format_bytes",
    "physical_memory",
]

#: Bytes per logged metric row: the in-memory tuple (~150) and its CSV text, held by the
#: worker and again by the process that writes the files.
METRIC_ROW_BYTES = 400
#: Metric rows per logged step: 8 per split and 5 per parameter tensor (+ the global row).
SPLIT_METRICS = 8
TENSOR_METRICS = 5
#: Size-independent cost of a run (lazily imported modules, allocator arenas).
OVERHEAD_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Footprint:
    """Estimated bytes of one run, by what holds them (see the module docstring)."""

    data: int
    params: int
    optimizer: int
    activations: int
    metrics: int
    overhead: int = field(default_factory=lambda: OVERHEAD_BYTES + kernels.overhead_bytes())

    @property
    def total(self) -> int:
        return (
            self.data
            + self.params
            + self.optimizer
            + self.activations
            + self.metrics
            + self.overhead
        )

    def describe(self) -> str:
        parts = {
            "data": self.data,
            "activations": self.activations,
            "parameters": self.params,
            "optimizer state": self.optimizer,
            "metrics": self.metrics,
        }
        return ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)


def _shapes(config) -> tuple[int, int, int, int]:
    """``(N, D, C, input row bytes)`` of a config's dataset, without generating it."""
    c = config
    if c.task == "parity":
        n, d = c.parity_samples, c.parity_bits
        return n, d, 2, 4 * d
    n = c.p * (c.p - 1) if c.task == "div" else c.p * c.p
    if c.encoding == "onehot":
        return n, 2 * c.p, c.p, 16
    d = 2 * max(1, (c.p - 1).bit_length())
    return n, d, c.p, 4 * d


def estimate_run_memory(config) -> Footprint:
    """Estimated peak memory of training ``config`` (a :class:`~numstab.run.TrainConfig`).

    Examples
    --------
    >>> from numstab.run import TrainConfig
    >>> estimate_run_memory(TrainConfig(p=10**6)).total > 2**40  # a trillion pairs: > 1 TiB
    True
    """
    if config.model == "transformer":
        return _transformer(config)
    c = config
    n, d, classes, row = _shapes(c)
    n_train = int(c.train_fraction * n)
    n_test = n - n_train
    storage = get_format(c.dtype)
    s = storage.carrier.itemsize
    cs = max(s, 4)
    closs = max(get_format(c.loss_dtype or c.dtype).carrier.itemsize, 4)
    t = get_format(c.state_format).carrier.itemsize

    widths = [d, *c.hidden, classes]
    layers = list(itertools.pairwise(widths))
    n_params = sum(a * b + (b if c.bias else 0) for a, b in layers)
    n_tensors = len(layers) * (2 if c.bias else 1)

    batch = n_train if c.batch_size is None else min(c.batch_size, n_train)
    rows = batch + n_test + (n_train if batch < n_train else 0)
    per_row = sum(3 * h * cs for h in c.hidden) + classes * (4 * closs + 8)
    if c.encoding != "onehot" or c.task == "parity":
        per_row += d * cs

    moments = 1 if c.optimizer == "sgd" else 2
    logged = c.steps // c.log_every + 2
    metric_rows = 2 * SPLIT_METRICS + TENSOR_METRICS * (n_tensors + 1)
    return Footprint(
        data=n * (40 + 2 * row),
        params=3 * n_params * s,
        optimizer=(moments + 1) * n_params * t,
        activations=rows * per_row,
        metrics=logged * metric_rows * METRIC_ROW_BYTES,
    )


def _transformer(c) -> Footprint:
    """:func:`estimate_run_memory` of a transformer run (the module docstring's terms)."""
    r = c.p - c.residue_start
    n = r * (r - 1) if c.task == "div" and c.residue_start == 0 else r * r
    n_train = int(c.train_fraction * n)
    n_test = n - n_train
    s = get_format(c.dtype).carrier.itemsize
    cs = max(s, 4)
    closs = max(get_format(c.loss_dtype or c.dtype).carrier.itemsize, 4)
    t = get_format(c.state_format).carrier.itemsize
    d, f, h, classes, tokens = c.d_model, c.d_ff, c.heads, c.p, 2

    n_params = c.p * d + 4 * d * d + 9 * d + 2 * d * f + f + d * classes + classes
    batch = n_train if c.batch_size is None else min(c.batch_size, n_train)
    separate = batch < n_train or c.dropout > 0  # the logged training split is its own pass
    rows = max(n_test, n_train if separate else 0)
    loss = classes * (4 * closs + 8)
    wide = get_format(c.dtype).is_emulated  # rounding temporaries of the f-wide arrays
    step = batch * ((8 * f + 24 * d + 8 * tokens * d + 4 * h * tokens + 10 * f * wide) * cs + loss)
    logged = batch * (3 * f + 14 * d + 4 * tokens * d) * cs
    logged += rows * ((3 * f + 12 * d + 4 * tokens * d + 4 * f * wide) * cs + loss)
    moments = 1 if c.optimizer == "sgd" else 2
    n_tensors = 15
    metric_rows = 2 * (SPLIT_METRICS + 1 + h) + TENSOR_METRICS * (n_tensors + 1)
    return Footprint(
        data=n * (40 + 2 * 16),
        params=3 * n_params * s,
        optimizer=(moments + 1) * n_params * t,
        activations=max(step, logged),
        metrics=(c.steps // c.log_every + 2) * metric_rows * METRIC_ROW_BYTES,
    )


#: Default per-run memory limit, as a fraction of the physical memory (sweeps and commands).
MEMORY_FRACTION = 0.5


def default_max_run_bytes() -> int | None:
    """The default per-run memory limit: :data:`MEMORY_FRACTION` of the physical memory
    (None, no limit, where the OS does not report it)."""
    total = physical_memory()
    return None if total is None else int(MEMORY_FRACTION * total)


#: What makes a run smaller, by model (MLP, transformer).
_SMALLER = ("--modulus, --hidden, --steps/--log-every", "--modulus, --d-ff, --batch-size")


def check_fits(config, limit: int | str | None = "default") -> None:
    """``ValueError`` if the run's estimated memory exceeds ``limit`` bytes ("default":
    :func:`default_max_run_bytes`; None: no limit), naming the need and its largest parts."""
    if limit == "default":
        limit = default_max_run_bytes()
    if limit is None:
        return
    need = estimate_run_memory(config)
    if need.total > limit:
        raise ValueError(
            f"the run needs about {format_bytes(need.total)} of memory ({need.describe()}), "
            f"more than the limit of {format_bytes(limit)} ({MEMORY_FRACTION:g} of this "
            f"machine's memory); make it smaller ({_SMALLER[config.model == 'transformer']})"
        )


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine, or None where the OS does not say."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * size if pages > 0 and size > 0 else None


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, 3 significant digits)."""
    if n < 1024:
        return f"{int(n)} B"
    units = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    k = min(int(math.log(n, 1024)), len(units))
    return f"{n / 1024**k:.3g} {units[k - 1]}"
