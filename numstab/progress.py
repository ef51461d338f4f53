"""Deprecated path of :mod:`numstab.cli.progress` (kept for one release)."""

from numstab._deprecated import forward_module

__getattr__ = forward_module("numstab.progress", "numstab.cli.progress")
