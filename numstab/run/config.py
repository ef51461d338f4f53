"""The configuration of one training run: every option declared once, with its validation.

:class:`TrainConfig`'s fields are declared with :func:`numstab.run.options.option` (type,
range, choices, aliases, help); the command-line options, the SPEC coercion of sweeps and
the run ids are derived from these declarations.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from numstab.backend import BACKENDS
from numstab.data import ENCODINGS, MODULAR_ENCODINGS, MODULAR_OPS, TASKS
from numstab.losses import LOSS_KINDS, SMOOTHABLE
from numstab.optim import OPTIMIZER_NAMES, PERP_GRAD_SCOPES, make_optimizer
from numstab.precision import (
    ELEMENTARY_MODES,
    REDUCTION_ORDERS,
    PrecisionPolicy,
    available_formats,
    get_format,
    with_arithmetic,
)
from numstab.rounding_modes import ROUNDING_MODES, SUBNORMAL_RULES, canonical_rounding
from numstab.run.options import coerce, option, options_of
from numstab.transformer import ATTENTION_KINDS, NORM_PLACEMENTS

__all__ = ["ID_NEUTRAL", "MODELS", "ONLY_FOR", "RECORDED_BEFORE", "TrainConfig", "unread_fields"]

_FORMATS = available_formats()
_NAMED_FORMATS = available_formats(extended=True)


#: Fields added to :class:`TrainConfig` after runs were recorded, with the value that
#: reproduces those runs: a record without the field was computed that way.
RECORDED_BEFORE = {"elementary": "libm", "model": "mlp", "residue_start": 0}

#: The networks a run can train.
MODELS = ("mlp", "transformer")
#: Options of the transformer alone: at their defaults when the model is the MLP (and then
#: left out of the run id, :data:`ID_NEUTRAL`).
TRANSFORMER_FIELDS = (
    "d_model", "heads", "d_ff", "dropout", "norm_placement", "attention", "layer_norm_eps",
)
#: Options of the MLP alone: at their defaults when the model is the transformer.
MLP_FIELDS = ("hidden", "bias", "alpha", "init_scale", *(
    f"{role}_{part}" for role in ("activation", "gradient")
    for part in ("dtype", "rounding", "subnormals")
))

#: Options read by some tasks, optimizers or losses alone: (fields, the config field that
#: decides, the values that read them, how the message names those values). Given another
#: value than their default elsewhere they would be silently ignored, so they are refused.
ONLY_FOR = (
    (("parity_bits", "parity_k", "parity_samples"), "task", ("parity",), "task 'parity'"),
    (("p", "residue_start"), "task", MODULAR_OPS, "the modular tasks"),
    (("beta1", "beta2", "eps"), "optimizer", ("adam", "adamw"), "optimizers adam, adamw"),
    (("momentum",), "optimizer", ("sgd",), "optimizer 'sgd' (Adam's momentum is beta1)"),
    (("stablemax_eps",), "loss", ("stablemax",), "loss 'stablemax'"),
)


def _unread(values):
    """``(field, deciding field, its value, owner text)`` of each :data:`ONLY_FOR` field that
    a config of these ``values`` (field name -> value; a missing field at its default) does
    not read."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for names, key, readers, owner in ONLY_FOR:
        actual = values.get(key, defaults[key])
        if actual not in readers:
            yield from ((name, key, actual, owner) for name in names)


def unread_fields(values) -> list[str]:
    """The fields of :data:`ONLY_FOR` that a config of these ``values`` (field name -> value;
    a missing field at its default) does not read: e.g. ``parity_k`` for ``task="add"``."""
    return [name for name, *_ in _unread(values)]


#: The input encodings of the tasks without a choice of encoding: their own name, and the
#: default (``onehot``), which they read as their own.
OWN_ENCODING = {"parity": "bits", "digits": "pixels"}

#: Fields added after run ids were published, with the value at which a run is the one
#: computed before the field existed: at that value the field is left out of the run id
#: (:func:`numstab.sweep.spec.canonical_json`), so adding an option renames no existing run.
#: A new option goes here with its neutral default.
ID_NEUTRAL = {
    "zero_sum_grad_from": None,
    "temperature": 1.0,
    "label_smoothing": 0.0,
    "init_scale": 1.0,
    "model": "mlp",
    "residue_start": 0,
    "d_model": 128,
    "heads": 4,
    "d_ff": 2048,
    "dropout": 0.1,
    "norm_placement": "post",
    "attention": "softmax",
    "layer_norm_eps": 1e-5,
    "rounding": "nearest",
    "subnormals": "gradual",
    "loss_rounding": None,
    "loss_subnormals": None,
    "update_rounding": None,
    "activation_dtype": None,
    "activation_rounding": None,
    "activation_subnormals": None,
    "gradient_dtype": None,
    "gradient_rounding": None,
    "gradient_subnormals": None,
}

_FORMAT_WORDS = (
    f"a format: {', '.join(available_formats(extended=True))}, a custom eXmY, or a narrow "
    "format + _sat"
)


def _format_name(name: str) -> str:
    """Canonical format name of an alias (``fp16`` -> ``float16``); ValueError if unknown or
    if it names a rounding mode (``--rounding``/``--subnormals`` do)."""
    if "@" in name:
        raise ValueError("a rounding mode is an option of its own")
    return get_format(name).name


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and so is recorded with its results).

    Defaults are the paper's modular-addition setup: p = 113, f = 0.4, bias-free 200-200 ReLU
    MLP, AdamW lr 0.01, betas (0.9, 0.99), eps 1e-25, no weight decay, softmax cross-entropy in
    float32, full batch.

    Each field is declared once with :func:`numstab.run.options.option` (type, allowed values,
    aliases, help); construction validates and canonicalises every field from that
    declaration (``dtype="fp16"`` becomes ``"float16"``, ``lr=1`` becomes ``1.0``) and checks
    the combinations (e.g. an Adam eps that underflows in the optimizer-state format), raising
    ``ValueError`` that names the field. The command-line options and sweep SPECs are derived
    from the same declarations.
    """

    task: str = option(
        "add", "str",
        "modular operation, sparse parity, or digits (scikit-learn's 8x8 digits: an offline "
        "stand-in for MNIST)",
        choices=TASKS,
    )
    p: int = option(
        113, "int", "p of the modular task (residues 0..p-1)", low=2, flag="--modulus"
    )
    train_fraction: float = option(
        0.4, "float", "fraction of the pairs used for training", low=0, high=1,
        low_open=True, high_open=True,
    )
    encoding: str = option(
        "onehot", "str",
        "input encoding of the modular task (parity reads bits and digits pixels: there, "
        "onehot stands for theirs)",
        choices=ENCODINGS,
    )
    parity_bits: int = option(43, "int", "input bits of the sparse-parity task", low=1)
    parity_k: int = option(3, "int", "relevant bits of the sparse-parity task", low=1)
    parity_samples: int = option(2000, "int", "samples of the sparse-parity task", low=2)
    residue_start: int = option(
        0, "int",
        "smallest operand of the modular task: 0 (the MLP's data) or 1 (the authors' "
        "transformer data)",
        low=0, high=1,
    )
    hidden: tuple[int, ...] = option((200, 200), "ints", "hidden layer widths", low=1)
    bias: bool = option(False, "bool", "give the linear layers biases")
    alpha: float = option(1.0, "float", "logit multiplier", nonzero=True)
    init_scale: float = option(
        1.0, "float", "multiplier of the initial weights (the paper's Fig. 14: 100)",
        low=0, low_open=True,
    )
    model: str = option(
        "mlp", "str", "the network: the MLP or the one-layer transformer (Fig. 6a)",
        choices=MODELS,
    )
    d_model: int = option(128, "int", "transformer: width of the embedding and layer", low=1)
    heads: int = option(4, "int", "transformer: attention heads (dividing --d-model)", low=1)
    d_ff: int = option(2048, "int", "transformer: feed-forward width", low=1)
    dropout: float = option(
        0.1, "float", "transformer: dropout probability at every site while training", low=0,
        high=1, high_open=True,
    )
    norm_placement: str = option(
        "post", "str",
        "transformer: LayerNorm after each residual sum (as PyTorch) or before each block",
        choices=NORM_PLACEMENTS,
    )
    attention: str = option(
        "softmax", "str", "transformer: normalisation of the attention scores over the keys",
        choices=ATTENTION_KINDS,
    )
    layer_norm_eps: float = option(
        1e-5, "float", "transformer: the LayerNorms' epsilon", low=0, low_open=True
    )
    dtype: str = option(
        "float32", "str", "format of parameters, GEMMs and loss", choices=_NAMED_FORMATS,
        aliases=_format_name, allowed=_FORMAT_WORDS,
    )
    loss_dtype: str | None = option(
        None, "str", "loss format alone (the paper's softmax_precision); none: --dtype",
        choices=(*_NAMED_FORMATS, None), aliases=_format_name,
        allowed=_FORMAT_WORDS + ", or none",
    )
    order: str = option(
        "pairwise", "str", "summation order of the loss's normaliser", choices=REDUCTION_ORDERS
    )
    rounding: str = option(
        "nearest", "str",
        "rounding mode of the emulated formats' results (parameters, activations, gradients, "
        "update, loss); stochastic draws from (seed, step, phase, rounding, element)",
        choices=ROUNDING_MODES, aliases=canonical_rounding,
    )
    subnormals: str = option(
        "gradual", "str",
        "subnormal results and operands: gradual (IEEE), ftz (results flushed to zero), daz "
        "(loss operands read as zero), ftz_daz",
        choices=SUBNORMAL_RULES,
    )
    loss_rounding: str | None = option(
        None, "str", "rounding mode of the loss alone; none: --rounding",
        choices=(*ROUNDING_MODES, None), aliases=canonical_rounding,
    )
    loss_subnormals: str | None = option(
        None, "str", "subnormal rule of the loss alone; none: --subnormals",
        choices=(*SUBNORMAL_RULES, None),
    )
    update_rounding: str | None = option(
        None, "str",
        "rounding mode of the update θ + Δθ alone (stored in --dtype); none: --rounding",
        choices=(*ROUNDING_MODES, None), aliases=canonical_rounding,
    )
    activation_dtype: str | None = option(
        None, "str", "format of the MLP's activations (the forward's results); none: --dtype",
        choices=(*_NAMED_FORMATS, None), aliases=_format_name,
        allowed=_FORMAT_WORDS + ", or none",
    )
    activation_rounding: str | None = option(
        None, "str", "rounding mode of the activations alone; none: --rounding",
        choices=(*ROUNDING_MODES, None), aliases=canonical_rounding,
    )
    activation_subnormals: str | None = option(
        None, "str", "subnormal rule of the activations alone; none: --subnormals",
        choices=(*SUBNORMAL_RULES, None),
    )
    gradient_dtype: str | None = option(
        None, "str",
        "format of the MLP's gradients (the backward's results, from the logit gradient on); "
        "none: --dtype",
        choices=(*_NAMED_FORMATS, None), aliases=_format_name,
        allowed=_FORMAT_WORDS + ", or none",
    )
    gradient_rounding: str | None = option(
        None, "str", "rounding mode of the gradients alone; none: --rounding",
        choices=(*ROUNDING_MODES, None), aliases=canonical_rounding,
    )
    gradient_subnormals: str | None = option(
        None, "str", "subnormal rule of the gradients alone; none: --subnormals",
        choices=(*SUBNORMAL_RULES, None),
    )
    elementary: str = option(
        "correct", "str",
        "exp/log/log1p/expm1: correctly rounded in the declared format, or the platform's libm "
        "(NumPy's; runs recorded before this option existed)",
        choices=ELEMENTARY_MODES,
    )
    loss: str = option(
        "softmax", "str",
        "loss: softmax cross-entropy (as frameworks), StableMax, the absorption-free softmax, "
        "or MSE on one-hot targets",
        choices=LOSS_KINDS, aliases={"softmax-stable": "softmax_stable"},
    )
    stablemax_eps: float = option(
        0.0, "float", "epsilon in StableMax's 1/(1 - x + eps) (the authors' code: 1e-30)", low=0
    )
    temperature: float = option(
        1.0, "float",
        "softmax temperature T: the loss of logits / T, rounded to the loss format (not --alpha)",
        low=0, low_open=True,
    )
    label_smoothing: float = option(
        0.0, "float",
        "label smoothing of the softmax loss: targets eps/C + (1 - eps) onehot (PyTorch's)",
        low=0, high=1, high_open=True,
    )
    optimizer: str = option("adamw", "str", "optimizer", choices=OPTIMIZER_NAMES)
    state_dtype: str | None = option(
        None, "str",
        "optimizer-state format; none: float32 for float16/bfloat16, else --dtype",
        choices=(*_FORMATS, None), aliases=_format_name,
    )
    lr: float = option(0.01, "float", "learning rate", low=0, low_open=True)
    beta1: float = option(0.9, "float", "Adam beta1", low=0, high=1, high_open=True)
    beta2: float = option(0.99, "float", "Adam beta2 (paper: 0.99)", low=0, high=1, high_open=True)
    eps: float = option(1e-25, "float", "Adam epsilon (paper: 1e-25)", low=0)
    weight_decay: float = option(0.0, "float", "weight decay (decoupled for AdamW)", low=0)
    momentum: float = option(0.0, "float", "SGD momentum (Adam's is beta1)", low=0)
    perp_grad: str | None = option(
        None, "str",
        "⊥Grad: per tensor with rescaling (authors' code) or global (paper); none: off",
        choices=(None, *PERP_GRAD_SCOPES),
    )
    normalized_lr: bool = option(
        False, "bool", "learning rate lr / ||grad|| each step (the paper's normalized schedule)"
    )
    steps: int = option(1000, "int", "training steps", low=0)
    batch_size: int | None = option(
        None, "int", "rows per step drawn without replacement; none: full batch", low=1,
        nullable=True,
    )
    log_every: int = option(10, "int", "metric logging interval in steps", low=1)
    seed: int = option(0, "int", "seed of data split, initialisation and batches", low=0)
    zero_target_grad_from: int | None = option(
        None, "int", "from this step on, zero the correct-class logit gradient (Fig. 8)", low=0,
        nullable=True,
    )
    zero_sum_grad_from: int | None = option(
        None, "int",
        "from this step on, train on each row's logit gradient minus its mean (the part that "
        "sums to 0 over the classes, as in exact arithmetic)", low=0, nullable=True,
    )
    backend: str = option("numpy", "str", "array backend", choices=BACKENDS)

    def __post_init__(self):
        for name, spec in options_of(TrainConfig).items():
            object.__setattr__(self, name, coerce(name, spec, getattr(self, name)))
        if self.task == "parity":
            if self.parity_k > self.parity_bits:
                raise ValueError(
                    f"parity_k must be <= parity_bits ({self.parity_bits}), got {self.parity_k}"
                )
        if self.label_smoothing and self.loss not in SMOOTHABLE:
            raise ValueError(
                f"label_smoothing is defined for the {', '.join(SMOOTHABLE)} loss, not "
                f"{self.loss!r}"
            )
        if self.task in MODULAR_OPS and self.encoding not in MODULAR_ENCODINGS:
            raise ValueError(
                f"encoding {self.encoding!r} is for the parity task; the modular tasks take "
                f"one of: {', '.join(MODULAR_ENCODINGS)}"
            )
        self._check_applicable()
        self._check_model()
        try:
            self.policy  # noqa: B018 (a rounding mode the formats cannot take is refused)
        except ValueError as exc:
            raise ValueError(f"precision policy: {exc}") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # hazard warnings come again when it runs
                self.make_optimizer()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"optimizer: {exc}") from None

    def _check_applicable(self) -> None:
        """The options that the task, optimizer and loss do not read (:data:`ONLY_FOR`,
        :data:`OWN_ENCODING`) at their defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, key, actual, owner in _unread(self.__dict__):
            if getattr(self, name) != defaults[name]:
                raise ValueError(
                    f"{name} = {getattr(self, name)!r} applies to {owner} only (the {key} "
                    f"is {actual!r}; leave {name} at its default)"
                )
        own = OWN_ENCODING.get(self.task)
        if own is not None and self.encoding not in (own, defaults["encoding"]):
            raise ValueError(
                f"encoding {self.encoding!r} does not apply to task {self.task!r}: its inputs "
                f"are {own!r} (give {own!r} or leave encoding at its default)"
            )

    def _check_model(self) -> None:
        """The options of the other model at their defaults; the transformer's input is the
        token form (``encoding`` onehot, the default, is read as ``tokens``)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.model == "mlp":
            if self.encoding == "tokens":
                raise ValueError(
                    "encoding 'tokens' is the transformer's input; the MLP takes onehot or binary"
                )
            others, owner = TRANSFORMER_FIELDS, "transformer"
        else:
            if self.task == "parity":
                raise ValueError(
                    "model 'transformer' reads the operands of a modular task as tokens; "
                    "the parity task has none"
                )
            if self.encoding == "onehot":
                object.__setattr__(self, "encoding", "tokens")
            elif self.encoding != "tokens":
                raise ValueError(
                    f"encoding {self.encoding!r} is the MLP's; model 'transformer' reads tokens"
                )
            if self.d_model % self.heads:
                raise ValueError(
                    f"heads must divide d_model, got d_model={self.d_model}, heads={self.heads}"
                )
            others, owner = MLP_FIELDS, "mlp"
        for name in others:
            if getattr(self, name) != defaults[name]:
                raise ValueError(
                    f"{name} = {getattr(self, name)!r} applies to model {owner!r} only (the "
                    f"model is {self.model!r}; leave {name} at its default)"
                )

    def make_optimizer(self):
        """The optimizer this config names (:func:`numstab.optim.make_optimizer`)."""
        return make_optimizer(
            self.optimizer,
            lr=self.lr,
            betas=(self.beta1, self.beta2),  # (SGD ignores betas and eps)
            eps=self.eps,
            weight_decay=self.weight_decay,
            momentum=self.momentum,
            perp_grad=self.perp_grad,
            normalized_lr=self.normalized_lr,
            storage_format=(self.policy.update or self.policy.storage).name,
            state_format=self.state_format,
        )

    @property
    def state_format(self) -> str:
        """Format of the optimizer state: ``state_dtype``, or by default float32 for 16-bit
        storage (float16 cannot hold the paper's eps = 1e-25, and its squared gradients
        underflow) and the storage format otherwise."""
        if self.state_dtype is not None:
            return get_format(self.state_dtype).name
        storage = get_format(self.dtype)
        return "float32" if storage.is_emulated else storage.name

    @property
    def storage_format(self) -> str:
        """Parameters, activations, gradients (and the update, unless ``update_rounding``):
        ``dtype`` in ``rounding`` with ``subnormals`` (``float16@stochastic``; the plain name
        for the defaults)."""
        return with_arithmetic(self.dtype, self.rounding, self.subnormals).name

    @property
    def policy(self) -> PrecisionPolicy:
        loss = with_arithmetic(
            self.loss_dtype or self.dtype,
            self.loss_rounding or self.rounding,
            self.loss_subnormals or self.subnormals,
        )
        policy = PrecisionPolicy.paper(
            self.storage_format, loss.name, order=self.order, elementary=self.elementary
        )
        roles = {role: self._role_format(role[:-1]) for role in ("activations", "gradients")}
        if self.update_rounding is not None:
            roles["update"] = with_arithmetic(self.dtype, self.update_rounding, self.subnormals)
        roles = {k: v for k, v in roles.items() if v is not None}
        return dataclasses.replace(policy, **roles) if roles else policy

    def _role_format(self, role: str):
        """The format of ``activation`` or ``gradient`` from its three options (each
        defaulting to the run's own); None when it is the storage format."""
        dtype, rounding, subnormals = (
            getattr(self, f"{role}_{part}") for part in ("dtype", "rounding", "subnormals")
        )
        fmt = with_arithmetic(
            dtype or self.dtype, rounding or self.rounding, subnormals or self.subnormals
        )
        return None if fmt.name == self.storage_format else fmt

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config a recorded ``to_dict()`` describes (a checkpoint's, a run folder's).

        Fields added after a record was written take :data:`RECORDED_BEFORE`'s value, the one
        that reproduces what was computed then (not today's default); derived keys such as
        ``state_format`` are ignored. ``ValueError`` for unknown fields or bad values.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a table of fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"state_format"})
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        fields = {**RECORDED_BEFORE, **{k: v for k, v in d.items() if k in names}}
        if isinstance(fields.get("hidden"), list):
            fields["hidden"] = tuple(fields["hidden"])
        return cls(**fields)

    def to_dict(self) -> dict:
        """The record of the run: every field (the run id leaves out :data:`ID_NEUTRAL`'s
        fields at their neutral values, so that runs recorded before them keep their ids)."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["state_format"] = self.state_format  # the resolved default, for the record
        return d
