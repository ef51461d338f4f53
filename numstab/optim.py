"""Optimizers whose floating-point arithmetic is explicit: SGD, Adam, AdamW, ⊥Grad, normalized LR.

Every optimizer reproduces the *operation order* of PyTorch's single-tensor CPU implementation
(``foreach=False``, ``fused=False``, ``maximize=False``, ``amsgrad=False``), one PyTorch
operation at a time, so that a float32 or float64 run follows the same rounding sequence as
``torch.optim`` on the same inputs (see *Differences from PyTorch* below for what cannot match).

Short version: each PyTorch operation is evaluated in its compute dtype and rounded once to
its destination's format; Python scalars are formed as PyTorch forms them; special values follow
IEEE. An Adam ``eps`` that underflows in the state format is refused (``ValueError``); an ``lr``
or decay factor lost to rounding gives a ``UserWarning``. The arithmetic model, the hazards,
the differences from PyTorch, backends and checkpoints are described in ``docs/optim.md``.

Examples
--------
>>> import numpy as np
>>> opt = AdamW(lr=0.01, betas=(0.9, 0.99), eps=1e-25, storage_format="float32")
>>> params = {"W": np.array([1.0, -2.0], dtype=np.float32)}
>>> state = opt.init_state(params)
>>> opt.step(params, {"W": np.array([0.5, 0.0], dtype=np.float32)}, state)
>>> params["W"], state.step
(array([ 0.9899, -1.9998], dtype=float32), 1)
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np

from numstab import kernels
from numstab.backend import (
    array_module,
    common_namespace,
    copy_to,
    has_bit_views,
    inplace_ops,
    is_numpy,
    namespace,
    new_array,
    to_numpy,
    vdot,
    xp_dtype,
)
from numstab.precision import Format, get_format, quantize

__all__ = [
    "OPTIMIZER_NAMES",
    "PERP_GRAD_SCOPES",
    "SGD",
    "Adam",
    "AdamW",
    "NormalizedLR",
    "OptState",
    "PerpGrad",
    "global_grad_norm",
    "load_state_arrays",
    "make_optimizer",
    "perp_grad_global",
    "perp_grad_tensor",
    "state_arrays",
]

#: Names accepted by :func:`make_optimizer`.
OPTIMIZER_NAMES = ("sgd", "adam", "adamw")
#: Scopes of :class:`PerpGrad`.
PERP_GRAD_SCOPES = ("tensor", "global")


# --- state ------------------------------------------------------------------------------------


@dataclass(eq=False)
class OptState:
    """Mutable optimizer state: the step count and the state tensors.

    Attributes
    ----------
    step : int
        Number of updates done so far (PyTorch's ``state["step"]``; all tensors share it).
    tensors : dict[str, dict[str, ndarray]]
        Per parameter name, the state tensors by name (``"momentum_buffer"`` for SGD with
        momentum; ``"exp_avg"`` and ``"exp_avg_sq"`` for Adam/AdamW), in the state format's
        carrier dtype, on the parameters' backend and device. SGD without momentum has an
        empty dict per parameter.
    storage_format, state_format : str
        Formats of the parameters and of the state tensors (canonical names).
    scratch : dict
        Preallocated temporaries, rebuilt on demand; not part of a checkpoint.
    last_update : dict[str, ndarray]
        After a step: per parameter, the *intended* update ``-lr * g`` (SGD) or
        ``(-step_size * m) / denom`` (Adam) in the compute dtype, before it is added to the
        parameter and the sum rounded. Where it is non-zero but the parameter did not change,
        the update was absorbed. These are scratch buffers, overwritten by the next step (copy
        them to keep them); empty before the first step and after a step that
        :class:`NormalizedLR` skipped.
    """

    step: int
    tensors: dict[str, dict[str, np.ndarray]]
    storage_format: str
    state_format: str
    scratch: dict = field(default_factory=dict, repr=False)
    last_update: dict = field(default_factory=dict, repr=False)

    def arrays(self) -> dict[str, np.ndarray]:
        """The state tensors flattened for a checkpoint; see :func:`state_arrays`."""
        return state_arrays(self)

    def buffer(self, name: str, key: str, like, dtype) -> np.ndarray:
        """A scratch array shaped like ``like`` for parameter ``name`` (allocated once, on
        ``like``'s backend and device; ``dtype`` a NumPy dtype; contents undefined)."""
        dtype = np.dtype(dtype)
        k = (name, key, dtype.str, tuple(like.shape))
        buf = self.scratch.get(k)
        if buf is None:
            buf = self.scratch[k] = new_array("empty", like, dtype)
        return buf


def state_arrays(state: OptState) -> dict[str, np.ndarray]:
    """Flatten an :class:`OptState`'s tensors for a checkpoint.

    Parameters
    ----------
    state : OptState

    Returns
    -------
    dict[str, ndarray]
        ``"<param>/<tensor>"`` -> a host (NumPy) copy of the tensor, in the state carrier dtype
        (so bfloat16 state is saved as its exact float32 values and ``.npz`` files need no
        pickle). The step count is
        not included: save ``state.step`` beside it and pass it to ``load_state_arrays``.
    """
    return {
        f"{pname}/{tname}": np.array(to_numpy(arr), copy=True)
        for pname, tensors in state.tensors.items()
        for tname, arr in tensors.items()
    }


def load_state_arrays(
    optimizer, arrays: dict[str, np.ndarray], step: int, storage_format=None, *, like=None
) -> OptState:
    """Rebuild an :class:`OptState` from :func:`state_arrays` output (exact round trip).

    Same as ``optimizer.load_state_arrays(arrays, step, storage_format)``.
    """
    return optimizer.load_state_arrays(arrays, step, storage_format=storage_format, like=like)


# --- arithmetic helpers -----------------------------------------------------------------------


_EMULATED: dict[str, bool] = {}


def _emulated(fmt: Format) -> bool:
    """``fmt.is_emulated``, cached by name (the property costs more than a NumPy op on the
    small tensors of the hot path)."""
    e = _EMULATED.get(fmt.name)
    if e is None:
        e = _EMULATED[fmt.name] = bool(fmt.is_emulated)
    return e


def _round_inplace(x: np.ndarray, fmt: Format) -> None:
    """Round ``x`` (in ``fmt``'s carrier) to ``fmt`` in place; nothing to do for native formats."""
    if _emulated(fmt):
        x[...] = quantize(x, fmt)


def _assign(dest: np.ndarray, src: np.ndarray, fmt: Format) -> None:
    """``dest <- round(src, fmt)``: one rounding of an operation's result to the destination."""
    if src is dest:
        _round_inplace(dest, fmt)
    elif _emulated(fmt):
        dest[...] = quantize(src, fmt)
    elif isinstance(dest, np.ndarray) or src.dtype == dest.dtype:
        dest[...] = src  # NumPy's cast: round to nearest even (exact when src is narrower)
    else:  # the standard's __setitem__ wants one dtype: the same cast, explicitly
        dest[...] = namespace(dest).astype(src, dest.dtype)


def _fused(k: _Kernel) -> bool:
    """Whether a step's arithmetic can run in one fused kernel: parameters and state of one
    native dtype (float32 or float64, no emulated rounding), on NumPy."""
    return k.ops is np and k.pdt == k.sdt and not (_emulated(k.sto) or _emulated(k.st))


def _target(dest: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """Where the last primitive of an in-place operation writes: ``dest`` if it can hold the
    compute dtype (then rounding happens in place), else the wider temporary."""
    return dest if dest.dtype == tmp.dtype else tmp


def _scale(x, c, fmt: Format, ops) -> None:
    """``x <- round(x * c, fmt)`` in place (``mul_``; ``c`` a scalar of ``x``'s dtype)."""
    ops.multiply(x, c, out=x)
    _round_inplace(x, fmt)


def _accumulate(dest, t, fmt: Format, ops) -> None:
    """``dest <- round(dest + t, fmt)``: the sum in ``t``'s dtype (``dest``'s or wider), one
    rounding (the last primitive of ``add_``/``lerp_``/``addcmul_``); ``t`` is scratch."""
    out = _target(dest, t)
    ops.add(dest, t, out=out)
    _assign(dest, out, fmt)


def _l2_grad(name: str, p, g, wd: float, state: OptState, k: _Kernel) -> np.ndarray:
    """``grad.add(param, alpha=wd)``: ``round(g + wd * p, storage)``, both primitives in the
    parameters' carrier dtype; a scratch array (``g`` is not modified)."""
    gw = state.buffer(name, "grad", p, k.pdt)
    k.ops.multiply(p, k.pdt.type(wd), out=gw)
    k.ops.add(g, gw, out=gw)
    _round_inplace(gw, k.sto)
    return gw


def _apply_update(name: str, p, upd, state: OptState, k: _Kernel, cd: np.dtype) -> None:
    """``p <- round(p + upd, storage)`` (the last primitive of ``add_``/``addcdiv_``), keeping
    ``upd`` (dtype ``cd``) intact and recording it as ``state.last_update[name]``."""
    out = p if p.dtype == upd.dtype else state.buffer(name, "sum", p, cd)
    k.ops.add(p, upd, out=out)
    _assign(p, out, k.sto)
    state.last_update[name] = upd


def _scalar(xp, value, dtype: np.dtype):
    """A scalar operand for array arithmetic in ``dtype``: a NumPy scalar on NumPy (strong:
    it keeps ``dtype`` against any array), a Python float elsewhere (the standard converts it
    to the other operand's dtype, which is ``dtype`` wherever this is used)."""
    return dtype.type(value) if is_numpy(xp) else float(value)


def _astype(xp, a, dtype: np.dtype):
    """``a`` as a new array of NumPy dtype ``dtype`` (the method on NumPy: the function
    ``numpy.astype`` costs 4x more per call)."""
    if isinstance(a, np.ndarray):
        return a.astype(dtype)
    return xp.astype(a, xp_dtype(xp, dtype))


def _reshape(xp, a, shape):
    if isinstance(a, np.ndarray):
        return a.reshape(shape)
    return xp.reshape(a, tuple(shape))


def _flat(xp, a, acc: np.dtype):
    """``a`` converted to ``acc`` (a new array, exact for a wider ``acc``) and flattened."""
    return _reshape(xp, _astype(xp, a, acc), (-1,))


def _host_scalar(x, dtype: np.dtype):
    """A 0-d value as a NumPy scalar of ``dtype`` (read back from a device if need be)."""
    return x if isinstance(x, np.generic) else dtype.type(to_numpy(x)[()])


def _one_namespace(*dicts):
    """The one namespace of all arrays in ``dicts`` (dicts of arrays; other values skipped);
    TypeError for a mix of backends (:func:`numstab.backend.common_namespace`)."""
    arrays = [a for d in dicts if isinstance(d, dict) for a in d.values()]
    try:
        return common_namespace(*arrays)
    except TypeError as exc:
        raise TypeError(
            "params, grads and optimizer state must be arrays of one backend (a state "
            f"rebuilt from host arrays goes to the parameters' with like=params): {exc}"
        ) from None


def _acc_dtype(*fmts: Format) -> np.dtype:
    """Accumulation dtype of dot products and norms: float64, or longdouble if a format is."""
    if any(f.carrier == np.longdouble for f in fmts):
        return np.dtype(np.longdouble)
    return np.dtype(np.float64)


# --- validation and hazard reports ------------------------------------------------------------


def _check_number(name: str, value, lo: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value} (must be finite)")
    if lo is not None and value < lo:
        raise ValueError(f"Invalid {name} value: {value} (must be >= {lo})")
    return value


def _check_lr(lr) -> float:
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a real number, got {lr!r} ({type(lr).__name__})")
    lr = float(lr)
    if not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr} (must be finite and >= 0)")
    return lr


def _check_betas(betas) -> tuple[float, float]:
    try:
        b = tuple(betas)
    except TypeError:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}") from None
    if len(b) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    out = []
    for i, beta in enumerate(b):
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
            raise TypeError(f"beta parameter at index {i} must be a real number, got {beta!r}")
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
        out.append(beta)
    return out[0], out[1]


def _underflows(value: float, fmt: Format) -> bool:
    """True if a positive ``value`` rounds to 0 in ``fmt`` (to nearest, its subnormal rule)."""
    if value <= 0.0:
        return False
    return float(quantize(np.float64(value), fmt, rounding="nearest")) == 0.0


def _warn(message: str) -> None:
    """``UserWarning`` attributed to the first caller outside this module (and outside the
    ``__init__`` that ``dataclasses`` generates)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (
        frame.f_code.co_filename == __file__
        or (frame.f_code.co_filename == "<string>" and frame.f_code.co_name == "__init__")
    ):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _warn_lr(opt_name: str, lr: float, storage: Format) -> None:
    if _underflows(lr, storage):
        _warn(
            f"{opt_name} lr={lr!r} underflows to 0 in {storage.name} (smallest subnormal "
            f"{float(storage.smallest_subnormal):.3g}): updates of size ~lr are below the "
            f"format's smallest subnormal and below half an ulp of every non-zero parameter, "
            f"so they are absorbed and the parameters stop changing"
        )


def _warn_decay(what: str, factor: float, fmt: Format, consequence: str) -> None:
    """Warn when ``x * factor`` rounds back to ``x`` in ``fmt`` (``0 < 1 - factor < u``)."""
    gap = 1.0 - factor
    u = fmt.unit_roundoff
    if 0.0 < gap < u:
        if gap <= u / 2:
            scope = "every value"
        else:
            scope = f"values whose significand is below u/(1 - factor) = {u / gap:.3g}"
        _warn(
            f"{what}: 1 - factor = {gap:.3g} is below the unit roundoff of {fmt.name} "
            f"(u = 2**-{fmt.precision} = {u:.3g}), so x * {factor!r} rounds back to x for "
            f"{scope}: {consequence}"
        )


# --- the optimizers ---------------------------------------------------------------------------


class _Kernel(NamedTuple):
    """What one step's arithmetic needs, resolved once by the public ``step``'s checks."""

    ops: Any  # numstab.backend.inplace_ops of the arrays' namespace
    sto: Format  # storage format: parameters, gradients and gradient-like temporaries
    st: Format  # state format: momentum buffer, exp_avg, exp_avg_sq
    pdt: np.dtype  # carrier dtype of the parameters and gradients
    sdt: np.dtype  # carrier dtype of the state
    wide: np.dtype  # their promotion: the compute dtype of an operation mixing them


class _Stepper:
    """Every optimizer and wrapper: the public, checked ``step`` over the private ``_apply``.

    ``_check_step`` validates the arguments of a step once and returns its :class:`_Kernel`;
    ``_apply(params, grads, state, lr, k)`` is the arithmetic on checked arrays (``lr=None``:
    the optimizer's own), which wrappers call on their base without checking again.
    """

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], state: OptState):
        """One update of every parameter, in place.

        Parameters
        ----------
        params : dict[str, ndarray]
            Updated in place (storage carrier dtype; for float16/bfloat16 the values must be
            representable in the format, as the model's own rounding leaves them).
        grads : dict[str, ndarray]
            Same keys, shapes and dtype; read only, never modified. Like ``params`` they are
            assumed representable in the storage format (not re-rounded here).
        state : OptState
            From :meth:`init_state` or :meth:`load_state_arrays`; advanced in place
            (``state.step += 1``).

        Raises
        ------
        TypeError, ValueError
            Wrong dtypes, keys or shapes, or a state made for other formats.
        """
        self._apply(params, grads, state, None, self._check_step(params, grads, state))


class _Optimizer(_Stepper):
    """Shared machinery: format resolution, state creation, checkpoint I/O, step bookkeeping."""

    name: ClassVar[str] = ""
    storage_format: Format | None
    state_format: Format | None

    def _tensor_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _check_hazards(self, storage: Format, state: Format) -> None:
        raise NotImplementedError

    def _update(self, name, p, g, tensors, state: OptState, lr: float, k: _Kernel) -> None:
        raise NotImplementedError

    def _post_init_formats(self) -> None:
        sto = None if self.storage_format is None else get_format(self.storage_format)
        st = None if self.state_format is None else get_format(self.state_format)
        object.__setattr__(self, "storage_format", sto)
        object.__setattr__(self, "state_format", st)
        if sto is not None:
            self._check_combination(sto, st or sto)
            self._check_hazards(sto, st or sto)

    @staticmethod
    def _check_combination(storage: Format, state: Format) -> None:
        wide = {storage.carrier, state.carrier}
        if np.dtype(np.longdouble) in wide and (storage.is_emulated or state.is_emulated):
            raise ValueError(
                f"storage format {storage.name} with state format {state.name} is not supported: "
                "rounding longdouble results to a 16-bit format would be a double rounding"
            )

    def formats(self, storage_format=None) -> tuple[Format, Format]:
        """The (storage, state) formats, given the storage format if the optimizer has none."""
        if storage_format is not None:
            sto = get_format(storage_format)
            if self.storage_format is not None and sto != self.storage_format:
                raise ValueError(
                    f"storage format {sto.name} differs from the optimizer's "
                    f"storage_format={self.storage_format.name}"
                )
        elif self.storage_format is not None:
            sto = self.storage_format
        else:
            raise ValueError(
                f"{type(self).__name__} needs the parameters' storage format: pass "
                "storage_format= to the constructor or to init_state/load_state_arrays"
            )
        st = self.state_format or sto
        return sto, st

    def _resolve(self, storage_format) -> tuple[Format, Format]:
        sto, st = self.formats(storage_format)
        if self.storage_format is None:  # hazards not reported at construction
            self._check_combination(sto, st)
            self._check_hazards(sto, st)
        return sto, st

    def init_state(self, params: dict[str, np.ndarray], storage_format=None) -> OptState:
        """Fresh state (step 0, zero state tensors) for ``params``.

        Parameters
        ----------
        params : dict[str, ndarray]
            Parameters in the storage format's carrier dtype. The state tensors are created
            on their backend and device (NumPy, CuPy, or an array-API namespace).
        storage_format : str or Format, optional
            Needed only when the optimizer was built without one.
        """
        sto, st = self._resolve(storage_format)
        _check_dict("params", params)
        xp = _one_namespace(params)
        _check_backend(xp, sto, "params")
        _check_backend(xp, st, "optimizer state")
        _check_arrays("params", params, sto, xp)
        tensors = {
            name: {t: new_array("zeros", p, st.carrier) for t in self._tensor_names()}
            for name, p in params.items()
        }
        return OptState(0, tensors, sto.name, st.name)

    def load_state_arrays(
        self, arrays: dict[str, np.ndarray], step: int, storage_format=None, *, like=None
    ) -> OptState:
        """Rebuild a state from :func:`state_arrays` output and its step count (exact).

        Parameters
        ----------
        arrays : dict[str, array]
            ``"<param>/<tensor>"`` -> tensor (NumPy arrays from a checkpoint, or arrays of
            any backend); copied, never kept.
        step : int
        storage_format : str or Format, optional
            Needed only when the optimizer was built without one.
        like : array or dict of arrays, optional
            Put the state tensors on this array's backend and device (pass the parameters
            to continue a CuPy or array-API run from a host checkpoint). Default: each
            tensor stays on the backend it comes from.

        Raises
        ------
        ValueError
            A key that is not ``"<param>/<tensor>"`` with a tensor this optimizer keeps, a
            parameter missing one of its tensors, a dtype other than the state carrier, values
            not representable in the state format, or a negative step.
        """
        sto, st = self._resolve(storage_format)
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        if isinstance(like, dict):
            like = next(iter(like.values()), None)
        names = self._tensor_names()
        tensors: dict[str, dict[str, np.ndarray]] = {}
        for key, arr in arrays.items():
            pname, sep, tname = key.rpartition("/")
            if not sep or not pname or tname not in names:
                raise ValueError(
                    f"unexpected state array {key!r}: {type(self).__name__} keeps "
                    f"{', '.join(names) or 'no tensors'} per parameter, keyed '<param>/<tensor>'"
                )
            xs = namespace(arr)  # NumPy for NumPy arrays and anything else it converts
            arr = xs.asarray(arr)
            if arr.dtype != xp_dtype(xs, st.carrier):
                raise ValueError(
                    f"state array {key!r} has dtype {arr.dtype}, expected {st.carrier} "
                    f"(carrier of state format {st.name})"
                )
            if _emulated(st):
                q = quantize(arr, st)
                if not array_module(arr).array_equal(q, arr, equal_nan=True):
                    raise ValueError(
                        f"state array {key!r} holds values not representable in {st.name}"
                    )
            tensors.setdefault(pname, {})[tname] = copy_to(arr, like)
        for pname, ts in tensors.items():
            missing = [t for t in names if t not in ts]
            if missing:
                raise ValueError(f"state of parameter {pname!r} lacks {', '.join(missing)}")
        return OptState(int(step), tensors, sto.name, st.name)

    def _check_step(self, params, grads, state: OptState) -> _Kernel:
        """Validate one step's arguments (formats of the state, backend, keys, dtypes,
        shapes); return what its arithmetic needs."""
        sto, st = get_format(state.storage_format), get_format(state.state_format)
        if self.storage_format is not None and sto != self.storage_format:
            raise ValueError(
                f"state was made for storage format {sto.name}, the optimizer has "
                f"{self.storage_format.name}"
            )
        if st != (self.state_format or sto):
            raise ValueError(
                f"state was made for state format {st.name}, the optimizer's is "
                f"{(self.state_format or sto).name}"
            )
        _check_dict("params", params)
        _check_dict("grads", grads, like=params)
        xp = _one_namespace(params, grads, *state.tensors.values())
        _check_backend(xp, sto, "params")
        _check_backend(xp, st, "optimizer state")
        _check_arrays("params", params, sto, xp)
        _check_arrays("grads", grads, sto, xp, like=params)
        if self._tensor_names():
            for name in params:
                if name not in state.tensors:
                    raise KeyError(f"optimizer state has no tensors for parameter {name!r}")
        # NumPy dtypes of the parameters (and gradients) and of the state: after the checks
        # above, the arrays' own dtypes
        pdt, sdt = sto.carrier, st.carrier
        wide = pdt if pdt == sdt else np.result_type(pdt, sdt)
        return _Kernel(inplace_ops(xp), sto, st, pdt, sdt, wide)

    def _apply(self, params, grads, state: OptState, lr: float | None, k: _Kernel) -> None:
        """Update every parameter (checked arguments; ``lr`` None: ``self.lr``)."""
        lr = self.lr if lr is None else lr
        for name, p in params.items():
            self._update(name, p, grads[name], state.tensors.get(name), state, lr, k)
        state.step += 1

    def _format_dict(self) -> dict[str, Any]:
        sto = self.storage_format
        st = self.state_format or sto
        return {
            "storage_format": None if sto is None else sto.name,
            "state_format": None if st is None else st.name,
        }


def _check_backend(xp, fmt: Format, what: str) -> None:
    """TypeError if ``fmt`` is emulated and ``xp`` cannot round on bit patterns."""
    if _emulated(fmt) and not has_bit_views(xp):
        raise TypeError(
            f"format {fmt.name} (of the {what}) is emulated by rounding on the bit pattern, "
            f"which needs NumPy or CuPy arrays; these are {getattr(xp, '__name__', xp)} "
            "arrays (float32 and float64 work on every backend)"
        )


def _check_dict(what: str, arrays, like=None) -> None:
    """``arrays`` is a dict (with ``like``'s keys, if given)."""
    if not isinstance(arrays, dict):
        raise TypeError(f"{what} must be a dict of arrays, got {type(arrays).__name__}")
    if like is not None and arrays.keys() != like.keys():
        extra = sorted(set(arrays) - set(like))
        missing = sorted(set(like) - set(arrays))
        raise ValueError(f"{what} keys differ from params: missing {missing}, extra {extra}")


def _check_arrays(what: str, arrays: dict, fmt: Format, xp, like=None) -> None:
    """Every array has ``fmt``'s carrier dtype on ``xp`` (and ``like``'s shapes, if given)."""
    carrier = xp_dtype(xp, fmt.carrier)
    for name, a in arrays.items():
        if getattr(a, "dtype", None) != carrier:
            raise TypeError(
                f"{what}[{name!r}] has dtype {getattr(a, 'dtype', type(a).__name__)}, expected "
                f"{fmt.carrier} (carrier of storage format {fmt.name})"
            )
        if like is not None and a.shape != like[name].shape:
            raise ValueError(
                f"{what}[{name!r}] has shape {a.shape}, params[{name!r}] has {like[name].shape}"
            )


@dataclass(frozen=True)
class SGD(_Optimizer):
    r"""Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    For each parameter ``p`` with gradient ``g`` (step ``t = 1, 2, ...``)::

        g <- g + weight_decay * p                       if weight_decay != 0
        b <- g                                          if momentum != 0 and t == 1
        b <- momentum * b + (1 - dampening) * g         if momentum != 0 and t > 1
        g <- g + momentum * b   (nesterov)   or   g <- b   (otherwise)
        p <- p - lr * g

    Operation order (PyTorch ``_single_tensor_sgd``): ``grad.add(param, alpha=wd)``,
    ``buf.mul_(momentum).add_(grad, alpha=1 - dampening)``, ``grad.add(buf, alpha=momentum)``,
    ``param.add_(grad, alpha=-lr)``; ``x.add(y, alpha=a)`` is evaluated as ``x + (a * y)``.

    Parameters
    ----------
    lr : float
        Learning rate, finite and >= 0.
    momentum : float, default 0
        >= 0. The momentum buffer is state tensor ``"momentum_buffer"``.
    dampening : float, default 0
    weight_decay : float, default 0
        L2 penalty added to the gradient, >= 0.
    nesterov : bool, default False
        Requires ``momentum > 0`` and ``dampening == 0``.
    storage_format, state_format : str or Format, optional
        Formats of the parameters and of the momentum buffer (default: storage).

    Notes
    -----
    A ``momentum`` with ``1 - momentum`` below the state format's unit roundoff is reported
    (the buffer would never decay). NaN or inf gradients propagate to the parameters.
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    storage_format: Any = None
    state_format: Any = None

    name: ClassVar[str] = "sgd"

    def __post_init__(self):
        object.__setattr__(self, "lr", _check_lr(self.lr))
        object.__setattr__(self, "momentum", _check_number("momentum", self.momentum, 0.0))
        object.__setattr__(self, "dampening", _check_number("dampening", self.dampening))
        object.__setattr__(
            self, "weight_decay", _check_number("weight_decay", self.weight_decay, 0.0)
        )
        if not isinstance(self.nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {self.nesterov!r}")
        object.__setattr__(self, "nesterov", bool(self.nesterov))
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening "
                f"(got momentum={self.momentum}, dampening={self.dampening})"
            )
        self._post_init_formats()

    def _tensor_names(self):
        return ("momentum_buffer",) if self.momentum != 0 else ()

    def _check_hazards(self, storage, state):
        _warn_lr("SGD", self.lr, storage)
        if self.momentum != 0:
            _warn_decay(
                f"SGD momentum={self.momentum!r} in {state.name}",
                self.momentum,
                state,
                "the momentum buffer accumulates gradients but never decays",
            )

    def _update(self, name, p, g, tensors, state, lr, k):
        # Compute dtypes: the parameters' carrier, k.wide where the state takes part. Each
        # primitive rounds to its compute dtype; _round_inplace/_assign/_accumulate/_scale
        # round a result to its destination's format (k.sto or k.st), once.
        ops, wide = k.ops, k.wide
        cd = k.pdt  # the update's compute dtype: promotion of the param's and the direction's
        if self.weight_decay != 0:  # grad = grad.add(param, alpha=weight_decay)
            g = _l2_grad(name, p, g, self.weight_decay, state, k)
        if self.momentum != 0:
            buf = tensors["momentum_buffer"]
            if state.step == 0:  # buf = torch.clone(grad)
                _assign(buf, g, k.st)
            else:  # buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                _scale(buf, k.sdt.type(self.momentum), k.st, ops)  # b = round(b * momentum)
                t = state.buffer(name, "t", p, wide)
                ops.multiply(g, wide.type(1 - self.dampening), out=t)  # (1 - dampening) g
                _accumulate(buf, t, k.st, ops)  # b = round(b + (1 - dampening) g)
            if self.nesterov:  # grad = grad.add(buf, alpha=momentum), in the gradient's format
                t = state.buffer(name, "t", p, wide)
                ops.multiply(buf, wide.type(self.momentum), out=t)  # momentum b
                ops.add(g, t, out=t)  # g + momentum b
                g = state.buffer(name, "nesterov", p, k.pdt)
                _assign(g, t, k.sto)  # rounded to storage
            else:
                g, cd = buf, wide
        # param.add_(grad, alpha=-lr): p = round(p + (-lr) g, storage), the product in cd
        upd = state.buffer(name, "update", p, cd)
        ops.multiply(g, cd.type(-lr), out=upd)
        _apply_update(name, p, upd, state, k, cd)

    def to_dict(self) -> dict[str, Any]:
        """All hyperparameters as plain JSON."""
        return {
            "name": self.name,
            "lr": self.lr,
            "momentum": self.momentum,
            "dampening": self.dampening,
            "weight_decay": self.weight_decay,
            "nesterov": self.nesterov,
            **self._format_dict(),
        }


@dataclass(frozen=True)
class _AdamMixin(_Optimizer):
    """Adam and AdamW: one set of fields, one update, L2 or decoupled weight decay."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    storage_format: Any = None
    state_format: Any = None

    decoupled: ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "lr", _check_lr(self.lr))
        object.__setattr__(self, "betas", _check_betas(self.betas))
        object.__setattr__(self, "eps", _check_number("epsilon", self.eps, 0.0))
        object.__setattr__(
            self, "weight_decay", _check_number("weight_decay", self.weight_decay, 0.0)
        )
        self._post_init_formats()

    def _tensor_names(self):
        return ("exp_avg", "exp_avg_sq")

    def _check_hazards(self, storage, state):
        label = type(self).__name__
        _warn_lr(label, self.lr, storage)
        if _underflows(self.eps, state):
            # Refuse rather than divide by zero: with eps = 0, sqrt(v_hat) + eps is exactly 0
            # wherever v is 0 (NaN from 0/0 where the gradient history is 0, inf where
            # (1 - beta2) g**2 underflowed), and the run is lost to NaN within steps.
            raise ValueError(
                f"{label} eps={self.eps!r} underflows to 0 in the optimizer-state format "
                f"{state.name} (smallest subnormal {float(state.smallest_subnormal):.3g}): "
                "the denominator sqrt(v_hat) + eps would be exactly 0 wherever v is 0, "
                "giving NaN/inf parameters. Keep the state in a wider format "
                "(state_format='float32'; CLI --state-dtype float32) or use "
                f"eps >= {float(state.smallest_subnormal):.3g}"
            )
        _warn_decay(
            f"{label} beta2={self.betas[1]!r} in {state.name}",
            self.betas[1],
            state,
            "exp_avg_sq can grow but (almost) never decays",
        )
        if self.decoupled and self.weight_decay != 0:
            _warn_decay(
                f"{label} decay factor 1 - lr*weight_decay = 1 - {self.lr * self.weight_decay:.3g}"
                f" in {storage.name}",
                1 - self.lr * self.weight_decay,
                storage,
                "decoupled weight decay has (almost) no effect",
            )

    def _update(self, name, p, g, tensors, state, lr, k):
        # Compute dtype cd: the promotion of the parameters' and the state's carriers. Each
        # primitive rounds to its compute dtype; _round_inplace/_assign/_accumulate/_scale
        # round a result to its destination's format (k.sto or k.st), once.
        ops, cd, st = k.ops, k.wide, k.st
        beta1, beta2 = self.betas
        m, v = tensors["exp_avg"], tensors["exp_avg_sq"]
        if _fused(k) and kernels.applies(p, g, m, v):
            self._fused_update(name, p, g, m, v, state, lr, k)
            return
        if self.weight_decay != 0:
            if self.decoupled:  # param.mul_(1 - lr * weight_decay)
                _scale(p, k.pdt.type(1 - lr * self.weight_decay), k.sto, ops)
            else:  # grad = grad.add(param, alpha=weight_decay)
                g = _l2_grad(name, p, g, self.weight_decay, state, k)
        t = state.buffer(name, "t", p, cd)
        # exp_avg.lerp_(grad, w = 1 - beta1), PyTorch's two-sided formula
        w = cd.type(1 - beta1)
        ops.subtract(g, m, out=t)  # g - m
        if abs(w) < 0.5:
            ops.multiply(t, w, out=t)  # w (g - m)
            _accumulate(m, t, st, ops)  # m = round(m + w (g - m))
        else:
            ops.multiply(t, cd.type(1) - w, out=t)  # (g - m)(1 - w)
            out = _target(m, t)
            ops.subtract(g, t, out=out)  # g - (g - m)(1 - w)
            _assign(m, out, st)  # m = round(g - (g - m)(1 - w))
        # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        _scale(v, k.sdt.type(beta2), st, ops)  # v = round(beta2 v)
        ops.multiply(g, cd.type(1 - beta2), out=t)  # (1 - beta2) g
        ops.multiply(t, g, out=t)  # ((1 - beta2) g) g
        _accumulate(v, t, st, ops)  # v = round(v + ((1 - beta2) g) g)
        step_size, bias_correction2_sqrt = self._bias_scalars(lr, state.step + 1)
        # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps), each op rounded
        d = state.buffer(name, "denom", p, k.sdt)
        ops.sqrt(v, out=d)  # sqrt(v)
        _round_inplace(d, st)
        ops.divide(d, k.sdt.type(bias_correction2_sqrt), out=d)  # sqrt(v) / sqrt(bc2)
        _round_inplace(d, st)
        ops.add(d, k.sdt.type(self.eps), out=d)  # ... + eps
        _round_inplace(d, st)
        # param.addcdiv_(exp_avg, denom, value=-step_size): p = round(p + (-step_size m) / d)
        upd = state.buffer(name, "update", p, cd)
        ops.multiply(m, cd.type(-step_size), out=upd)  # -step_size m
        ops.divide(upd, d, out=upd)  # (-step_size m) / d
        _apply_update(name, p, upd, state, k, cd)

    def _bias_scalars(self, lr: float, step: int) -> tuple[float, float]:
        """``step_size = lr / (1 - beta1**t)`` and ``sqrt(1 - beta2**t)`` at step ``t``
        (1-based): Python float64 scalars, as PyTorch forms them."""
        beta1, beta2 = self.betas
        return lr / (1 - beta1 ** float(step)), (1 - beta2 ** float(step)) ** 0.5

    def _fused_update(self, name, p, g, m, v, state, lr, k):
        """:meth:`_update` in one pass (:func:`numstab.kernels.adam_update`): the same
        operations, order and scalars, hence the same bits."""
        beta1, beta2 = self.betas
        step_size, bias_correction2_sqrt = self._bias_scalars(lr, state.step + 1)
        wd = self.weight_decay
        upd = state.buffer(name, "update", p, k.wide)
        kernels.adam_update(
            p.reshape(-1),
            g.reshape(-1),
            m.reshape(-1),
            v.reshape(-1),
            upd.reshape(-1),
            decay=1 - lr * wd if self.decoupled and wd != 0 else None,
            wd=0.0 if self.decoupled else wd,
            w=1 - beta1,
            beta2=beta2,
            bias2_sqrt=bias_correction2_sqrt,
            eps=self.eps,
            step_size=step_size,
        )
        state.last_update[name] = upd

    def to_dict(self) -> dict[str, Any]:
        """All hyperparameters as plain JSON."""
        return {
            "name": self.name,
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "decoupled_weight_decay": self.decoupled,
            **self._format_dict(),
        }


_ADAM_DOC = r"""{title}

    For each parameter ``p`` with gradient ``g``, at step ``t = 1, 2, ...``::

{decay}
        m <- lerp(m, g, 1 - beta1)          = m + (1 - beta1) (g - m)
        v <- beta2 v + (1 - beta2) g**2
        step_size = lr / (1 - beta1**t)                      (Python float64)
        denom = sqrt(v) / sqrt(1 - beta2**t) + eps
        p <- p - step_size * m / denom

    Operation order (PyTorch ``_single_tensor_adam``, ``foreach=False``):
{order}``exp_avg.lerp_(grad, 1 - beta1)`` -- ``m + w * (g - m)`` for ``|w| < 0.5`` and
    ``g - (g - m) * (1 - w)`` otherwise, ``w`` in the compute dtype;
    ``exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)`` --
    ``v + ((1 - beta2) * g) * g``;
    ``denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)``;
    ``param.addcdiv_(exp_avg, denom, value=-step_size)`` -- ``p + ((-step_size) * m) / denom``.

    Parameters
    ----------
    lr : float, default 1e-3
        Learning rate, finite and >= 0.
    betas : (float, float), default (0.9, 0.999)
        Each in [0, 1).
    eps : float, default 1e-8
        >= 0. If it rounds to 0 in the state format, ``ValueError`` (see Notes).
    weight_decay : float, default {wd}
        >= 0. {wd_text}
    storage_format, state_format : str or Format, optional
        Formats of the parameters and of ``exp_avg`` / ``exp_avg_sq`` (default: storage).

    Notes
    -----
    Special values: where ``v == 0`` the denominator is ``eps`` rounded to the state format; if
    that is 0 (``eps`` underflow, refused at construction), the update is ``0/0 = NaN`` where
    ``m == 0`` and ``±inf`` where ``m != 0``, and the parameter becomes NaN / inf (IEEE, as
    PyTorch). A NaN/inf gradient makes ``m``, ``v`` and the parameter NaN.
"""


@dataclass(frozen=True)
class Adam(_AdamMixin):
    name: ClassVar[str] = "adam"
    decoupled: ClassVar[bool] = False


@dataclass(frozen=True)
class AdamW(_AdamMixin):
    weight_decay: float = 0.01

    name: ClassVar[str] = "adamw"
    decoupled: ClassVar[bool] = True


Adam.__doc__ = _ADAM_DOC.format(
    title="Adam with L2 weight decay added to the gradient, as ``torch.optim.Adam``.",
    decay="        g <- g + weight_decay * p               (if weight_decay != 0)",
    order="    ``grad = grad.add(param, alpha=weight_decay)`` -- ``g + (wd * p)``;\n    ",
    wd="0",
    wd_text="L2 penalty: ``weight_decay * p`` is added to the gradient (and so to both moments).",
)
AdamW.__doc__ = _ADAM_DOC.format(
    title="Adam with decoupled weight decay, as ``torch.optim.AdamW``.",
    decay="        p <- p * (1 - lr * weight_decay)        (first, if weight_decay != 0)",
    order="    ``param.mul_(1 - lr * weight_decay)``;\n    ",
    wd="0.01",
    wd_text="Decoupled decay ``p *= 1 - lr * weight_decay`` before the Adam update; if "
    "``lr * weight_decay`` is below the storage format's unit roundoff the product rounds back "
    "to ``p`` and a ``UserWarning`` says so.",
)


# --- wrappers around a base optimizer ---------------------------------------------------------


@dataclass(frozen=True)
class _Wrapper(_Stepper):
    """A gradient transform or schedule around ``base``: its formats, state, checkpoints and
    checks are the base's; ``_apply`` transforms and calls the base's ``_apply``."""

    base: Any

    def __post_init__(self):
        if not isinstance(self.base, _Stepper):
            raise TypeError(
                f"{type(self).__name__} base must be a numstab optimizer, got {self.base!r}"
            )

    @property
    def storage_format(self):
        return self.base.storage_format

    @property
    def state_format(self):
        return self.base.state_format

    def init_state(self, params, storage_format=None) -> OptState:
        """The base optimizer's state (the wrapper keeps none)."""
        return self.base.init_state(params, storage_format)

    def load_state_arrays(self, arrays, step, storage_format=None, *, like=None) -> OptState:
        """The base optimizer's :meth:`~SGD.load_state_arrays`."""
        return self.base.load_state_arrays(arrays, step, storage_format=storage_format, like=like)

    def _check_step(self, params, grads, state: OptState) -> _Kernel:
        return self.base._check_step(params, grads, state)


# --- ⊥Grad ------------------------------------------------------------------------------------


def perp_grad_tensor(w, g, *, eps: float = 1e-30, rescale: bool = True, acc_dtype=np.float64):
    r"""The authors' per-tensor ⊥Grad, in the accumulation dtype, not rounded.

    With ``w``, ``g`` flattened::

        proj  = (w . g) / (w . w + eps)
        g_orth = g - proj * w
        scale = ||g|| / (||g_orth|| + eps)          (only if rescale)
        return g_orth * scale

    Parameters
    ----------
    w, g : ndarray, same shape
        Weights and gradient (any float dtype; converted exactly to ``acc_dtype``).
    eps : float, default 1e-30
        The constant of the authors' code in both denominators.
    rescale : bool, default True
        Rescale ``g_orth`` to the norm of ``g``.
    acc_dtype : dtype, default float64
        Dtype of every operation (float64, or longdouble for longdouble inputs).

    Returns
    -------
    ndarray, shape of ``g``, dtype ``acc_dtype``

    Notes
    -----
    ``w = 0`` gives ``proj = 0`` and ``g`` back (scaled by ``||g|| / (||g|| + eps)``, i.e. 1 to
    float64 precision unless ``||g|| < ~1e-14``); ``g = 0`` gives 0. The authors compute in the
    parameter dtype (float32); float64 makes ``g_orth`` orthogonal to ``w`` to ~1e-16 relative
    instead of ~1e-7 before the final rounding to the gradient's format. NaN/inf propagate.
    """
    acc = np.dtype(acc_dtype)
    xp = namespace(w, g)
    w, g = xp.asarray(w), xp.asarray(g)
    wf = _flat(xp, w, acc)
    gf = _flat(xp, g, acc)
    e = _scalar(xp, eps, acc)
    proj = vdot(wf, gf) / (vdot(wf, wf) + e)
    g_orth = gf - proj * wf
    if rescale:
        scale = xp.sqrt(vdot(gf, gf)) / (xp.sqrt(vdot(g_orth, g_orth)) + e)
        g_orth *= scale
    return _reshape(xp, g_orth, g.shape)


def perp_grad_global(params: dict, grads: dict, *, acc_dtype=np.float64) -> dict:
    r"""The paper's ⊥Grad (Definition 7) over the concatenation of all parameters, not rounded.

    ``g⊥ = g − (θᵀg / θᵀθ) θ`` with ``θ`` and ``g`` the concatenations of all tensors; no
    rescaling. ``θᵀθ = 0`` (all weights zero) returns ``g`` unchanged (there is no direction to
    remove). Dot products are accumulated per tensor in ``acc_dtype`` and summed in key order.

    Returns
    -------
    dict[str, ndarray]
        Same keys and shapes, dtype ``acc_dtype``.
    """
    acc = np.dtype(acc_dtype)
    xp = namespace(*params.values(), *grads.values())
    flat = {k: (_flat(xp, params[k], acc), _flat(xp, grads[k], acc)) for k in params}
    shapes = {k: xp.asarray(grads[k]).shape for k in params}
    tg = _scalar(xp, 0, acc)
    tt = _scalar(xp, 0, acc)
    for wf, gf in flat.values():
        tg = tg + vdot(wf, gf)
        tt = tt + vdot(wf, wf)
    if isinstance(tt, (float, np.generic, np.ndarray)):  # a host value: branch on it
        if tt == 0:
            return {k: _reshape(xp, gf, shapes[k]) for k, (_, gf) in flat.items()}
        c = tg / tt
        return {k: _reshape(xp, gf - c * wf, shapes[k]) for k, (wf, gf) in flat.items()}
    # a device value (CuPy): select instead of reading it back (c is NaN where tt == 0)
    zero = tt == 0
    with np.errstate(divide="ignore", invalid="ignore"):  # NumPy-backed namespaces warn
        c = tg / tt
    return {
        k: xp.reshape(xp.where(zero, gf, gf - c * wf), shapes[k]) for k, (wf, gf) in flat.items()
    }


@dataclass(frozen=True)
class PerpGrad(_Wrapper):
    r"""⊥Grad: remove the gradient's component along the weights, then step the base optimizer.

    ``scope="tensor"`` is the authors' code (per tensor, ``eps`` in both denominators, ``g⊥``
    rescaled to ``||g||``; see :func:`perp_grad_tensor`). ``scope="global"`` is the paper's
    Definition 7 (one projection over all parameters, no rescaling, ``θᵀθ = 0`` leaves ``g``
    unchanged; see :func:`perp_grad_global`).

    The projection is computed in float64 (longdouble if the storage or state format is) and
    rounded once to the gradient's (storage) format, so ``g⊥`` is orthogonal to ``w`` up to that
    final rounding: ``|cos(w, g⊥)| <= u`` of the format plus float64 error. This deliberately
    differs from the authors' code, which does the arithmetic in float32. (The dot products are
    not scaled: float64 parameters or gradients beyond ~1e154 would overflow them.)

    The dot products are :func:`numstab.backend.vdot`, whose summation order is the backend's
    (NumPy's ``einsum`` loop; ``xp.sum(a * b)`` on CuPy and array-API namespaces): ``g⊥``
    differs between backends by the propagated rounding of the dot products, each within
    ``gamma_n sum |a_i b_i|`` of the exact value (``gamma_n = n u / (1 - n u)``, ``u = 2**-53``);
    after the rounding to float32 that is at most one ulp, mostly nothing.

    Parameters
    ----------
    base : SGD, Adam, AdamW or NormalizedLR
    scope : {"tensor", "global"}, default "tensor"
    eps : float, default 1e-30
        Used by ``scope="tensor"`` only.
    """

    scope: str = "tensor"
    eps: float = 1e-30

    name: ClassVar[str] = "perp_grad"

    def __post_init__(self):
        if self.scope not in PERP_GRAD_SCOPES:
            valid = ", ".join(PERP_GRAD_SCOPES)
            raise ValueError(f"unknown PerpGrad scope {self.scope!r}; valid scopes: {valid}")
        object.__setattr__(self, "eps", _check_number("eps", self.eps, 0.0))
        super().__post_init__()

    def project(self, params: dict, grads: dict, state: OptState) -> dict:
        """``g⊥`` for every tensor, rounded to the storage format (new arrays)."""
        return self._project(
            params, grads, get_format(state.storage_format), get_format(state.state_format)
        )

    def _project(self, params: dict, grads: dict, sto: Format, st: Format) -> dict:
        acc = _acc_dtype(sto, st)
        if self.scope == "tensor":
            raw = {
                k: perp_grad_tensor(params[k], grads[k], eps=self.eps, acc_dtype=acc)
                for k in params
            }
        else:
            raw = perp_grad_global(params, grads, acc_dtype=acc)
        if _emulated(sto):
            return {k: quantize(r, sto) for k, r in raw.items()}
        xp = namespace(*raw.values())
        return {k: _astype(xp, r, sto.carrier) for k, r in raw.items()}

    def _apply(self, params, grads, state, lr, k):
        """Project the gradients, then one base step (``grads`` are not modified)."""
        self.base._apply(params, self._project(params, grads, k.sto, k.st), state, lr, k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scope": self.scope,
            "eps": self.eps,
            "base": self.base.to_dict(),
        }


# --- normalized learning rate -----------------------------------------------------------------


def global_grad_norm(grads: dict, *, acc_dtype=None) -> float:
    r"""``||∇L||``: the 2-norm of all gradients together, accumulated in float64.

    Computed as ``s * sqrt(sum_k (g_k / s) . (g_k / s))`` with ``s`` the power of two at the
    largest ``|g|``, so that squares neither overflow nor underflow (the scaling is exact).

    Parameters
    ----------
    grads : dict[str, ndarray]
    acc_dtype : dtype, optional
        float64 by default; longdouble when a gradient is longdouble.

    Returns
    -------
    float (or longdouble)
        A host NumPy scalar on every backend: 0 for all-zero gradients, inf if a gradient is
        inf, NaN if one is NaN.

    Notes
    -----
    On a GPU two scalars come back to the host (the largest ``|g|``, whose exponent sets the
    scaling, and the sum of squares). The squares are summed by :func:`numstab.backend.vdot`,
    in the backend's order: results differ between backends by at most ``gamma_N + 2u``
    relative (``N`` elements, ``u = 2**-53``).
    """
    xp = namespace(*grads.values())
    arrays = [xp.asarray(g) for g in grads.values()]
    if acc_dtype is None:
        wide = any(is_numpy(xp) and a.dtype == np.longdouble for a in arrays)
        acc_dtype = np.longdouble if wide else np.float64
    acc = np.dtype(acc_dtype)
    # max |g| of every tensor, then of all: one scalar read back (exact, NaN propagates)
    maxes = [xp.max(xp.abs(_astype(xp, a, acc))) for a in arrays if a.size]
    if not maxes:
        return acc.type(0)
    amax = _host_scalar(functools.reduce(xp.maximum, maxes), acc)
    if np.isnan(amax):
        return acc.type(np.nan)
    if amax == 0 or not np.isfinite(amax):
        return amax
    _, e = np.frexp(amax)
    scale = np.ldexp(acc.type(1), -int(e))
    total = _scalar(xp, 0, acc)
    s = _scalar(xp, scale, acc)
    for a in arrays:
        f = _flat(xp, a, acc) * s
        total = total + vdot(f, f)
    # the sum of squares read back: the square root and the division on the host
    return np.sqrt(_host_scalar(total, acc)) / scale


@dataclass(frozen=True)
class NormalizedLR(_Wrapper):
    r"""Normalized learning-rate schedule ``η_t = η₀ / ||∇L_t||`` around a base optimizer.

    Each step computes the global gradient norm (:func:`global_grad_norm`, float64) and runs the
    base optimizer's step with ``lr = lr0 / ||∇L||`` (the base's own ``lr`` is ignored; AdamW's
    decoupled decay uses the per-step lr too). With SGD this is normalized gradient descent,
    ``p <- p - lr0 * g / ||g||``.

    Special values: ``||∇L|| = 0`` skips the step entirely (parameters and state unchanged, the
    step counter does not advance) since the direction is undefined. A non-finite norm is passed
    through (``lr = 0`` for inf, NaN for NaN): the base step then propagates the non-finite
    gradient as it would without the schedule.

    On a GPU the norm is read back to the host each step (two scalars, see
    :func:`global_grad_norm`): the learning rate is a Python float, and the skip a branch.

    Parameters
    ----------
    base : SGD, Adam, AdamW or PerpGrad
    lr0 : float
        ``η₀``, finite and >= 0.
    """

    lr0: float

    name: ClassVar[str] = "normalized_lr"

    def __post_init__(self):
        object.__setattr__(self, "lr0", _check_lr(self.lr0))
        super().__post_init__()

    def lr_for(self, grads: dict, lr0: float | None = None):
        """``lr0 / ||∇L||`` (a Python float), or None when the norm is 0 (skip)."""
        norm = global_grad_norm(grads)
        if norm == 0:
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            return float((self.lr0 if lr0 is None else lr0) / norm)

    def _apply(self, params, grads, state, lr, k):
        """One base step with ``lr = lr0 / ||∇L||``; nothing at all if ``||∇L|| = 0``."""
        lr_t = self.lr_for(grads, lr)
        if lr_t is None:
            state.last_update = {}
        else:
            self.base._apply(params, grads, state, lr_t, k)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr0": self.lr0, "base": self.base.to_dict()}


# --- factory ----------------------------------------------------------------------------------


def make_optimizer(
    name: str,
    *,
    lr: float,
    betas=None,
    eps: float | None = None,
    weight_decay: float | None = None,
    momentum: float | None = None,
    dampening: float = 0.0,
    nesterov: bool = False,
    perp_grad: str | None = None,
    normalized_lr: bool = False,
    storage_format,
    state_format=None,
):
    """Build an optimizer from plain configuration values.

    Parameters
    ----------
    name : {"sgd", "adam", "adamw"}
    lr : float
    betas, eps : optional
        Adam/AdamW only (None: PyTorch's defaults (0.9, 0.999) and 1e-8); ignored by SGD.
    weight_decay : float, optional
        None: the optimizer's default (0 for SGD and Adam, 0.01 for AdamW).
    momentum, dampening, nesterov : optional
        SGD only. Adam/AdamW reject a non-zero ``momentum`` (``betas[0]`` is their momentum).
    perp_grad : {None, "tensor", "global"}
        Wrap the optimizer in :class:`PerpGrad` with this scope.
    normalized_lr : bool, default False
        Wrap the result in :class:`NormalizedLR` with ``lr0 = lr`` (outermost, so that the
        norm is that of the loss gradient, before any ⊥Grad projection).
    storage_format, state_format : str or Format
    """
    key = str(name).strip().lower()
    if key not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
    common: dict[str, Any] = {"storage_format": storage_format, "state_format": state_format}
    if weight_decay is not None:
        common["weight_decay"] = weight_decay
    if key == "sgd":
        opt = SGD(
            lr,
            momentum=0.0 if momentum is None else momentum,
            dampening=dampening,
            nesterov=nesterov,
            **common,
        )
    else:
        if momentum not in (None, 0, 0.0):
            raise ValueError(
                f"momentum={momentum!r} does not apply to {key}: use betas[0] for Adam's momentum"
            )
        if betas is not None:
            common["betas"] = betas
        if eps is not None:
            common["eps"] = eps
        opt = (Adam if key == "adam" else AdamW)(lr=lr, **common)
    if perp_grad is not None:
        opt = PerpGrad(opt, scope=perp_grad)
    if not isinstance(normalized_lr, (bool, np.bool_)):
        raise TypeError(f"normalized_lr must be a bool, got {normalized_lr!r}")
    if normalized_lr:
        opt = NormalizedLR(opt, lr0=lr)
    return opt
