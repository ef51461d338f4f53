"""Does this process still do IEEE gradual underflow? (flush-to-zero / denormals-are-zero)

An extension module built with fast-math (``-ffast-math`` links ``crtfastmath.o``, which sets
the x86 MXCSR bits FTZ and DAZ when the library is loaded) switches subnormal arithmetic off
for the whole process, silently: every subnormal result becomes 0 and every subnormal operand
is read as 0. A Softmax Collapse figure measured in such a process is wrong (the softmax tail
is exactly where subnormals live), so numstab checks before it reports one:

- every command (``numstab compare/train/sweep``) checks at start-up and exits 2 naming the
  problem and the loaded extension modules that carry the fast-math start-up code;
- :mod:`numstab.audit` checks when imported and before each collapse figure
  (:func:`require_gradual_underflow`), raising :class:`FlushToZeroError`.

Opting in (measuring in such a process on purpose): the environment variable
``NUMSTAB_ALLOW_FTZ=1``, or :func:`allow_flush_to_zero`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

__all__ = [
    "FlushToZeroError",
    "allow_flush_to_zero",
    "fast_math_modules",
    "process_arithmetic",
    "require_gradual_underflow",
]

_ALLOWED = [os.environ.get("NUMSTAB_ALLOW_FTZ", "") == "1"]
#: The start-up routine of GCC's / Clang's crtfastmath.o (it sets FTZ and DAZ).
_FAST_MATH_MARK = b"set_fast_math"


class FlushToZeroError(RuntimeError):
    """The process flushes subnormals to zero: collapse figures would be wrong."""


def process_arithmetic() -> dict:
    """What NumPy's float32 and float64 arithmetic does with subnormals right now.

    Returns
    -------
    dict
        ``{"ftz": bool, "daz": bool}``: ``ftz`` when ``tiny * 0.5`` (a subnormal result) comes
        out 0, ``daz`` when the smallest subnormal times 2 (a subnormal operand) comes out 0,
        in float32 or in float64. Both False in an IEEE process.
    """
    ftz = daz = False
    for dt, ui in ((np.float32, np.uint32), (np.float64, np.uint64)):
        tiny = np.array([np.finfo(dt).tiny], dtype=dt)
        ftz |= bool((tiny * dt(0.5))[0] == 0)
        sub = np.array([1], dtype=ui).view(dt)  # the smallest subnormal, made without arithmetic
        daz |= bool((sub * dt(2))[0] == 0)
    return {"ftz": ftz, "daz": daz}


def fast_math_modules() -> list[str]:
    """Loaded extension modules whose binary contains crtfastmath's start-up routine (the
    likely culprits; a stripped binary can hide it)."""
    found = []
    for name, mod in list(sys.modules.items()):
        path = getattr(mod, "__file__", None) or ""
        if not path.endswith((".so", ".pyd", ".dylib")):
            continue
        try:
            with open(path, "rb") as fh:
                if _FAST_MATH_MARK in fh.read():
                    found.append(name)
        except OSError:
            continue
    return sorted(found)


def allow_flush_to_zero(allowed: bool = True) -> None:
    """Let the audits report figures in a process that flushes subnormals (opt-in)."""
    _ALLOWED[0] = bool(allowed)


def problem() -> str | None:
    """One line describing the process's non-IEEE subnormal arithmetic, or None."""
    state = process_arithmetic()
    if not (state["ftz"] or state["daz"]):
        return None
    what = " and ".join(
        k for k, on in (("flush-to-zero (FTZ)", state["ftz"]),
                        ("denormals-are-zero (DAZ)", state["daz"])) if on
    )
    culprits = fast_math_modules()
    blame = (
        f"; loaded extension modules built with fast-math: {', '.join(culprits)}"
        if culprits
        else "; likely a library built with -ffast-math, loaded by an import"
    )
    return (
        f"this process does {what}: subnormal numbers become 0, so Softmax Collapse figures "
        f"would be wrong{blame} (NUMSTAB_ALLOW_FTZ=1 measures anyway)"
    )


def require_gradual_underflow() -> None:
    """Raise :class:`FlushToZeroError` unless the process does gradual underflow (or the user
    opted in)."""
    if _ALLOWED[0]:
        return
    text = problem()
    if text is not None:
        raise FlushToZeroError(text)
