"""Sweeps: a grid of training runs from a TOML SPEC, run resumably, collected into tables.

``python -m numstab.sweep SPEC --out DIR`` (``numstab sweep``; the command line is
:mod:`numstab.cli.sweep`) or :func:`run_sweep` in Python; docs/sweep.md is the guide.

Modules, in the order data flows:

- :mod:`~numstab.sweep.spec`: SPECs (reading, validation, bundled SPECs) and run ids;
- :mod:`~numstab.sweep.executors`: one run in a worker (:func:`execute`), the local
  worker-process executor and the Dask executor;
- :mod:`~numstab.sweep.folder`: the files of the sweep folder and the state of each run;
- :mod:`~numstab.sweep.run`: :func:`run_sweep`, what is left to do, executed and recorded;
- :mod:`~numstab.sweep.tables`: :func:`collect`, the three collected CSV tables;
- :mod:`~numstab.sweep.cells`: values as SPECs write them and the tables show them.

``main``, ``build_parser`` and ``build_collect_parser`` moved to :mod:`numstab.cli.sweep`; the
names here are deprecated aliases that warn.
"""

from __future__ import annotations

from numstab._deprecated import forward_module
from numstab.cli import UsageError
from numstab.sweep.executors import GROK_THRESHOLD as GROK_THRESHOLD
from numstab.sweep.executors import WorkerStartError as WorkerStartError
from numstab.sweep.executors import execute
from numstab.sweep.run import PROG as PROG
from numstab.sweep.run import SweepReport, run_sweep
from numstab.sweep.run import _config_kwargs as _config_kwargs
from numstab.sweep.spec import BUNDLED_SPECS as BUNDLED_SPECS
from numstab.sweep.spec import (
    MAX_RUNS,
    PlannedRun,
    SpecError,
    Sweep,
    canonical_json,
    load_spec,
    parse_spec,
    read_toml,
    run_id,
)
from numstab.sweep.spec import bundled_specs as bundled_specs
from numstab.sweep.spec import spec_file as spec_file
from numstab.sweep.tables import GROUP_EXCLUDE, NUMERIC_FIELDS, collect
from numstab.sweep.tables import SUMMARY_FIELDS as SUMMARY_FIELDS

__all__ = [
    "GROUP_EXCLUDE",
    "MAX_RUNS",
    "NUMERIC_FIELDS",
    "PlannedRun",
    "SpecError",
    "Sweep",
    "SweepReport",
    "UsageError",
    "build_parser",  # deprecated alias (__getattr__)
    "canonical_json",
    "collect",
    "execute",
    "load_spec",
    "main",  # deprecated alias (__getattr__)
    "parse_spec",
    "read_toml",
    "run_id",
    "run_sweep",
]

#: Names that moved to :mod:`numstab.cli.sweep` (deprecated here for one release; the
#: command line is imported on use: numstab.cli.sweep imports this package).
__getattr__ = forward_module(
    "numstab.sweep", "numstab.cli.sweep", names=("main", "build_parser", "build_collect_parser")
)
