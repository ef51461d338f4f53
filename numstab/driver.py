"""Deprecated path of :mod:`numstab.run.driver` (kept for one release)."""

from numstab._deprecated import forward_module

__getattr__ = forward_module("numstab.driver", "numstab.run.driver")
