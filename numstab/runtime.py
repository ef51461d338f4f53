"""Deprecated path of :mod:`numstab.run.runtime` (kept for one release)."""

from numstab._deprecated import forward_module

__getattr__ = forward_module("numstab.runtime", "numstab.run.runtime")
