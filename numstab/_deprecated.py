"""Old import paths kept for one release: a module ``__getattr__`` that forwards and warns."""

from __future__ import annotations

import importlib
import warnings

__all__ = ["forward_module"]


def forward_module(old: str, new: str, names: tuple[str, ...] | None = None):
    """A module-level ``__getattr__`` for ``old`` that returns ``new``'s attribute with a
    :class:`DeprecationWarning` naming the new path (AttributeError for unknown names, and for
    names outside ``names`` when given: a module that moved only some of its names).

    ``new`` is imported on first use, so ``new`` may import ``old`` without a cycle."""

    def __getattr__(name: str):
        if name.startswith("__") or (names is not None and name not in names):
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(new), name)
        warnings.warn(
            f"{old}.{name} is deprecated and will be removed; use {new}.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__
