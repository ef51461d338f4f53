"""Old import paths kept for one release: a module ``__getattr__`` that forwards and warns."""

from __future__ import annotations

import importlib
import warnings

__all__ = ["forward_module"]


def forward_module(old: str, new: str):
    """A module-level ``__getattr__`` for ``old`` that returns ``new``'s attribute with a
    :class:`DeprecationWarning` naming the new path (AttributeError for unknown names)."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(importlib.import_module(new), name)
        warnings.warn(
            f"{old}.{name} is deprecated and will be removed; use {new}.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__
