"""Deprecated path of :mod:`numstab.run.atomic` (kept for one release)."""

from numstab._deprecated import forward_module

__getattr__ = forward_module("numstab.atomic", "numstab.run.atomic")
