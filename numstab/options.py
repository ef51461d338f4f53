"""Deprecated path of :mod:`numstab.run.options` (kept for one release)."""

from numstab._deprecated import forward_module

__getattr__ = forward_module("numstab.options", "numstab.run.options")
