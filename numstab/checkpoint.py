"""Deprecated path of :mod:`numstab.run.checkpoint` (kept for one release)."""

from numstab._deprecated import forward_module

__getattr__ = forward_module("numstab.checkpoint", "numstab.run.checkpoint")
