"""Deprecated path of :mod:`numstab.run.outdir` (kept for one release)."""

from numstab._deprecated import forward_module

__getattr__ = forward_module("numstab.outdir", "numstab.run.outdir")
