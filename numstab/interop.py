"""Arrays and dtypes of other frameworks, read as NumPy arrays and numstab formats.

:func:`as_numpy` turns an array of NumPy, PyTorch (CPU or GPU; tensors that require grad are
detached), JAX, CuPy or any array-API / DLPack library into a NumPy array on the host, without
a copy where the memory allows (:func:`numstab.backend.to_numpy`), and gives the format it
carries: its own dtype's, bfloat16 included (a torch bfloat16 tensor is read through a view
of its bits, never through float32). :func:`format_arg` reads an explicit format: a name, a
NumPy dtype, a :class:`~numstab.precision.Format`, or a framework's dtype object
(``torch.bfloat16``, ``jnp.float16``, ``array_api_strict.float32``).

No framework is imported here.

>>> import numpy as np
>>> a, fmt = as_numpy(np.zeros(3, dtype=">f2"))
>>> a.dtype.isnative, fmt.name
(True, 'float16')
>>> format_arg("bf16").name
'bfloat16'
"""

from __future__ import annotations

import numpy as np

from numstab.backend import to_numpy
from numstab.precision import Format, available_formats, format_of, get_format

__all__ = ["as_numpy", "format_arg"]


def _one_line(text, limit: int = 200) -> str:
    """``text`` (or ``str(text)``) on one line, cut to at most ``limit`` characters."""
    t = " ".join(str(text).split())
    return t if len(t) <= limit else t[: limit - 3] + "..."


def as_numpy(x, name: str = "x") -> tuple[np.ndarray, Format | None]:
    """``x`` as a NumPy array in native byte order, and the format its dtype carries.

    Parameters
    ----------
    x : array of any framework, or nested lists / scalars
    name : str
        The argument's name, for error messages.

    Returns
    -------
    array : ndarray
        A view of ``x``'s memory where the framework allows (NumPy, CPU torch, JAX on CPU,
        DLPack); a host copy for GPU arrays and for non-native byte order.
    fmt : Format or None
        float16, bfloat16, float32, float64 or longdouble; None for dtypes without a format
        (integers, bools, objects, strings, fp8): the caller chooses its default.

    Raises
    ------
    TypeError
        A tensor the framework cannot give as values (sparse, meta).
    ValueError
        Nested sequences that do not form an array; a floating dtype with no format
        (longdouble that is not x87).
    """
    try:
        a = to_numpy(x)
    except (ValueError, TypeError, OverflowError, RuntimeError, NotImplementedError) as exc:
        if type(x).__module__ == "builtins":  # ragged nested lists, mostly
            raise ValueError(f"{name}: not an array of numbers: {_one_line(exc)}") from None
        kind = type(x).__name__  # a sparse or meta tensor, a dtype NumPy lacks
        raise TypeError(f"{name}: cannot read this {kind}: {_one_line(exc)}") from None
    if a.dtype.kind == "f" and not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    try:
        fmt = format_of(a)
    except ValueError as exc:
        raise ValueError(f"{name} has dtype {a.dtype}, and {exc}") from None
    return a, fmt


def format_arg(value, name: str = "dtype") -> Format:
    """An explicit format: a name or alias, a NumPy dtype or scalar type (any byte order), a
    :class:`~numstab.precision.Format`, or a framework's dtype object, read by its name
    (``torch.float16`` and ``torch.half`` are float16; ``jnp.bfloat16`` is bfloat16).

    Raises
    ------
    ValueError
        Anything else; the message names the argument and lists the valid formats.
    """
    if isinstance(value, (str, Format)):
        try:
            return get_format(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    fmt = None
    try:
        fmt = format_of(np.dtype(value)) if value is not None else None
    except (TypeError, ValueError):
        # torch.float16 prints "torch.float16", array_api_strict.float32 likewise
        module, _, short = str(value).rpartition(".")
        if module == type(value).__module__.split(".")[0] and short in available_formats():
            fmt = get_format(short)
    if fmt is None:
        shown = _one_line(repr(value), 60)
        valid = ", ".join(available_formats())
        raise ValueError(f"{name}: unknown format {shown}; valid formats: {valid}")
    return fmt
