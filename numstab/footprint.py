"""Deprecated path of :mod:`numstab.run.footprint` (kept for one release)."""

from numstab._deprecated import forward_module

__getattr__ = forward_module("numstab.footprint", "numstab.run.footprint")
