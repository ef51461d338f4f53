"""``python -m numstab.sweep``: run a grid of training runs, resumably, and collect the results.

A *SPEC* is a TOML file with three optional parts::

    [base]                      # overrides of TrainConfig's defaults, shared by every run
    p = 113
    steps = 300

    [axes]                      # the grid: the Cartesian product of these lists
    dtype = ["float16", "float32", "float64"]
    seed = [0, 1, 2]

    [[runs]]                    # explicit extra runs: base + these overrides (no axes)
    optimizer = "sgd"
    lr = 0.1

Keys are :class:`numstab.run.TrainConfig` field names, and every value is validated and
canonicalised by the field's one declaration (:mod:`numstab.run.options`; ``"fp16"`` is
``"float16"``); ``"none"`` stands for ``None`` in the optional fields (``perp_grad``,
``loss_dtype``, ``state_dtype``, ``batch_size``, ``zero_target_grad_from``), since TOML has no
null. Without ``[axes]`` the grid is the single base run, or nothing when ``[[runs]]`` are given
(the SPEC is then exactly those runs). A key both in ``[base]`` and ``[axes]`` takes the axis
values. A value written twice in an axis is an error; entries that resolve to the same run (two
spellings of a value, a ``[[runs]]`` entry equal to a grid run) run once, with a note.

Limits, checked before anything runs or is written: at most :data:`MAX_RUNS` runs unless
``--allow-large`` (counted from the axis lengths, without expanding the grid), and no run whose
estimated memory (:func:`numstab.run.footprint.estimate_run_memory`) exceeds ``--max-run-gib``
(default: half of the physical memory).

Every run gets a stable id, :func:`run_id`: the first 12 hex digits of the SHA-256 of its
canonical configuration (``TrainConfig.to_dict()`` as JSON with sorted keys), and its own folder
``DIR/<id>/`` with ``config.json`` (written when the run is submitted), then ``metrics.csv``
and ``summary.json`` (written when it ends, in that order; every file atomically: temporary
file, fsync, rename). ``summary.json`` is the commit marker: a run whose ``summary.json`` says
``"status": "ok"`` is skipped when the sweep is invoked again, so an interrupted sweep resumes
and loses only unfinished runs. A run that raised (``NonFiniteError`` on divergence, or any
other exception), or whose worker process died, is recorded with ``"status": "failed"``; it is
*not* rerun on a plain re-invocation (a deterministic failure would just fail again) but with
``--retry-failed``; ``--force`` reruns everything.

Executors: ``local`` (``--workers`` worker processes of our own: fresh interpreters that never
import the caller's ``__main__``, one run at a time each; a worker that dies fails only its run
and is replaced) and ``dask`` (an existing ``dask.distributed`` cluster at ``--scheduler
ADDRESS``, or an in-process ``LocalCluster`` with ``--scheduler local``). In both, each task pins
BLAS to ``--threads`` threads (threadpoolctl) and tunes the allocator
(:func:`numstab.run.runtime.tune_allocator`) in the process that trains; the trained metrics travel
back to the client, which writes every file, so Dask workers need no shared file system (they
need numstab installed at the same version: the worker checks the run id).

After the runs, :func:`collect` writes ``collected_metrics.csv``, ``collected_summary.csv`` and
``collected_grouped.csv`` in ``DIR``; a malformed run folder is skipped with a warning.

Exit codes: 0 every run of the SPEC is ok; 1 at least one run failed (now or in an earlier
invocation; they are listed), or a local worker could not start; 2 bad SPEC or option (one
line, before anything runs or is written), dask missing or its scheduler unreachable, CuPy or a
GPU missing for ``backend = "cupy"``, or another numstab process writes to ``DIR``; 130 SIGINT,
143 SIGTERM (workers stopped, finished runs kept and collected; invoke again to resume); 141
``--dry-run`` or ``collect`` whose stdout was closed early (``| head``). ``collect DIR``: 0, or
1 when a file of a run folder was skipped as malformed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import platform
import re
import selectors
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from numstab.cli import (
    HelpFormatter,
    Parser,
    UsageError,
    check_backend,
    check_out_dir,
    json_default,
    versions,
)
from numstab.run.atomic import atomic_open
from numstab.run.driver import graceful_stop
from numstab.run.footprint import (
    MEMORY_FRACTION,
    default_max_run_bytes,
    estimate_run_memory,
    format_bytes,
)

__all__ = [
    "GROUP_EXCLUDE",
    "MAX_RUNS",
    "NUMERIC_FIELDS",
    "PlannedRun",
    "SpecError",
    "Sweep",
    "SweepReport",
    "UsageError",
    "build_parser",
    "canonical_json",
    "collect",
    "execute",
    "load_spec",
    "main",
    "parse_spec",
    "read_toml",
    "run_id",
    "run_sweep",
]

PROG = "python -m numstab.sweep"
SPEC_SECTIONS = ("description", "base", "axes", "runs", "reproduce")
#: Top-level tables that belong to other tools and are ignored here (``scripts/reproduce.py``
#: keeps its budgets in ``[reproduce]``).
IGNORED_SECTIONS = ("reproduce",)
#: Axis columns left out of the grouping key of ``collected_grouped.csv`` (averaged over).
GROUP_EXCLUDE = ("seed",)
#: Columns of ``collected_summary.csv`` after the axes (``None`` written as an empty cell).
SUMMARY_FIELDS = (
    "status",
    "error",
    "sc_onset_step",
    "sc50_step",
    "train100_step",
    "grok_step",
    "final_step",
    "final_train_acc",
    "final_test_acc",
    "final_train_loss",
    "final_sc_fraction",
    "wall_seconds",
)
#: Fields averaged in ``collected_grouped.csv`` (over the ok runs of a group that have a value).
NUMERIC_FIELDS = (
    "sc_onset_step",
    "sc50_step",
    "train100_step",
    "grok_step",
    "final_train_acc",
    "final_test_acc",
    "final_train_loss",
    "final_sc_fraction",
    "wall_seconds",
)
GROK_THRESHOLD = 0.9
_ID_RE = re.compile(r"^[0-9a-f]{12}$")
#: Most runs a SPEC may describe without ``allow_large`` (``--allow-large``).
MAX_RUNS = 10_000
#: Exit code when the reader of stdout goes away (128 + SIGPIPE, as the shell reports it).
EXIT_BROKEN_PIPE = 141
#: Seconds a stopped worker gets between SIGTERM and SIGKILL.
STOP_GRACE_S = 2.0
#: Seconds between checks for a signal while waiting on workers.
POLL_S = 0.2


class SpecError(ValueError):
    """A malformed SPEC (exit 2); the message names the offending key."""


# --- configuration identity -----------------------------------------------------------------


def _options() -> dict:
    """TrainConfig field -> its :class:`numstab.run.options.Option` (the one declaration of what
    each run option accepts)."""
    from numstab.run import TrainConfig
    from numstab.run.options import options_of

    return options_of(TrainConfig)


def canonical_json(config) -> str:
    """The canonical JSON of a :class:`~numstab.run.TrainConfig` that :func:`run_id` hashes.

    ``config.to_dict()`` of the validated config, sorted keys, no whitespace. TrainConfig
    stores every field canonically (``dtype="fp16"`` as ``"float16"``, ``lr=1`` as ``1.0``),
    so spellings of one configuration share one id.
    """
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


def run_id(config) -> str:
    """Stable id of a run: the first 12 hex digits of SHA-256 of :func:`canonical_json`.

    Equal configurations give equal ids in every process and invocation; any change of a field
    changes the id. A new TrainConfig field (with a default) changes every id, since
    ``to_dict()`` then has one more key.

    Examples
    --------
    >>> from numstab.run import TrainConfig
    >>> run_id(TrainConfig(seed=1)) == run_id(TrainConfig(seed=1))
    True
    >>> run_id(TrainConfig(seed=1)) == run_id(TrainConfig(seed=2))
    False
    """
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:12]


# --- the SPEC --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its id, configuration, source and values of the sweep's columns."""

    id: str
    config: object  # TrainConfig
    source: str  # "grid" or "runs[i]"
    axes: dict

    def label(self) -> str:
        return " ".join(f"{k}={_cell_axis(v)}" for k, v in self.axes.items())


@dataclass(frozen=True)
class Sweep:
    """A parsed SPEC: base overrides, axes, explicit runs and the resolved list of runs.

    ``columns`` are the axis names (in SPEC order) followed by any key set in ``[[runs]]`` that
    is not an axis: the columns identifying a run in the collected tables. ``notes`` say which
    entries of the SPEC were merged because they name the same run (format aliases, a
    ``[[runs]]`` entry equal to a grid run).
    """

    source: str
    description: str
    base: dict
    axes: dict
    extra: list
    columns: tuple
    runs: list = field(default_factory=list)
    notes: tuple = ()

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "description": self.description,
            "base": self.base,
            "axes": self.axes,
            "runs": self.extra,
            "columns": list(self.columns),
            "ids": [r.id for r in self.runs],
            "notes": list(self.notes),
        }


def _coerce(where: str, name: str, value):
    """One SPEC value, validated and canonicalised by its option's declaration
    (:func:`numstab.run.options.coerce`: ``"fp16"`` -> ``"float16"``, ``1`` -> ``1.0`` for a
    number); ``"none"`` stands for None where the option allows None (TOML has no null)."""
    from numstab.run.options import coerce

    spec = _options()[name]
    if value == "none":
        with contextlib.suppress(ValueError):
            return coerce(name, spec, None)
    try:
        return coerce(name, spec, value)
    except ValueError as exc:
        raise SpecError(f"{where}: {exc}") from None


def _check_table(where: str, table) -> dict:
    if not isinstance(table, dict):
        raise SpecError(f"{where} must be a table of TrainConfig fields, got {table!r}")
    out = {}
    for k, v in table.items():
        if k not in _options():
            raise SpecError(f"{where}.{k}: unknown key (not a TrainConfig field){_suggest(k)}")
        out[k] = _coerce(f"{where}.{k}", k, v)
    return out


def _suggest(key: str) -> str:
    import difflib

    near = difflib.get_close_matches(key, list(_options()), n=3)
    return f"; did you mean {', '.join(near)}?" if near else ""


def _freeze(v):
    """A hashable stand-in for a value read from a SPEC or a run folder."""
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=repr)
    return v


def _find_duplicate_key(text: str) -> str | None:
    """Best-effort name of a key given twice in the same TOML table (for tomllib's error)."""
    table, seen = "", {}
    key_re = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_.-]+))\s*=""")
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("[[") or s.startswith("["):
            m = re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?", s)
            if m and not s.startswith("[["):
                table = m.group(1)
                seen.setdefault(table, {})
            elif m:
                table = f"{m.group(1)}[{n}]"
                seen[table] = {}
            continue
        m = key_re.match(line)
        if m:
            key = next(g for g in m.groups() if g)
            keys = seen.setdefault(table, {})
            if key in keys:
                name = f"{table}.{key}" if table and not table.endswith("]") else key
                what = "an axis may be given once" if table == "axes" else "a key may be given once"
                return f"duplicate key {name} (lines {keys[key]} and {n}): {what}"
            keys[key] = n
    return None


def _toml_loads(text: str, source: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise SpecError(
                "reading a TOML SPEC needs Python >= 3.11 (tomllib) or the tomli package "
                "(pip install tomli)"
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        dup = _find_duplicate_key(text)
        raise SpecError(f"{source}: {dup or f'not valid TOML: {exc}'}") from None


def read_toml(path) -> dict:
    """Read and parse a TOML file (a SPEC, or a figure SPEC of :mod:`analysis.repro`).

    Raises :class:`SpecError` naming the file when it cannot be read, is not valid TOML, or
    repeats a key.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        hint = ""
        if isinstance(exc, FileNotFoundError):
            hint = f" (bundled SPECs, by name: {', '.join(bundled_specs())})"
        raise SpecError(f"cannot read SPEC {path!r}: {exc.strerror or exc}{hint}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpecError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
            "a TOML file must be UTF-8"
        ) from None
    return _toml_loads(text, path)


#: Folder of the SPECs that ship with numstab (the paper's figures, ``example``).
BUNDLED_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs")


def bundled_specs() -> dict[str, str]:
    """Name -> path of the SPECs that ship with numstab (``example``, ``fig1``, ``fig2``, ...)."""
    names = sorted(f for f in os.listdir(BUNDLED_SPECS) if f.endswith(".toml"))
    return {f[: -len(".toml")]: os.path.join(BUNDLED_SPECS, f) for f in names}


def spec_file(spec) -> str:
    """The file a SPEC argument names: an existing file, else a bundled SPEC's name
    (``"fig2"`` or ``"fig2.toml"``); a path that exists in neither is returned as given (reading
    it then fails, naming it and the bundled names)."""
    path = os.fspath(spec)
    if os.path.exists(path):
        return path
    return bundled_specs().get(os.path.basename(path).removesuffix(".toml"), path)


def load_spec(path, **limits) -> Sweep:
    """Read and validate a SPEC file, or a bundled SPEC by name (:func:`bundled_specs`); see the
    module docstring. Raises :class:`SpecError`.

    ``limits``: ``max_runs`` and ``max_run_bytes``, as for :func:`parse_spec`.
    """
    path = spec_file(path)
    doc = read_toml(path)
    # A figure SPEC's [reproduce] table (budgets, panels, claims) is scripts/reproduce.py's;
    # the rest is an ordinary SPEC: the figure's default grid.
    doc.pop("reproduce", None)
    return parse_spec(doc, source=path, **limits)


def _count_runs(axes: dict, extra: list) -> int:
    """Runs a SPEC describes, from the axis lengths (the grid is not expanded)."""
    grid = math.prod(len(v) for v in axes.values()) if axes or not extra else 0
    return grid + len(extra)


def _merge_aliases(where: str, values: list, raw: list) -> tuple[list, list]:
    """An axis with values equal after canonicalisation kept once; notes naming them."""
    kept, notes, first = [], [], {}
    for v, r in zip(values, raw, strict=True):
        key = _freeze(v)
        if key in first:
            notes.append(
                f"{where}: {_spec_value(r)} and {_spec_value(first[key])} are both "
                f"{_spec_value(v)}: run once"
            )
            continue
        first[key] = r
        kept.append(v)
    return kept, notes


def parse_spec(
    spec: dict,
    *,
    source: str = "<spec>",
    max_runs: int | None = MAX_RUNS,
    max_run_bytes: int | str | None = "default",
) -> Sweep:
    """Validate a SPEC given as a dict (as ``tomllib`` returns it) and resolve its runs.

    Every configuration is constructed (TrainConfig's own checks), its memory estimated
    (:func:`numstab.run.footprint.estimate_run_memory`) and every distinct dataset generated once,
    so invalid values are reported here, before anything runs. Raises :class:`SpecError`
    naming the key (``axes.dtype``, ``runs[1].lr``, ...).

    Parameters
    ----------
    max_runs : int or None
        Refuse a SPEC of more runs (counted from the axis lengths before the grid is
        expanded); None: no limit (``--allow-large``).
    max_run_bytes : int, None or "default"
        Refuse a run whose estimated memory exceeds this; ``"default"``:
        :func:`default_max_run_bytes`; None: no limit.
    """
    from numstab.run import TrainConfig

    if max_run_bytes == "default":
        max_run_bytes = default_max_run_bytes()
    if not isinstance(spec, dict):
        raise SpecError(f"{source}: a SPEC is a TOML table, got {type(spec).__name__}")
    for k in spec:
        if k not in SPEC_SECTIONS:
            raise SpecError(
                f"{source}: unknown top-level key {k!r}; a SPEC has {', '.join(SPEC_SECTIONS)}"
                f"{_top_hint(k)}"
            )
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"{source}: description must be a string")
    base = _check_table("base", spec.get("base", {}))
    notes: list[str] = []

    raw_axes = spec.get("axes", {})
    if not isinstance(raw_axes, dict):
        raise SpecError("axes must be a table of lists, e.g. [axes] seed = [0, 1, 2]")
    axes: dict = {}
    for k, values in raw_axes.items():
        where = f"axes.{k}"
        if k not in _options():
            raise SpecError(f"{where}: unknown key (not a TrainConfig field){_suggest(k)}")
        if not isinstance(values, list):
            raise SpecError(
                f"{where}: an axis is a list of values, got {values!r} (write {k} = [{values!r}] "
                f"or put it in [base])"
            )
        if not values:
            raise SpecError(f"{where}: empty axis (give at least one value)")
        checked = [_coerce(f"{where}[{i}]", k, v) for i, v in enumerate(values)]
        seen = {}
        for i, v in enumerate(values):  # a value written twice (spellings are merged below)
            if _freeze(v) in seen:
                raise SpecError(
                    f"{where}: the value {_spec_value(v)} is listed twice (positions "
                    f"{seen[_freeze(v)]} and {i})"
                )
            seen[_freeze(v)] = i
        axes[k], merged = _merge_aliases(where, checked, values)
        notes += merged

    raw_runs = spec.get("runs", [])
    if not isinstance(raw_runs, list) or not all(isinstance(r, dict) for r in raw_runs):
        raise SpecError("runs must be an array of tables ([[runs]] sections)")
    extra = [_check_table(f"runs[{i}]", r) for i, r in enumerate(raw_runs)]

    n_runs = _count_runs(axes, extra)
    if max_runs is not None and n_runs > max_runs:
        shape = " x ".join(f"{len(v)} {k}" for k, v in axes.items()) or "no axes"
        raise SpecError(
            f"{source}: {n_runs:,} runs ({shape}; {len(extra)} in [[runs]]) is more than "
            f"{max_runs:,}; give --allow-large to run it anyway"
        )

    columns = list(axes)
    for r in extra:
        columns += [k for k in r if k not in columns]

    planned: list[PlannedRun] = []
    by_id: dict[str, str] = {}
    data_checked: set = set()

    def add(overrides: dict, origin: dict, source_name: str, name: str):
        kwargs = {**base, **overrides}
        try:
            config = TrainConfig(**kwargs)
        except (ValueError, TypeError) as exc:
            raise SpecError(_blame(kwargs, origin, exc, lambda kw: TrainConfig(**kw))) from None
        _check_memory(config, name, origin, max_run_bytes)
        data_key = _data_key(config)
        if data_key not in data_checked:
            from numstab.run import make_dataset

            try:
                make_dataset(config)
            except (ValueError, TypeError) as exc:
                raise SpecError(
                    _blame(kwargs, origin, exc, lambda kw: make_dataset(TrainConfig(**kw)))
                ) from None
            data_checked.add(data_key)
        rid = run_id(config)
        if rid in by_id:
            notes.append(f"{name} is the same run as {by_id[rid]} (id {rid}): run once")
            return
        by_id[rid] = name
        values = {c: _jsonable(getattr(config, c)) for c in columns}
        planned.append(PlannedRun(rid, config, source_name, values))

    names = list(axes)
    origin_base = {k: f"base.{k}" for k in base}
    # No axes: the base run alone, unless [[runs]] are given (then exactly those runs).
    grid = itertools.product(*(axes[k] for k in names)) if names or not extra else ()
    for combo in grid:
        ov = dict(zip(names, combo, strict=True))
        origin = {**origin_base, **{k: f"axes.{k}" for k in names}}
        label = "grid run " + (
            " ".join(f"{k}={_cell_axis(v)}" for k, v in ov.items()) if ov else "(base)"
        )
        add(ov, origin, "grid", label)
    for i, r in enumerate(extra):
        add(r, {**origin_base, **{k: f"runs[{i}].{k}" for k in r}}, f"runs[{i}]", f"runs[{i}]")

    return Sweep(
        source=source,
        description=description,
        base=base,
        axes=axes,
        extra=extra,
        columns=tuple(columns),
        runs=planned,
        notes=tuple(notes),
    )


#: The fields behind each term of a run's memory estimate (named when it is over the limit).
_SIZE_FIELDS = {
    "data": ("task", "p", "encoding", "parity_bits", "parity_samples"),
    "params": ("task", "p", "encoding", "parity_bits", "hidden", "bias", "dtype"),
    "optimizer": ("task", "p", "encoding", "parity_bits", "hidden", "optimizer", "state_dtype"),
    "activations": (
        "task",
        "p",
        "encoding",
        "parity_bits",
        "parity_samples",
        "train_fraction",
        "hidden",
        "dtype",
        "loss_dtype",
        "batch_size",
    ),
    "metrics": ("steps", "log_every", "hidden", "bias"),
}


def _check_memory(config, name: str, origin: dict, limit: int | None) -> None:
    """SpecError when the run's estimated memory is over ``limit`` bytes; the message names
    the SPEC keys behind the largest term."""
    if limit is None:
        return
    need = estimate_run_memory(config)
    if need.total <= limit:
        return
    terms = {k: getattr(need, k) for k in _SIZE_FIELDS}
    largest = max(terms, key=terms.get)
    keys = [k for k in _SIZE_FIELDS[largest] if k in origin]
    values = ", ".join(f"{origin[k]} = {_spec_value(_jsonable(getattr(config, k)))}" for k in keys)
    raise SpecError(
        (f"{values}: " if values else "")
        + f"{name} needs about {format_bytes(need.total)} of memory ({need.describe()}), more "
        f"than the limit of {format_bytes(limit)} per run; make it smaller or raise "
        "--max-run-gib"
    )


def _top_hint(k: str) -> str:
    if k in _options():
        return f" (TrainConfig fields go in [base] or [axes]: [base] {k} = ...)"
    return ""


def _data_key(config) -> tuple:
    c = config
    return (
        c.task,
        c.p,
        c.train_fraction,
        c.encoding,
        c.parity_bits,
        c.parity_k,
        c.parity_samples,
        c.seed,
    )


def _blame(kwargs: dict, origin: dict, exc: Exception, check) -> str:
    """Name the SPEC key behind a failed construction: the first key that fails on its own."""
    for k, v in kwargs.items():
        try:
            check({k: v})
        except (ValueError, TypeError) as e:
            return f"{origin.get(k, k)} = {_spec_value(v)}: {e}"
    keys = ", ".join(origin.get(k, k) for k in kwargs)
    return f"the combination of {keys} is invalid: {exc}"


def _spec_value(v) -> str:
    """A value written as in a SPEC (for error messages)."""
    if isinstance(v, str):
        return json.dumps(v)
    return _cell_axis(v)


def _jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    return v


# --- formatting helpers ----------------------------------------------------------------------


def _cell_axis(v) -> str:
    """An axis value as it appears in tables: SPEC syntax (``none``, ``true``, ``[16, 16]``)."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _cell(v) -> str:
    """A result value in a CSV: empty for None, repr for floats (round-trips exactly)."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _sort_key(v):
    if v is None:
        return (0, 0)
    if isinstance(v, (bool, int, float)):
        return (1, v)
    if isinstance(v, str):
        return (2, v)
    if isinstance(v, (list, tuple)):
        return (3, tuple(_sort_key(x) for x in v))
    return (4, repr(v))


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _text_table(header: list, rows: list) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _finite_or_none(o):
    """Plain JSON data with every non-finite float replaced by None (strict JSON)."""
    if isinstance(o, dict):
        return {k: _finite_or_none(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite_or_none(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


# --- atomic files ----------------------------------------------------------------------------


_atomic_open = atomic_open


def _write_json(path: str, obj) -> None:
    # NumPy scalars and tuples become JSON types first (the CLI's encoder hook), then
    # non-finite numbers become null.
    plain = json.loads(json.dumps(obj, default=json_default))
    with _atomic_open(path) as f:
        f.write(json.dumps(_finite_or_none(plain), indent=2, allow_nan=False) + "\n")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- one run, in a worker --------------------------------------------------------------------


def execute(task: dict) -> dict:
    """Train one run where it is called (a pool process or a Dask worker) and return the result.

    ``task`` holds ``id``, ``config`` (TrainConfig keyword arguments), ``threads`` (BLAS
    threads to pin, or None) and ``executor`` (recorded as is). Exceptions from training are
    caught and returned as ``status: "failed"`` with their type, message and traceback; the
    metrics logged up to the failure are returned too. No files are written here.
    """
    import numpy as np
    from threadpoolctl import threadpool_limits

    from numstab.run import MetricLog, NonFiniteError, TrainConfig, summarize, train
    from numstab.run.runtime import runtime_info, tune_allocator

    started = time.time()
    tune_allocator()
    if task.get("threads") is not None:
        # Persistent for this process (not restored): a pool process or Dask worker trains
        # one run at a time with this many BLAS threads.
        threadpool_limits(limits=int(task["threads"]))
    buf = io.StringIO()
    log = MetricLog(stream=buf)
    status, error = "ok", None
    t0 = time.perf_counter()
    try:
        config = TrainConfig(**task["config"])
        got = run_id(config)
        if got != task["id"]:
            raise RuntimeError(
                f"this worker resolves the configuration to id {got}, the client to "
                f"{task['id']}: numstab differs between client and worker"
            )
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            train(config, name=task["id"], log=log)
    except Exception as exc:
        status = "failed"
        error = {
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
        if isinstance(exc, NonFiniteError):
            error["step"] = exc.step
    wall = time.perf_counter() - t0
    summary = summarize(log, task["id"], grok_threshold=GROK_THRESHOLD)
    return {
        "id": task["id"],
        "status": status,
        "error": error,
        **summary,
        "wall_seconds": wall,
        "started": started,
        "finished": time.time(),
        "host": platform.node(),
        "pid": os.getpid(),
        "executor": task.get("executor"),
        "versions": versions(),
        "runtime": runtime_info(),
        "metrics_csv": buf.getvalue(),
    }


def _crash_result(task: dict, exc: BaseException) -> dict:
    """Result of a task whose worker failed outside training (worker died, result lost)."""
    return _failed_result(
        task,
        {
            "type": type(exc).__name__,
            "message": str(exc) or type(exc).__name__,
            "traceback": "".join(traceback.format_exception(exc)),
        },
    )


def _failed_result(task: dict, error: dict) -> dict:
    return {
        "id": task["id"],
        "status": "failed",
        "error": error,
        "sc_onset_step": None,
        "sc50_step": None,
        "train100_step": None,
        "grok_step": None,
        "final": {},
        "wall_seconds": None,
        "executor": task.get("executor"),
        "metrics_csv": None,
    }


# --- executors -------------------------------------------------------------------------------


# The local executor: worker processes of our own. Each is a fresh interpreter running
# _worker_main (never the caller's __main__, so a script without an `if __name__ ==
# "__main__":` guard works), trains one run at a time, and talks JSON lines over its
# stdin/stdout: {"ready": pid} once, then one result per task. The client knows which run each
# worker holds, so a worker that dies fails exactly that run and is replaced.

_WORKER_CODE = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from numstab.sweep import _worker_main; _worker_main()"
)


class WorkerStartError(RuntimeError):
    """A local worker process exited before it could take a run (its stderr says why)."""


def _worker_command() -> list[str]:
    """The command of a local worker: this interpreter, importing this very numstab."""
    import numstab

    root = os.path.dirname(os.path.dirname(os.path.abspath(numstab.__file__)))
    return [sys.executable, "-c", _WORKER_CODE, root]


def _worker_main() -> None:
    """Body of a local worker process (see the comment above :func:`_iter_local`)."""
    import queue
    import threading

    # Stopping is the client's decision (it sends SIGTERM); Ctrl-C at a terminal reaches the
    # client only, since workers run in their own session, but a stray SIGINT must not kill a
    # run either.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything printed while training goes to stderr, not into the channel
    inbox: queue.Queue = queue.Queue()

    def read_tasks():
        for line in sys.stdin:
            inbox.put(line)
        # The client closed the pipe (done, or stopping) or died: leave at once, even in
        # the middle of a run, so that no worker outlives its sweep.
        os._exit(0)

    threading.Thread(target=read_tasks, daemon=True).start()
    import numstab.train  # noqa: F401  (an import error shows before "ready")

    def send(obj) -> None:
        channel.write(json.dumps(obj, default=json_default) + "\n")
        channel.flush()

    send({"ready": os.getpid()})
    while True:
        task = json.loads(inbox.get())
        try:
            result = execute(task)
            send(result)
        except Exception as exc:  # the result could not be encoded: still answer
            send(_crash_result(task, exc))


@dataclass
class _Worker:
    proc: subprocess.Popen
    buf: bytearray = field(default_factory=bytearray)
    ready: bool = False
    task: dict | None = None


def _died_result(task: dict, pid: int, returncode: int) -> dict:
    if returncode < 0:
        try:
            how = f"was killed by signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with code {returncode}"
    return _failed_result(
        task,
        {
            "type": "WorkerDied",
            "message": f"the worker process (pid {pid}) training this run {how}",
            "traceback": None,
        },
    )


def _stop_workers(procs: list, grace: float = STOP_GRACE_S) -> None:
    """Close the workers' input (idle ones leave), SIGTERM the rest, SIGKILL after ``grace``."""
    for p in procs:
        with contextlib.suppress(OSError):
            p.stdin.close()
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        with contextlib.suppress(OSError):
            p.stdout.close()


def _iter_local(tasks: list, workers: int, stop=None) -> Iterator[tuple[dict, dict]]:
    """Run ``tasks`` on ``workers`` local worker processes; yield ``(task, result)`` as they
    finish. Returns early, with every worker stopped, once ``stop`` is true (a signal)."""
    pending = deque(tasks)
    sel = selectors.DefaultSelector()
    procs: list[subprocess.Popen] = []

    def start() -> None:
        proc = subprocess.Popen(
            _worker_command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        procs.append(proc)
        sel.register(proc.stdout, selectors.EVENT_READ, _Worker(proc))

    def assign(w: _Worker) -> None:
        if not pending:
            with contextlib.suppress(OSError):
                w.proc.stdin.close()  # nothing left: the worker leaves
            return
        w.task = pending.popleft()
        try:
            w.proc.stdin.write((json.dumps(w.task) + "\n").encode())
            w.proc.stdin.flush()
        except OSError:  # it died meanwhile: the run goes back, its death is seen below
            pending.appendleft(w.task)
            w.task = None

    try:
        for _ in range(min(workers, len(pending))):
            start()
        while sel.get_map():
            if stop:
                return
            for key, _ in sel.select(timeout=POLL_S):
                w = key.data
                chunk = os.read(key.fd, 1 << 20)
                if not chunk:  # the worker exited
                    sel.unregister(key.fileobj)
                    code = w.proc.wait()
                    if not w.ready:
                        raise WorkerStartError(
                            f"a local worker process exited with code {code} before taking a "
                            "run; its messages are above"
                        )
                    if w.task is not None:
                        task, w.task = w.task, None
                        yield task, _died_result(task, w.proc.pid, code)
                    if pending and not stop:
                        start()
                    continue
                w.buf += chunk
                while b"\n" in w.buf:
                    line, _, w.buf = w.buf.partition(b"\n")
                    try:
                        msg = json.loads(line)
                    except ValueError as exc:
                        msg = {"unreadable": str(exc)}
                    if not w.ready:
                        w.ready = True
                    elif w.task is not None:
                        task, w.task = w.task, None
                        if "unreadable" in msg:
                            msg = _crash_result(task, ValueError(msg["unreadable"]))
                        yield task, msg
                    assign(w)
    finally:
        sel.close()
        _stop_workers(procs)


def _dask_modules():
    try:
        from dask import distributed
    except ImportError as exc:
        raise UsageError(
            f"--executor dask needs dask.distributed ({exc}); install the sweep extra: "
            "pip install 'numstab[sweep]'"
        ) from None
    return distributed


@contextlib.contextmanager
def _dask_client(scheduler: str, workers: int, threads: int):
    distributed = _dask_modules()
    cluster = None
    try:
        if scheduler == "local":
            cluster = distributed.LocalCluster(
                processes=False,
                n_workers=workers,
                threads_per_worker=1,
                dashboard_address=None,
            )
            client = distributed.Client(cluster)
        else:
            try:
                client = distributed.Client(scheduler, timeout="10s")
            except (OSError, TimeoutError) as exc:
                raise UsageError(f"cannot reach the Dask scheduler {scheduler!r}: {exc}") from None
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def _iter_dask(tasks: list, client, stop=None) -> Iterator[tuple[dict, dict]]:
    """Submit ``tasks`` to a Dask client; yield ``(task, result)`` as they finish. Returns
    early, with the tasks cancelled, once ``stop`` is true (a signal)."""
    distributed = _dask_modules()
    futures = {}
    for t in tasks:
        fut = client.submit(
            execute, t, pure=False, key=f"numstab-sweep-{t['id']}-{os.getpid()}-{time.time_ns()}"
        )
        futures[fut] = t
    done = distributed.as_completed(list(futures))
    try:
        while not done.is_empty():
            if stop:
                return
            batch = done.next_batch(block=False)
            if not batch:
                time.sleep(POLL_S / 2)
                continue
            for fut in batch:
                task = futures[fut]
                try:
                    result = fut.result()
                except Exception as exc:
                    result = _crash_result(task, exc)
                yield task, result
    finally:
        if not done.is_empty():
            with contextlib.suppress(Exception):
                client.cancel(list(futures))


# --- the sweep -------------------------------------------------------------------------------


@dataclass
class SweepReport:
    """What :func:`run_sweep` did.

    ``executed``: ids trained in this invocation (in completion order); ``skipped``: ids left
    alone (already ok, or failed before and not retried); ``failed``: one dict per run of the
    SPEC whose status is failed after this invocation (``id``, ``label``, ``error``,
    ``previous``: True if it failed in an earlier invocation and was not rerun);
    ``collected``: what :func:`collect` returned; ``interrupted``: stopped by ``signal``
    (SIGINT or SIGTERM); ``error``: why the sweep stopped early otherwise (a local worker
    could not start); ``exit_code``: 0, 1, 130 (SIGINT) or 143 (SIGTERM).
    """

    planned: list
    executed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    wall_seconds: float = 0.0
    collected: dict | None = None
    interrupted: bool = False
    signal: int | None = None
    error: str | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 128 + (self.signal or signal.SIGINT)
        return 1 if self.failed or self.error else 0


def _state(run_dir: str) -> tuple[str, dict | None]:
    """``("ok" | "failed" | "incomplete" | "new", summary)`` of a run folder."""
    s = _read_json(os.path.join(run_dir, "summary.json"))
    if isinstance(s, dict) and s.get("status") in ("ok", "failed"):
        return s["status"], s
    if os.path.exists(os.path.join(run_dir, "config.json")):
        return "incomplete", None
    return "new", None


def _plan(sweep: Sweep, out: str | None, force: bool, retry_failed: bool):
    todo, skip = [], []
    for r in sweep.runs:
        state, s = _state(os.path.join(out, r.id)) if out else ("new", None)
        if force or state in ("new", "incomplete") or (state == "failed" and retry_failed):
            todo.append((r, state))
        else:
            skip.append((r, state, s))
    return todo, skip


def _write_run_result(run_dir: str, result: dict, planned: PlannedRun) -> dict:
    metrics = result.pop("metrics_csv", None)
    if metrics:
        with _atomic_open(os.path.join(run_dir, "metrics.csv")) as f:
            f.write(metrics)
    summary = {
        "id": planned.id,
        "status": result["status"],
        "error": result["error"],
        "source": planned.source,
        "axes": planned.axes,
        **{k: v for k, v in result.items() if k not in ("id", "status", "error")},
        "config": planned.config.to_dict(),
    }
    _write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary


def _progress_line(k: int, n: int, r: PlannedRun, s: dict) -> str:
    wall = s.get("wall_seconds")
    status = "ok" if s["status"] == "ok" else "FAILED"
    head = f"[{k:>{len(str(n))}}/{n}] {status:6s} {r.id}  {r.label()}  {_fmt(wall, '.1f')} s"
    if s["status"] != "ok":
        return f"{head}  {_error_text(s.get('error'))}"
    fin = s.get("final") or {}
    return (
        f"{head}  test acc {_fmt(fin.get('test_acc'), '.3f')}  "
        f"SC-50 step {_fmt(s.get('sc50_step'), 'd')}"
    )


def _error_text(error) -> str:
    if not error:
        return ""
    if not isinstance(error, dict):
        return str(error).replace("\n", " ")
    return f"{error.get('type')}: {error.get('message')}".replace("\n", " ")


def run_sweep(
    spec,
    out,
    *,
    executor: str = "local",
    workers: int = 1,
    threads: int | None = 1,
    scheduler: str | None = None,
    force: bool = False,
    retry_failed: bool = False,
    quiet: bool = False,
    max_runs: int | None = MAX_RUNS,
    max_run_bytes: int | str | None = "default",
    stdout=None,
    stderr=None,
) -> SweepReport:
    """Run every run of a SPEC that is not done yet, write its folder, then :func:`collect`.

    Parameters
    ----------
    spec : path, dict or Sweep
        The SPEC (a TOML file path, the parsed dict, or :func:`load_spec`'s result).
    out : path
        The sweep folder ``DIR``.
    executor : {"local", "dask"}
    workers : int
        Local worker processes, or LocalCluster workers (``scheduler="local"``).
    threads : int or None
        BLAS threads pinned in each worker (None: leave the library's setting).
    scheduler : str
        Dask scheduler address (``tcp://host:8786``) or ``"local"``; dask executor only.
    force, retry_failed : bool
        Rerun every run / the failed runs too.
    quiet : bool
        No progress bar (it is also off when stderr is not a terminal).
    max_runs, max_run_bytes
        Limits of :func:`parse_spec` for a SPEC given as a path or dict.

    SIGINT and SIGTERM (in the main thread) stop the sweep: the workers are stopped (runs in
    flight stay incomplete), finished runs are kept and collected, and the report's
    ``exit_code`` is 130 or 143.

    Raises
    ------
    SpecError, UsageError
        Before anything is written.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    limits = {"max_runs": max_runs, "max_run_bytes": max_run_bytes}
    sweep = (
        spec
        if isinstance(spec, Sweep)
        else (parse_spec(spec, **limits) if isinstance(spec, dict) else load_spec(spec, **limits))
    )
    _check_options(executor, workers, threads, scheduler)
    if executor == "dask":
        _dask_modules()
    _check_backends(sweep, executor, scheduler)
    out = os.fspath(out)
    claim = check_out_dir(out)  # one writer per folder: a second sweep is refused (exit 2)
    report = SweepReport(planned=[r.id for r in sweep.runs])
    t0 = time.perf_counter()
    with claim, graceful_stop() as stop:
        todo, skip = _plan(sweep, out, force, retry_failed)
        report.skipped = [r.id for r, _s, _x in skip]
        n_ok = sum(1 for _r, st, _x in skip if st == "ok")
        n_failed = len(skip) - n_ok
        print(
            f"{len(sweep.runs)} runs in {sweep.source}: {len(todo)} to run, {n_ok} already "
            f"done"
            + (
                f", {n_failed} failed before (not rerun; --retry-failed reruns them)"
                if n_failed
                else ""
            )
            + f"; output {out}",
            file=stdout,
            flush=True,
        )
        for note in sweep.notes:
            print(f"note: {note}", file=stdout, flush=True)
        exec_info = {
            "kind": executor,
            "workers": workers,
            "threads": threads,
            "scheduler": scheduler,
        }
        planned_by_id = {r.id: r for r, _ in todo}
        tasks = [
            {
                "id": r.id,
                "config": _config_kwargs(r.config),
                "threads": threads,
                "executor": exec_info,
            }
            for r, _ in todo
        ]
        bar = None
        try:
            with contextlib.ExitStack() as stack:
                client = None
                if tasks and executor == "dask":
                    if scheduler == "local" and threads is not None:
                        from threadpoolctl import threadpool_limits

                        # In-process workers pin this process's BLAS; restore it afterwards.
                        stack.enter_context(threadpool_limits(limits=threads))
                    # Connect before writing anything: an unreachable scheduler is exit 2.
                    client = stack.enter_context(_dask_client(scheduler, workers, threads))
                    if scheduler != "local":
                        exec_info["workers"] = len(client.scheduler_info()["workers"])
                _write_json(
                    os.path.join(out, "sweep.json"),
                    {
                        "spec": sweep.to_dict(),
                        "options": exec_info | {"force": force, "retry_failed": retry_failed},
                        "started": time.time(),
                    },
                )
                for r, _ in todo:
                    _prepare_run_dir(os.path.join(out, r.id), r, sweep.columns)
                if tasks and not quiet and stderr.isatty():
                    from tqdm import tqdm

                    bar = tqdm(total=len(tasks), file=stderr, unit="run", desc="sweep")
                if not tasks:
                    results = iter(())
                elif client is None:
                    results = _iter_local(tasks, workers, stop)
                else:
                    results = _iter_dask(tasks, client, stop)
                if tasks:  # on an interrupt, stop the executor before the client goes away
                    stack.callback(results.close)
                for k, (task, result) in enumerate(results, 1):
                    r = planned_by_id[task["id"]]
                    s = _write_run_result(os.path.join(out, r.id), result, r)
                    report.executed.append(r.id)
                    line = _progress_line(k, len(tasks), r, s)
                    if bar is not None:
                        bar.write(line, file=stdout)
                        bar.update(1)
                    else:
                        print(line, file=stdout, flush=True)
        except KeyboardInterrupt:
            report.interrupted, report.signal = True, signal.SIGINT
        except WorkerStartError as exc:
            report.error = str(exc)
        finally:
            if bar is not None:
                bar.close()
        if stop and not report.interrupted:
            report.interrupted, report.signal = True, stop.signum
        report.wall_seconds = time.perf_counter() - t0
        for r in sweep.runs:
            state, s = _state(os.path.join(out, r.id))
            if state == "failed":
                report.failed.append(
                    {
                        "id": r.id,
                        "label": r.label(),
                        "error": s.get("error"),
                        "previous": r.id not in report.executed,
                    }
                )
        report.collected = collect(out)
    done = len(report.executed)
    nw = exec_info["workers"]
    print(
        f"{done} run{'s' if done != 1 else ''} executed in {report.wall_seconds:.1f} s "
        f"({executor}, {nw} worker{'s' if nw != 1 else ''}, "
        f"{threads if threads is not None else 'default'} BLAS thread(s) each); "
        f"collected tables in {out}",
        file=stdout,
        flush=True,
    )
    _print_skipped(report.collected, stderr)
    if report.interrupted:
        name = signal.Signals(report.signal).name
        print(
            f"{PROG}: interrupted ({name}) after {done} of {len(tasks)} runs; the runs in "
            "flight were stopped; invoke the same command again to resume",
            file=stderr,
        )
    if report.error:
        print(f"{PROG}: error: {report.error}", file=stderr)
    if report.failed:
        print(f"{PROG}: {len(report.failed)} run(s) failed:", file=stderr)
        for f in report.failed:
            when = " (earlier invocation; --retry-failed reruns it)" if f["previous"] else ""
            print(f"  {f['id']}  {f['label']}  {_error_text(f['error'])}{when}", file=stderr)
    return report


def _check_backends(sweep: Sweep, executor: str, scheduler: str | None) -> None:
    """UsageError when a run asks for a backend this machine cannot run (CuPy without CuPy or
    a GPU). Runs on a remote Dask cluster are not checked here: its workers may have GPUs."""
    if executor == "dask" and scheduler != "local":
        return
    for name in sorted({r.config.backend for r in sweep.runs} - {"numpy"}):
        try:
            check_backend(name)
        except UsageError as exc:
            raise UsageError(f'the SPEC asks for backend = "{name}": {exc}') from None


def _prepare_run_dir(run_dir: str, r: PlannedRun, columns) -> None:
    """Make a run's folder incomplete (no summary, no metrics) and write its config.json."""
    os.makedirs(run_dir, exist_ok=True)
    for name in ("summary.json", "metrics.csv"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(run_dir, name))
    _write_json(
        os.path.join(run_dir, "config.json"),
        {
            "id": r.id,
            "source": r.source,
            "axes": r.axes,
            "columns": list(columns),
            "config": r.config.to_dict(),
        },
    )


def _config_kwargs(config) -> dict:
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _check_options(executor, workers, threads, scheduler) -> None:
    if executor not in ("local", "dask"):
        raise UsageError(f"--executor must be local or dask, got {executor!r}")
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    if executor == "dask" and not scheduler:
        raise UsageError(
            "--executor dask needs --scheduler ADDRESS (tcp://host:8786) or --scheduler local"
        )
    if executor == "local" and scheduler:
        raise UsageError("--scheduler is for --executor dask")


# --- collect ---------------------------------------------------------------------------------


def _run_dirs(out: str) -> list[str]:
    try:
        names = sorted(os.listdir(out))
    except OSError:
        return []
    return [
        n for n in names if _ID_RE.match(n) and os.path.isfile(os.path.join(out, n, "config.json"))
    ]


def _read_run_config(path: str) -> tuple[dict | None, str | None]:
    """A run's ``config.json`` as written by the sweep, or ``(None, why it is unusable)``."""
    try:
        with open(path, "rb") as f:
            cfg = json.loads(f.read().decode("utf-8"))
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except ValueError as exc:
        return None, f"is not valid JSON ({exc})"
    if not isinstance(cfg, dict):
        return None, f"is not a JSON object (a {type(cfg).__name__})"
    if not isinstance(cfg.get("axes", {}), dict):
        return None, '"axes" is not an object'
    if not isinstance(cfg.get("config", {}), dict):
        return None, '"config" is not an object'
    cols = cfg.get("columns", [])
    if not isinstance(cols, list) or not all(isinstance(c, str) for c in cols):
        return None, '"columns" is not a list of names'
    return cfg, None


def _read_metrics(path: str) -> tuple[list, str | None]:
    """The data rows of a run's ``metrics.csv`` (read whole, so that a bad file adds no row to
    the collected table), or ``([], why it is unusable)``."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        return [], f"cannot be read ({exc.strerror or exc})"
    except UnicodeDecodeError:
        return [], "is not UTF-8 text"
    except csv.Error as exc:
        return [], f"is not valid CSV ({exc})"
    return rows[1:], None


def _summary_row(rid: str, cfg: dict, s: dict | None, columns: list) -> dict:
    conf = cfg.get("config", {})
    row = {"run_id": rid}
    for c in columns:
        row[c] = cfg.get("axes", {}).get(c, conf.get(c))
    if s is None:
        row.update({k: None for k in SUMMARY_FIELDS})
        row["status"] = "incomplete"
        return row
    fin = s.get("final")
    fin = fin if isinstance(fin, dict) else {}
    row.update(
        status=s.get("status"),
        error=_error_text(s.get("error")) or None,
        sc_onset_step=s.get("sc_onset_step"),
        sc50_step=s.get("sc50_step"),
        train100_step=s.get("train100_step"),
        grok_step=s.get("grok_step"),
        final_step=fin.get("step"),
        final_train_acc=fin.get("train_acc"),
        final_test_acc=fin.get("test_acc"),
        final_train_loss=fin.get("train_loss"),
        final_sc_fraction=fin.get("sc_fraction"),
        wall_seconds=s.get("wall_seconds"),
    )
    return row


def _group(rows: list, columns: list) -> list:
    keys = [c for c in columns if c not in GROUP_EXCLUDE]
    groups: dict = {}
    for row in rows:
        groups.setdefault(tuple(_freeze(row[k]) for k in keys), []).append(row)
    out = []
    for gkey in sorted(groups, key=lambda t: tuple(_sort_key(v) for v in t)):
        members = groups[gkey]
        g = {k: _jsonable(v) for k, v in zip(keys, gkey, strict=True)}
        if "seed" in columns:
            g["seeds"] = " ".join(str(m["seed"]) for m in members)
        ok = [m for m in members if m["status"] == "ok"]
        g["n_runs"] = len(members)
        g["n_ok"] = len(ok)
        g["n_failed"] = sum(1 for m in members if m["status"] == "failed")
        g["n_incomplete"] = sum(1 for m in members if m["status"] == "incomplete")
        for f in NUMERIC_FIELDS:
            vals = [float(m[f]) for m in ok if _is_number(m[f])]
            g[f"{f}_n"] = len(vals)
            g[f"{f}_mean"] = statistics.fmean(vals) if vals else None
            g[f"{f}_std"] = statistics.stdev(vals) if len(vals) >= 2 else None
        out.append(g)
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _write_csv(path: str, header: list, rows: list, axis_cols: list) -> None:
    with _atomic_open(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for row in rows:
            w.writerow([_cell_axis(row[h]) if h in axis_cols else _cell(row[h]) for h in header])


def collect(out) -> dict:
    """Gather every run folder of ``out`` into three CSV tables (written atomically) and return
    them.

    Files (rows sorted by the axis columns, then run id):

    - ``collected_metrics.csv``: every run's ``metrics.csv`` rows with a leading ``run_id``;
    - ``collected_summary.csv``: one row per run: ``run_id``, the axis columns, then
      :data:`SUMMARY_FIELDS` (``grok_step``: first logged step with test accuracy >= 0.9);
      unfinished runs have status ``incomplete``;
    - ``collected_grouped.csv``: one row per combination of the axis columns other than
      ``seed``: ``seeds``, ``n_runs``, ``n_ok``, ``n_failed``, ``n_incomplete`` and for each of
      :data:`NUMERIC_FIELDS` ``<f>_n`` (ok runs with a value: for a ``*_step`` field, how many
      reached it), ``<f>_mean`` and ``<f>_std`` (sample std, ddof = 1; empty when ``<f>_n``
      < 2). Failed and incomplete runs are counted, never averaged.

    Axis values are written in SPEC syntax (``none``, ``true``, ``[16, 16]``); empty cells are
    None. Returns ``{"columns", "summary", "grouped", "metrics_rows", "paths", "skipped"}``
    with the two tables as lists of dicts (None for missing values; the metrics are only
    counted, not loaded).

    A folder whose ``config.json`` is unusable (not UTF-8, not JSON, not the object the sweep
    writes) is left out of every table, and a ``metrics.csv`` that cannot be read adds no
    metrics rows (its run keeps its summary row); each is listed in ``skipped`` as
    ``{"path", "reason"}``. Nothing here raises on a malformed folder.
    """
    from numstab.run import CSV_HEADER

    out = os.fspath(out)
    entries = []
    columns: list = []
    skipped: list = []
    for rid in _run_dirs(out):
        path = os.path.join(out, rid, "config.json")
        cfg, why = _read_run_config(path)
        if cfg is None:
            skipped.append({"path": path, "reason": why})
            continue
        for c in cfg.get("columns", list(cfg.get("axes", {}))):
            if c not in columns:
                columns.append(c)
        _st, s = _state(os.path.join(out, rid))
        entries.append((rid, cfg, s))
    rows = [_summary_row(rid, cfg, s, columns) for rid, cfg, s in entries]
    rows.sort(key=lambda r: (tuple(_sort_key(r[c]) for c in columns), r["run_id"]))
    grouped = _group(rows, columns)

    paths = {k: os.path.join(out, f"collected_{k}.csv") for k in ("metrics", "summary", "grouped")}
    n_metrics = 0
    with _atomic_open(paths["metrics"]) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("run_id", *CSV_HEADER))
        for row in rows:
            mpath = os.path.join(out, row["run_id"], "metrics.csv")
            if row["status"] == "incomplete" or not os.path.exists(mpath):
                continue
            data, why = _read_metrics(mpath)
            if why is not None:
                skipped.append({"path": mpath, "reason": why})
            for r in data:
                w.writerow((row["run_id"], *r))
                n_metrics += 1
    _write_csv(paths["summary"], ["run_id", *columns, *SUMMARY_FIELDS], rows, columns)
    gcols = list(grouped[0]) if grouped else [c for c in columns if c not in GROUP_EXCLUDE]
    _write_csv(paths["grouped"], gcols, grouped, [c for c in columns if c not in GROUP_EXCLUDE])
    return {
        "columns": columns,
        "summary": rows,
        "grouped": grouped,
        "metrics_rows": n_metrics,
        "paths": paths,
        "skipped": skipped,
    }


def _print_skipped(res: dict | None, stderr) -> None:
    for sk in (res or {}).get("skipped", []):
        print(f"{PROG}: warning: skipped {sk['path']}: {sk['reason']}", file=stderr)


def _print_collected(res: dict, stdout) -> None:
    cols = res["columns"]
    header = [
        "run_id",
        *cols,
        "status",
        "SC onset",
        "SC-50",
        "train 100%",
        "grok",
        "train acc",
        "test acc",
        "wall s",
    ]
    body = []
    for r in res["summary"]:
        body.append(
            [
                r["run_id"],
                *(_cell_axis(r[c]) for c in cols),
                r["status"],
                _fmt(r["sc_onset_step"], "d"),
                _fmt(r["sc50_step"], "d"),
                _fmt(r["train100_step"], "d"),
                _fmt(r["grok_step"], "d"),
                _fmt(r["final_train_acc"], ".4f"),
                _fmt(r["final_test_acc"], ".4f"),
                _fmt(r["wall_seconds"], ".1f"),
            ]
        )
    print(_text_table(header, body), file=stdout)
    for r in res["summary"]:
        if r["error"]:
            print(f"  {r['run_id']}: {r['error']}", file=stdout)


# --- command line ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Run a grid of training runs described by a TOML SPEC (resumable; local "
        "processes or a Dask cluster), then collect the results. "
        f"'{PROG} collect DIR' only collects.",
        formatter_class=HelpFormatter,
    )
    a = p.add_argument
    a("spec", metavar="SPEC", help="TOML file: [base], [axes], [[runs]]")
    a("--out", metavar="DIR", default=None, help="sweep folder (one subfolder per run)")
    a("--executor", choices=["local", "dask"], default="local", help="where runs execute")
    a("--workers", type=int, default=1, help="local worker processes / LocalCluster workers")
    a("--threads", type=int, default=1, help="BLAS threads pinned in each worker")
    a(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="dask: scheduler address (tcp://host:8786) or 'local' for an in-process LocalCluster",
    )
    a("--force", action="store_true", help="rerun every run, finished or not")
    a("--retry-failed", action="store_true", help="rerun runs that failed before")
    a("--dry-run", action="store_true", help="list the runs (id, axes, state) and exit")
    a("--quiet", action="store_true", help="no progress bar")
    a(
        "--allow-large",
        action="store_true",
        help=f"accept a SPEC of more than {MAX_RUNS:,} runs",
    )
    a(
        "--max-run-gib",
        type=float,
        default=None,
        metavar="GIB",
        help="refuse a run whose estimated memory exceeds this many GiB "
        f"(default: {MEMORY_FRACTION:g} of the physical memory)",
    )
    return p


def build_collect_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=f"{PROG} collect",
        description="Collect every run of a sweep folder into collected_metrics.csv, "
        "collected_summary.csv and collected_grouped.csv.",
    )
    p.add_argument("dir", metavar="DIR", help="sweep folder")
    p.add_argument("--quiet", action="store_true", help="do not print the summary table")
    return p


def _dry_run(sweep: Sweep, out: str | None, force: bool, retry_failed: bool, stdout) -> None:
    todo, skip = _plan(sweep, out, force, retry_failed)
    will = {r.id: ("rerun" if st in ("ok", "failed") else "run") for r, st in todo}
    state = {r.id: st for r, st in todo} | {r.id: st for r, st, _ in skip}
    header = ["id", "source", *sweep.columns, "state", "action"]
    rows = [
        [
            r.id,
            r.source,
            *(_cell_axis(r.axes[c]) for c in sweep.columns),
            state[r.id],
            will.get(r.id, "skip"),
        ]
        for r in sweep.runs
    ]
    print(
        f"{len(sweep.runs)} runs in {sweep.source} ({sum(r.source == 'grid' for r in sweep.runs)}"
        f" grid, {sum(r.source != 'grid' for r in sweep.runs)} explicit); {len(todo)} would "
        f"run" + (f" into {out}" if out else ""),
        file=stdout,
    )
    for note in sweep.notes:
        print(f"note: {note}", file=stdout)
    print(_text_table(header, rows), file=stdout)


class _PipeGuard:
    """A text stream that goes quiet once its reader has gone (EPIPE, as after ``| head``).

    Python's recommended handling of a closed pipe: stop writing, and point the descriptor at
    ``os.devnull`` so that the interpreter's last flush of stdout cannot fail again.
    """

    def __init__(self, stream):
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except BrokenPipeError:
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._silence()

    def isatty(self) -> bool:
        return not self.broken and self.stream.isatty()

    def _silence(self) -> None:
        self.broken = True
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            return
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, fd)
        finally:
            os.close(devnull)


def _limits(args) -> dict:
    gib = args.max_run_gib
    if gib is not None and not (math.isfinite(gib) and gib > 0):
        raise UsageError(f"--max-run-gib must be a positive number of GiB, got {gib}")
    return {
        "max_runs": None if args.allow_large else MAX_RUNS,
        "max_run_bytes": "default" if gib is None else int(gib * 2**30),
    }


def _collect_main(argv: list, stdout: _PipeGuard, stderr) -> int:
    args = build_collect_parser().parse_args(argv)
    if not os.path.isdir(args.dir):
        print(f"{PROG} collect: error: {args.dir!r} is not a folder", file=stderr)
        return 2
    res = collect(args.dir)
    if not args.quiet:
        _print_collected(res, stdout)
    print(f"{len(res['summary'])} runs collected into {args.dir}", file=stdout)
    stdout.flush()
    _print_skipped(res, stderr)
    if stdout.broken:
        return EXIT_BROKEN_PIPE
    return 1 if res["skipped"] else 0


def main(argv=None, *, stdout=None, stderr=None) -> int:
    """The command line; returns the exit code (see the module docstring)."""
    stdout = _PipeGuard(stdout or sys.stdout)
    stderr = stderr or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "collect":
            return _collect_main(argv[1:], stdout, stderr)
        args = build_parser().parse_args(argv)
        try:
            sweep = load_spec(args.spec, **_limits(args))
            _check_options(args.executor, args.workers, args.threads, args.scheduler)
            if args.dry_run:
                _dry_run(sweep, args.out, args.force, args.retry_failed, stdout)
                stdout.flush()
                return EXIT_BROKEN_PIPE if stdout.broken else 0
            if args.out is None:
                raise UsageError("--out DIR is required (except with --dry-run)")
            report = run_sweep(
                sweep,
                args.out,
                executor=args.executor,
                workers=args.workers,
                threads=args.threads,
                scheduler=args.scheduler,
                force=args.force,
                retry_failed=args.retry_failed,
                quiet=args.quiet,
                stdout=stdout,
                stderr=stderr,
            )
        except (SpecError, UsageError) as exc:
            print(f"{PROG}: error: {exc}", file=stderr)
            return 2
        # A closed stdout never stops a sweep: its record is the files, not the progress lines.
        stdout.flush()
        return report.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was being handled
        print(f"{PROG}: interrupted", file=stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
