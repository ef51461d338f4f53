"""Run machinery: the configuration of a run, the training loop, its driver and its files.

:mod:`~numstab.run.options` (declarative run options) -> :mod:`~numstab.run.config`
(:class:`TrainConfig`) -> :mod:`~numstab.run.loop` (:class:`Run`, :func:`train`) ->
:mod:`~numstab.run.driver` (several runs in step, checkpoints, signals) ->
:mod:`~numstab.run.checkpoint`, :mod:`~numstab.run.outdir` (one writer per output folder),
:mod:`~numstab.run.atomic` (files written whole or not at all), :mod:`~numstab.run.footprint`
(memory estimate), :mod:`~numstab.run.runtime` (threads, allocator, environment).
"""

from __future__ import annotations

from numstab.run.config import RECORDED_BEFORE, TrainConfig
from numstab.run.loop import (
    CSV_HEADER,
    SUMMARY_SERIES,
    MetricLog,
    NonFiniteError,
    Run,
    make_dataset,
    summarize,
    train,
)

__all__ = [
    "CSV_HEADER",
    "RECORDED_BEFORE",
    "SUMMARY_SERIES",
    "MetricLog",
    "NonFiniteError",
    "Run",
    "TrainConfig",
    "make_dataset",
    "summarize",
    "train",
]
