"""SPECs: reading, validating and resolving a TOML grid of runs; the stable id of a run.

A SPEC has three optional tables (docs/sweep.md)::

    [base]                      # overrides of TrainConfig's defaults, shared by every run
    [axes]                      # the grid: the Cartesian product of these lists
    [[runs]]                    # explicit extra runs: base + these overrides (no axes)

Keys are :class:`numstab.run.TrainConfig` field names; every value is validated and
canonicalised by the field's one declaration (:mod:`numstab.run.options`; ``"fp16"`` is
``"float16"``), and ``"none"`` stands for None where the field allows None (TOML has no null).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field

try:
    import tomllib
except ImportError:  # Python 3.10
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

from numstab.run import TrainConfig, make_dataset
from numstab.run.config import ID_NEUTRAL
from numstab.run.footprint import default_max_run_bytes, estimate_run_memory, format_bytes
from numstab.run.options import coerce, options_of
from numstab.sweep.cells import _cell_axis, _freeze, _jsonable, _spec_value

SPEC_SECTIONS = ("description", "base", "axes", "runs", "reproduce")
#: Top-level tables that belong to other tools and are ignored here (``scripts/reproduce.py``
#: keeps its budgets in ``[reproduce]``).
IGNORED_SECTIONS = ("reproduce",)
#: Most runs a SPEC may describe without ``allow_large`` (``--allow-large``).
MAX_RUNS = 10_000
#: Folder of the SPECs that ship with numstab (the paper's figures, ``example``).
BUNDLED_SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")
#: TrainConfig field -> its :class:`numstab.run.options.Option`: what each SPEC key accepts.
_OPTIONS = options_of(TrainConfig)


class SpecError(ValueError):
    """A malformed SPEC (exit 2); the message names the offending key."""


# --- configuration identity -----------------------------------------------------------------


def canonical_json(config) -> str:
    """The canonical JSON of a :class:`~numstab.run.TrainConfig` that :func:`run_id` hashes.

    ``config.to_dict()`` of the validated config, sorted keys, no whitespace, without the
    fields of :data:`~numstab.run.config.ID_NEUTRAL` that hold their neutral value. TrainConfig
    stores every field canonically (``dtype="fp16"`` as ``"float16"``, ``lr=1`` as ``1.0``),
    so spellings of one configuration share one id.
    """
    d = {
        k: v for k, v in config.to_dict().items() if k not in ID_NEUTRAL or v != ID_NEUTRAL[k]
    }
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def run_id(config) -> str:
    """Stable id of a run: the first 12 hex digits of SHA-256 of :func:`canonical_json`.

    Equal configurations give equal ids in every process and invocation; any change of a field
    changes the id. A field added later leaves existing ids as they were when it is declared
    in :data:`~numstab.run.config.ID_NEUTRAL` (left out of the id at its neutral value).

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
    spec = _OPTIONS[name]
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
        if k not in _OPTIONS:
            raise SpecError(f"{where}.{k}: unknown key (not a TrainConfig field){_suggest(k)}")
        out[k] = _coerce(f"{where}.{k}", k, v)
    return out


def _suggest(key: str) -> str:
    near = difflib.get_close_matches(key, list(_OPTIONS), n=3)
    return f"; did you mean {', '.join(near)}?" if near else ""


def _top_hint(k: str) -> str:
    if k in _OPTIONS:
        return f" (TrainConfig fields go in [base] or [axes]: [base] {k} = ...)"
    return ""


# --- reading TOML ----------------------------------------------------------------------------


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
    if tomllib is None:
        raise SpecError(
            "reading a TOML SPEC needs Python >= 3.11 (tomllib) or the tomli package "
            "(pip install tomli)"
        )
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
    """Read and validate a SPEC file, or a bundled SPEC by name (:func:`bundled_specs`).
    Raises :class:`SpecError`.

    ``limits``: ``max_runs`` and ``max_run_bytes``, as for :func:`parse_spec`.
    """
    path = spec_file(path)
    doc = read_toml(path)
    # A figure SPEC's [reproduce] table (budgets, panels, claims) is scripts/reproduce.py's;
    # the rest is an ordinary SPEC: the figure's default grid.
    for name in IGNORED_SECTIONS:
        doc.pop(name, None)
    return parse_spec(doc, source=path, **limits)


# --- parsing a SPEC --------------------------------------------------------------------------


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

    Without ``[axes]`` the grid is the single base run, or nothing when ``[[runs]]`` are given.
    A key both in ``[base]`` and ``[axes]`` takes the axis values. A value written twice in an
    axis is an error; entries that resolve to the same run run once, with a note.

    Parameters
    ----------
    max_runs : int or None
        Refuse a SPEC of more runs (counted from the axis lengths before the grid is
        expanded); None: no limit (``--allow-large``).
    max_run_bytes : int, None or "default"
        Refuse a run whose estimated memory exceeds this; ``"default"``:
        :func:`default_max_run_bytes`; None: no limit.
    """
    if max_run_bytes == "default":
        max_run_bytes = default_max_run_bytes()
    description = _check_top_level(spec, source)
    base = _check_table("base", spec.get("base", {}))
    axes, notes = _parse_axes(spec.get("axes", {}))
    extra = _parse_runs(spec.get("runs", []))
    _check_count(axes, extra, max_runs, source)
    columns = list(axes)
    for r in extra:
        columns += [k for k in r if k not in columns]
    planned = _resolve_runs(base, axes, extra, columns, max_run_bytes, notes)
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


def _check_top_level(spec, source: str) -> str:
    """The SPEC's description, after checking that its top-level keys are known."""
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
    return description


def _parse_axes(raw_axes) -> tuple[dict, list]:
    """The ``[axes]`` table, every value canonical, and notes on values merged as aliases."""
    if not isinstance(raw_axes, dict):
        raise SpecError("axes must be a table of lists, e.g. [axes] seed = [0, 1, 2]")
    axes: dict = {}
    notes: list[str] = []
    for k, values in raw_axes.items():
        where = f"axes.{k}"
        if k not in _OPTIONS:
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
    return axes, notes


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


def _parse_runs(raw_runs) -> list:
    """The ``[[runs]]`` entries, every value canonical."""
    if not isinstance(raw_runs, list) or not all(isinstance(r, dict) for r in raw_runs):
        raise SpecError("runs must be an array of tables ([[runs]] sections)")
    return [_check_table(f"runs[{i}]", r) for i, r in enumerate(raw_runs)]


def _count_runs(axes: dict, extra: list) -> int:
    """Runs a SPEC describes, from the axis lengths (the grid is not expanded)."""
    grid = math.prod(len(v) for v in axes.values()) if axes or not extra else 0
    return grid + len(extra)


def _check_count(axes: dict, extra: list, max_runs: int | None, source: str) -> None:
    n_runs = _count_runs(axes, extra)
    if max_runs is not None and n_runs > max_runs:
        shape = " x ".join(f"{len(v)} {k}" for k, v in axes.items()) or "no axes"
        raise SpecError(
            f"{source}: {n_runs:,} runs ({shape}; {len(extra)} in [[runs]]) is more than "
            f"{max_runs:,}; give --allow-large to run it anyway"
        )


def _resolve_runs(
    base: dict, axes: dict, extra: list, columns: list, max_run_bytes, notes: list
) -> list[PlannedRun]:
    """Every run of the grid then of ``[[runs]]``, constructed and checked, each id once;
    a note is appended to ``notes`` for each entry that names a run already planned."""
    planned: list[PlannedRun] = []
    by_id: dict[str, str] = {}
    data_checked: set = set()

    def add(overrides: dict, origin: dict, source_name: str, name: str):
        kwargs = {**base, **overrides}
        config = _construct(kwargs, origin)
        _check_memory(config, name, origin, max_run_bytes)
        data_key = _data_key(config)
        if data_key not in data_checked:
            _check_dataset(config, kwargs, origin)
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
    return planned


def _construct(kwargs: dict, origin: dict) -> TrainConfig:
    """The TrainConfig of one run; SpecError naming the SPEC key behind a failure."""
    try:
        return TrainConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        raise SpecError(_blame(kwargs, origin, exc, lambda kw: TrainConfig(**kw))) from None


def _check_dataset(config: TrainConfig, kwargs: dict, origin: dict) -> None:
    """Generate the run's dataset; SpecError naming the SPEC key behind a failure."""
    try:
        make_dataset(config)
    except (ValueError, TypeError) as exc:
        raise SpecError(
            _blame(kwargs, origin, exc, lambda kw: make_dataset(TrainConfig(**kw)))
        ) from None


def _blame(kwargs: dict, origin: dict, exc: Exception, check) -> str:
    """Name the SPEC key behind a failed construction: the first key that fails on its own."""
    for k, v in kwargs.items():
        try:
            check({k: v})
        except (ValueError, TypeError) as e:
            return f"{origin.get(k, k)} = {_spec_value(v)}: {e}"
    keys = ", ".join(origin.get(k, k) for k in kwargs)
    return f"the combination of {keys} is invalid: {exc}"


def _data_key(config) -> tuple:
    """The fields :func:`numstab.run.make_dataset` reads: runs that share them share a
    dataset (generated once while checking the SPEC)."""
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
        c.residue_start,
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
