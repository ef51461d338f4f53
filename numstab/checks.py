"""Argument checks shared by the public numeric entries (functional, losses).

Cheap on purpose (type, dtype, ndim, shape; never a scan of the data): they run on the
training step's hot path. Index ranges are checked once where they are built
(GatherPlan.build, the Dataset); here an index >= the axis length raises ValueError
(NumPy's IndexError, translated) and a negative one counts from the end, as in NumPy.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from numstab.backend import is_ml_dtype, namespace
from numstab.precision import Format, PrecisionPolicy, available_formats, get_format


def check_choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(allowed)}")
    return value


FLOAT_NAMES = "float16, bfloat16, float32, float64 or longdouble"


def is_float(dt, x=None) -> bool:
    if isinstance(dt, np.dtype):  # NumPy and CuPy
        return dt.kind == "f" or is_ml_dtype(dt, "bfloat16")
    return namespace(x).isdtype(dt, "real floating")


def is_int(dt, x=None) -> bool:
    if isinstance(dt, np.dtype):
        return dt.kind in "iu"
    return namespace(x).isdtype(dt, "integral")


def check_float_array(x, name: str, ndim: int | None = None):
    """``x`` must be an array (NumPy, CuPy or array-API) of a floating format (of ``ndim``
    dimensions)."""
    dt = getattr(x, "dtype", None)
    if dt is None or not hasattr(x, "ndim"):
        raise TypeError(
            f"{name} must be a NumPy or CuPy array (or an array-API array) of {FLOAT_NAMES}, "
            f"got {type(x).__name__}"
        )
    if not is_float(dt, x):
        raise TypeError(f"{name} must be a floating array ({FLOAT_NAMES}), got dtype {dt}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return x


def check_policy(policy) -> PrecisionPolicy:
    if not isinstance(policy, PrecisionPolicy):
        raise TypeError(
            "policy must be a PrecisionPolicy (e.g. PrecisionPolicy.uniform('float32')), "
            f"got {type(policy).__name__}"
        )
    return policy


def check_bias(b, n_out: int):
    if b is not None:
        check_float_array(b, "b", 1)
        if b.shape[0] != n_out:
            raise ValueError(f"bias b must have shape ({n_out},) (n_out), got {tuple(b.shape)}")
    return b


def check_cache(cache, what: str) -> tuple:
    if not (isinstance(cache, tuple) and len(cache) == 3):
        raise TypeError(f"cache must be the tuple returned by {what}, got {type(cache).__name__}")
    return cache


def check_format(fmt) -> Format:
    if fmt is None:  # np.dtype(None) is float64: never guess a format
        raise ValueError(f"unknown format None; valid formats: {', '.join(available_formats())}")
    return get_format(fmt)


def check_eps(eps):
    """StableMax's epsilon: a finite real number ``>= 0`` (as :mod:`numstab.exact` requires)."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real):
        raise TypeError(
            f"eps must be a real number >= 0, got eps={eps!r} of type {type(eps).__name__}"
        )
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got eps={eps!r}")
    return eps
