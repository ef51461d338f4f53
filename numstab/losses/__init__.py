"""Cross-entropy losses in a declared format: one module per loss, forward beside backward.

Each loss module (:mod:`~numstab.losses.softmax`, :mod:`~numstab.losses.stablemax`,
:mod:`~numstab.losses.softmax_stable`, :mod:`~numstab.losses.mse`) writes its formula over a
:class:`~numstab.losses.rounding.Rounding` and provides::

    forward(z, labels, r, eps) -> (loss (N,), normaliser (N,), probs (N, C), state tuple)
    backward(cache, dl (N, 1), r) -> logit gradient (N, C)
    collapse_terms(z, r, eps) -> (N, C) terms whose ordered sum is 1 in a collapsed row

The entries here (:func:`loss_forward`, :func:`loss_backward`, :func:`collapse_mask`) check
their arguments once and dispatch through :data:`LOSSES`; adding a loss is one new module and
one line in :data:`LOSSES` (docs/architecture.md).

Two options apply around the module: a temperature ``T`` divides the logits,
``z' = RN(z / T)`` (``T`` rounded to the format first; the gradient is ``RN(g' / T)``), for
every loss; label smoothing ``ε`` (softmax only, :data:`SMOOTHABLE`) replaces the one-hot
target by ``ε/C + (1 - ε)·onehot`` (:func:`numstab.losses.softmax.smoothed`).

Elementary functions: ``exp``, ``log`` and ``log1p`` go through :mod:`numstab.elementary` in
the declared mode: ``"correct"`` (default) rounds each once, correctly, to the loss format;
``"libm"`` calls the array library's function in the carrier dtype and rounds its result
(older runs' bits). The backward's single rounding of the target entry and StableMax's
backward without ``s**2`` hold in both modes.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np

from numstab.backend import errstate, namespace, take_at, xp_dtype
from numstab.checks import check_choice, check_eps, check_format, is_float, is_int
from numstab.elementary import check_mode
from numstab.fastround import quantize_into
from numstab.losses import mse, softmax, softmax_stable, stablemax
from numstab.losses.rounding import Rounding
from numstab.precision import Format, quantize
from numstab.summation import check_order

__all__ = [
    "LOSSES",
    "LOSS_KINDS",
    "REDUCTIONS",
    "SMOOTHABLE",
    "LossCache",
    "collapse_mask",
    "loss_backward",
    "loss_forward",
    "reduce_loss",
    "row_verdicts",
    "stablemax_s",
]

#: Loss name -> its module (``forward``, ``backward``, ``collapse_terms``).
LOSSES = {
    "softmax": softmax,
    "stablemax": stablemax,
    "softmax_stable": softmax_stable,
    "mse": mse,
}
#: Loss kinds understood by :func:`loss_forward`.
LOSS_KINDS = tuple(LOSSES)
#: Losses that take label smoothing (their module has ``smoothed`` and ``backward_smoothed``).
SMOOTHABLE = tuple(k for k, m in LOSSES.items() if hasattr(m, "smoothed"))
#: Reductions understood by :func:`reduce_loss`.
REDUCTIONS = ("mean", "none")


@dataclass(frozen=True)
class LossCache:
    """What a loss forward keeps for its backward and for the collapse metrics.

    Attributes
    ----------
    kind, fmt, order : the loss, its format and reduction order
    labels : int array (N,)
    normaliser : array (N,)
        The computed sum: ``Σ exp(z - m)`` (softmax), ``Σ s(z)`` (StableMax) or the tail
        ``s`` (absorption-free softmax), in ``fmt``.
    probs : array (N, C)
        The probabilities the backward uses (``exp(lsm)``, ``s / S`` or ``e / (1 + s)``; for
        MSE the residuals ``z - onehot(y)``).
    state : tuple
        The loss's own arrays: ``(lsm,)`` (softmax), ``(s, z)`` (stablemax), ``(argmax,
        RN(1 + s))`` (softmax_stable), ``()`` (mse).
    elementary : how exp / log / log1p were evaluated ("correct" or "libm")
    temperature : float
        ``T`` as rounded to ``fmt`` (1: none).
    label_smoothing : float
        ``ε`` as rounded to ``fmt`` (0: none).
    """

    kind: str
    fmt: Format
    order: str
    labels: np.ndarray
    normaliser: np.ndarray
    probs: np.ndarray
    state: tuple = ()
    elementary: str = "correct"
    temperature: float = 1.0
    label_smoothing: float = 0.0

    @property
    def extra(self) -> tuple:
        """Deprecated name of :attr:`state`."""
        warnings.warn(
            "LossCache.extra is deprecated; use LossCache.state", DeprecationWarning, stacklevel=2
        )
        return self.state


def stablemax_s(x, fmt, *, eps: float = 0.0):
    """StableMax's ``s(x)`` in a format: ``x + 1`` for ``x >= 0``, ``1 / (1 - x + eps)`` else.

    ``x`` is rounded to ``fmt`` first, then each operation. ``s`` maps ``-inf`` to 0 and
    ``+inf`` to ``inf``; NaN gives NaN. ``eps`` must be finite and ``>= 0`` (ValueError /
    TypeError otherwise).

    Returns
    -------
    s : ndarray, shape of ``x``
    d : ndarray
        The rounded denominator ``1 - x + eps`` (1 where ``x >= 0``), reused by the backward.
    """
    fmt = check_format(fmt)
    check_eps(eps)
    xp = namespace(x)
    with errstate(xp, over="ignore", invalid="ignore", divide="ignore"):
        return stablemax.s(quantize(x, fmt), Rounding(fmt, xp=xp), eps)


def collapse_mask(
    z,
    fmt,
    *,
    kind: str = "softmax",
    order: str = "pairwise",
    eps: float = 0.0,
    elementary: str = "correct",
    temperature: float = 1.0,
):
    """Rows whose max-shifted normaliser is exactly 1 in ``fmt`` (Softmax Collapse).

    Softmax: ``Σ_k exp(z_k - max z) == 1``; StableMax: ``Σ_k s(z_k) / s(max z) == 1``; every
    term and partial sum rounded to ``fmt``, summed in ``order``. A row with a NaN or ``+inf``
    logit, or with every logit ``-inf``, is not collapsed (its sum is NaN); other ``-inf``
    logits contribute 0; a row of one finite class always is collapsed.

    Parameters
    ----------
    z : ndarray, shape (N, C)
    fmt : str or Format
    kind : {"softmax", "stablemax"} ("softmax_stable" and "mse" measure the softmax sum)
    elementary : {"correct", "libm"}
        How ``exp`` is evaluated (:mod:`numstab.elementary`).
    temperature : float
        The sums are those of ``RN(z / T)``.

    Returns
    -------
    ndarray of bool, shape (N,)
    """
    z, r = _logits_and_rounding(z, kind, fmt, order, eps, elementary)
    z = _scaled(z, _temperature(temperature, r.fmt), r)
    with errstate(r.xp, over="ignore", invalid="ignore", divide="ignore"):
        terms = LOSSES[kind].collapse_terms(z, r, eps)
    return r.sum(terms) == 1


def row_verdicts(
    z,
    labels,
    fmt,
    *,
    kind: str = "softmax",
    order: str = "pairwise",
    eps: float = 0.0,
    elementary: str = "correct",
    row_max=None,
    keep=None,
):
    """Per row: is it collapsed, is its loss 0, is its target gradient 0, and the row sum of
    its logit gradient -- the verdicts of :func:`loss_forward` and :func:`loss_backward`
    (``dl = 1``), bit for bit, at less cost where the loss module knows a shortcut
    (softmax: ``verdicts`` forms the target column only, and the row sum only where the row
    collapsed; with ``keep``, the rows proved not collapsed from a few terms stop there).

    Parameters
    ----------
    z : ndarray, shape (N, C)
    labels : int ndarray, shape (N,), each in [0, C)
    fmt, kind, order, eps, elementary : as :func:`loss_forward` (no temperature, no smoothing)
    row_max : ndarray (N,), optional
        ``max z`` of each row of the logits as rounded to ``fmt`` (the carrier dtype), when
        the caller has it already (softmax uses it; it must be those values).
    keep : int ndarray, optional
        Softmax: flat indices into ``z`` of the entries whose terms are evaluated first
        (:func:`numstab.losses.softmax.top_entries`, e.g. of the previous step's batch);
        a row whose normaliser they already push above 1 is not collapsed, and its loss and
        target gradient are not 0 (:func:`numstab.losses.softmax.open_rows` has the proof),
        so it is not evaluated further. The results are the same for every ``keep``.

    Returns
    -------
    collapsed, zero_loss, zero_target_grad : bool arrays (N,)
    row_sum : float64 array (N,)
        ``Σ_k ∂ℓ/∂z_k`` (0 in exact arithmetic); NaN where the module does not form it
        (softmax: rows that did not collapse, whose sum is rounding residual only).
    """
    mod = LOSSES[check_choice(kind, LOSS_KINDS, "loss kind")]
    if not hasattr(mod, "verdicts"):
        loss, cache = loss_forward(
            z, labels, kind=kind, fmt=fmt, order=order, eps=eps, elementary=elementary
        )
        xp = namespace(loss)
        g = loss_backward(cache, 1.0)
        collapsed = collapse_mask(z, fmt, kind=kind, order=order, eps=eps, elementary=elementary)
        zero_grad = take_at(g, cache.labels) == 0
        return collapsed, loss == 0, zero_grad, xp.sum(xp.astype(g, xp.float64), axis=1)
    z, r = _logits_and_rounding(z, kind, fmt, order, eps, elementary)
    labels = _checked_labels(labels, z, r.xp)
    if keep is not None and labels.shape[0] and int(r.xp.max(labels)) >= z.shape[1]:
        # rows proved open by ``keep`` skip the gather that finds a bad label otherwise
        raise _label_error(labels, z, r.xp)
    with (
        _label_range(labels, z, r.xp),
        errstate(r.xp, invalid="ignore", over="ignore", divide="ignore"),
    ):
        if row_max is not None:
            row_max = r.xp.asarray(row_max, dtype=z.dtype)
            if tuple(row_max.shape) != (z.shape[0],):
                raise ValueError(
                    f"row_max must have shape ({z.shape[0]},), got {tuple(row_max.shape)}"
                )
        return mod.verdicts(z, labels, r, row_max, _checked_keep(keep, z))


def _checked_labels(labels, z, xp):
    """``labels`` in ``xp`` (no copy when already there): integers of shape (N,)."""
    labels = xp.asarray(labels)
    if not is_int(labels.dtype, labels):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    if tuple(labels.shape) != (z.shape[0],):
        raise ValueError(
            f"labels must have shape ({z.shape[0]},) to match the logits {tuple(z.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    return labels


def _checked_keep(keep, z):
    """``keep`` as NumPy flat indices into ``z`` (None stays None)."""
    if keep is None:
        return None
    keep = np.asarray(keep)
    if keep.ndim != 1 or not is_int(keep.dtype, keep):
        raise TypeError(f"keep must be a 1-D integer array, got {keep.dtype} {keep.shape}")
    if keep.size and not (0 <= int(keep.min()) and int(keep.max()) < math.prod(z.shape)):
        raise ValueError(f"keep must index the {math.prod(z.shape)} entries of the logits")
    return keep


def _label_error(labels, z, xp) -> ValueError:
    return ValueError(
        f"labels must lie in [0, {z.shape[1]}) (the number of classes), got range "
        f"[{int(xp.min(labels))}, {int(xp.max(labels))}]"
    )


@contextlib.contextmanager
def _label_range(labels, z, xp):
    """A label ``>= C`` (found by the gather, not by a scan on this hot path) as ValueError."""
    try:
        yield
    except IndexError:
        raise _label_error(labels, z, xp) from None


def _logits_and_rounding(z, kind, fmt, order, eps, elementary):
    """The entries' common checks: the logits rounded to ``fmt`` (2-D, with classes) and the
    :class:`Rounding` of the loss."""
    fmt = check_format(fmt)
    check_choice(kind, LOSS_KINDS, "loss kind")
    check_order(order)
    check_mode(elementary)
    if kind == "stablemax":
        check_eps(eps)
    xp = namespace(z)
    with errstate(xp, invalid="ignore", over="ignore", divide="ignore"):
        z = quantize_into(z, fmt)
    _check_logits_shape(z)
    return z, Rounding(fmt, order, elementary, xp)


def _temperature(t, fmt: Format) -> float:
    """``T`` rounded to ``fmt``: a finite number > 0 that stays so once rounded."""
    if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Real):
        raise TypeError(f"temperature must be a real number > 0, got {t!r}")
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {t!r}")
    with np.errstate(over="ignore", under="ignore"):
        tq = float(quantize(np.float64(t), fmt))
    if not (math.isfinite(tq) and tq > 0):
        raise ValueError(f"temperature {t!r} rounds to {tq!r} in {fmt.name}")
    return tq


def _smoothing(ls, kind: str, fmt: Format) -> float:
    """``ε`` rounded to ``fmt``: a number in [0, 1), non-zero only for a loss in SMOOTHABLE
    (and then still non-zero once rounded)."""
    if isinstance(ls, (bool, np.bool_)) or not isinstance(ls, numbers.Real):
        raise TypeError(f"label_smoothing must be a real number in [0, 1), got {ls!r}")
    if not (0 <= ls < 1):
        raise ValueError(f"label_smoothing must lie in [0, 1), got {ls!r}")
    if ls and kind not in SMOOTHABLE:
        raise ValueError(
            f"label smoothing is defined for the {', '.join(SMOOTHABLE)} loss, not {kind!r}"
        )
    with np.errstate(under="ignore"):
        lsq = float(quantize(np.float64(ls), fmt))
    if ls and not lsq:
        raise ValueError(f"label_smoothing {ls!r} rounds to 0 in {fmt.name}")
    return lsq


def _scaled(z, t: float, r):
    """``RN(z / T)`` (``z`` itself when ``T`` is 1)."""
    return z if t == 1 else r.div(z, t)


def _check_logits_shape(z):
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(
            f"logits must be 2-D (samples, classes) with at least one class, got shape "
            f"{tuple(z.shape)}"
        )


def loss_forward(
    z,
    labels,
    *,
    kind: str = "softmax",
    fmt="float32",
    order: str = "pairwise",
    eps: float = 0.0,
    elementary: str = "correct",
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
):
    """Per-sample loss in a format: a cross-entropy, or MSE on one-hot targets.

    Parameters
    ----------
    z : ndarray, shape (N, C)
        Logits (any float dtype; rounded to ``fmt`` first, exactly widened if narrower).
    labels : int ndarray, shape (N,)
    kind : {"softmax", "stablemax", "softmax_stable", "mse"}
        The loss module of :data:`LOSSES` (its docstring has the formula and each rounding).
    fmt : str or Format
        Loss format (the paper's ``softmax_precision``).
    order : {"pairwise", "sequential", "wide", "sorted"}
        Summation order of the normaliser.
    eps : float
        StableMax denominator epsilon (``softmax`` kinds ignore it).
    elementary : {"correct", "libm"}
        How ``exp``/``log``/``log1p`` are evaluated (:mod:`numstab.elementary`): correctly
        rounded to ``fmt``, or the array library's functions (older runs' bits).
    temperature : float
        ``T > 0``: the loss of ``RN(z / T)`` (``T`` rounded to ``fmt``; 1: none).
    label_smoothing : float
        ``ε`` in [0, 1) (softmax only): targets ``ε/C + (1 - ε)·onehot(y)``, as PyTorch's
        ``cross_entropy(label_smoothing=ε)``.

    Returns
    -------
    loss : ndarray, shape (N,), carrier dtype of ``fmt``
        ``-log p_y`` (MSE: ``Σ_k (z_k - δ_ky)² / C``); exactly 0 for collapsed softmax rows
        without label smoothing. ``inf``/NaN logits give NaN or inf
        losses as IEEE arithmetic says (the training loop stops on them; no warning).
    cache : LossCache

    Raises
    ------
    TypeError
        Logits of a non-floating dtype, labels not integers, ``eps`` not a real number.
    ValueError
        Logits not 2-D or without classes, labels not of shape (N,), a label ``>= C``, an
        unknown kind / format / order, ``eps`` negative or not finite. Labels are not scanned
        for negative values on this hot path: a negative label counts from the end, as NumPy
        indexing does (the Dataset and :mod:`numstab.audit` validate labels).
    """
    z, r = _logits_and_rounding(z, kind, fmt, order, eps, elementary)
    t = _temperature(temperature, r.fmt)
    ls = _smoothing(label_smoothing, kind, r.fmt)
    xp = r.xp
    labels = _checked_labels(labels, z, xp)
    with (
        _label_range(labels, z, xp),
        errstate(xp, invalid="ignore", over="ignore", divide="ignore"),
    ):
        loss, total, probs, state = LOSSES[kind].forward(_scaled(z, t, r), labels, r, eps)
        if ls:
            loss = LOSSES[kind].smoothed(loss, state, r, ls)
    cache = LossCache(
        kind=kind,
        fmt=r.fmt,
        order=order,
        labels=labels,
        normaliser=total,
        probs=probs,
        state=state,
        elementary=elementary,
        temperature=t,
        label_smoothing=ls,
    )
    return loss, cache


def loss_backward(cache: LossCache, dloss):
    """Logit gradient of :func:`loss_forward`, scaled by the upstream per-sample gradient.

    Parameters
    ----------
    cache : LossCache
    dloss : float or ndarray (N,)
        ``∂(total)/∂loss_i``: ``1/N`` for a mean (rounded to the loss format), 1 for a sum.

    Returns
    -------
    ndarray, shape (N, C), loss carrier dtype
        With ``dl = RN(dloss)`` and ``p`` the forward's rounded probabilities: the loss
        module's ``backward`` (each entry one correct rounding of the exact value unless its
        docstring says otherwise), then ``RN(g / T)`` under a temperature. Non-finite
        ``dloss`` gives NaN where the exact product is not defined.
    """
    if not isinstance(cache, LossCache):
        raise TypeError(
            f"cache must be the LossCache returned by loss_forward, got {type(cache).__name__}"
        )
    n = cache.probs.shape[0]
    xp = namespace(cache.probs)
    host = not hasattr(dloss, "dtype") or isinstance(dloss, (np.ndarray, np.generic))
    d = np.asarray(dloss) if host else dloss
    if not (is_float(d.dtype, d) or is_int(d.dtype, d)):
        raise TypeError(
            f"dloss must be a real number or a real array of shape ({n},), got {dloss!r:.80} "
            f"(dtype {d.dtype})"
        )
    if tuple(d.shape) not in ((), (n,)):
        raise ValueError(f"dloss must be a scalar or have shape ({n},), got shape {tuple(d.shape)}")
    with np.errstate(over="ignore"), errstate(xp, over="ignore"):
        d = np.asarray(d, dtype=np.float64) if host else d
        d = xp.asarray(d, dtype=xp_dtype(xp, np.float64))
        dl = quantize(xp.broadcast_to(d, (n,)), cache.fmt)[:, None]
    r = Rounding(cache.fmt, cache.order, cache.elementary, xp)
    module = LOSSES[cache.kind]
    with errstate(xp, invalid="ignore", over="ignore", divide="ignore"):
        if cache.label_smoothing:
            g = module.backward_smoothed(cache, dl, r)
        else:
            g = module.backward(cache, dl, r)
        return _scaled(g, cache.temperature, r)


def reduce_loss(loss, reduction: str = "mean"):
    """Reduce per-sample losses: ``mean`` (accumulated in float64, as a report; training uses
    ``dloss = fl(1/N)``) or ``none``.

    ``loss`` is a 1-D array of real numbers (a list is converted); the mean of no losses is
    NaN, and NaN / inf losses give NaN / inf, without warnings. Other dtypes raise TypeError,
    other shapes ValueError."""
    check_choice(reduction, REDUCTIONS, "reduction")
    if not hasattr(loss, "dtype"):
        loss = np.asarray(loss)
    if not (is_float(loss.dtype, loss) or is_int(loss.dtype, loss)):
        raise TypeError(f"loss must be an array of real numbers, got dtype {loss.dtype}")
    if loss.ndim != 1:
        raise ValueError(f"loss must be 1-D (per-sample losses), got shape {tuple(loss.shape)}")
    if reduction == "none":
        return loss
    xp = namespace(loss)
    if loss.shape[0] == 0:
        return np.float64(np.nan)
    wide = xp.astype(loss, xp_dtype(xp, np.float64))
    with errstate(xp, over="ignore", invalid="ignore"):
        mean = xp.mean(wide)
        if bool(xp.isinf(mean)) and bool(xp.all(xp.isfinite(wide))):
            # The sum overflowed, not the mean: the same sum scaled by 2**-64 (exactly).
            mean = xp.mean(wide * 2.0**-64) * 2.0**64
    return mean
