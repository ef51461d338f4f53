"""Load a collected sweep folder (``numstab.sweep.collect``) into memory for plots and claims.

A :class:`Results` holds, per run id, the run's configuration (``config.json``), its status
(``summary.json``; ``incomplete`` without one) and its metric series (``collected_metrics.csv``,
or the runs' own ``metrics.csv`` when the collected file is missing). Loaded with
``in_flight=True``, an incomplete run with a checkpoint (a run still training, or interrupted)
is read up to that checkpoint: status ``in_flight``, measured like a finished run. It can also
be built from plain rows (:meth:`Results.from_rows`), which is how the tests make synthetic
results.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np

from analysis.match import config_matches
from numstab.run.config import TrainConfig

__all__ = ["MEASURED", "Results", "RunRecord", "load_results", "varying_fields"]

#: Config keys never used to tell runs apart (derived from other fields).
DERIVED_FIELDS = ("state_format",)
#: ``Results.select``'s default: the statuses the Results measures (:attr:`Results.measured`).
MEASURED = "measured"
#: Tries at reading an in-flight run's checkpoint that its run replaces meanwhile.
CHECKPOINT_READS = 3


@dataclass
class RunRecord:
    """One run: id, configuration (``TrainConfig.to_dict()``), status (``ok``, ``failed``,
    ``incomplete``, ``in_flight``), summary (or None) and, in flight, the step it has reached
    (its checkpoint's, whose rows are those logged before it; or a training folder's last
    logged step)."""

    id: str
    config: dict
    status: str = "ok"
    summary: dict | None = None
    step: int | None = None

    @property
    def seed(self):
        return self.config.get("seed")


@dataclass
class Results:
    """Runs and their metric series.

    ``series`` maps ``(run_id, split, metric, layer)`` to ``(steps, values)`` arrays sorted by
    step (``layer`` is ``""`` for the per-split metrics, a tensor name or ``"global"`` for the
    per-parameter ones). ``measured``: the statuses whose runs the plots and claims measure
    (``ok``; and ``in_flight`` where loaded so).
    """

    runs: dict
    series_map: dict = field(default_factory=dict)
    source: str = "<memory>"
    measured: tuple = ("ok",)

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def from_rows(cls, configs: dict, rows, *, status: dict | None = None, source="<memory>"):
        """Build from ``{run_id: config dict}`` and metric rows.

        ``rows``: iterable of ``(run_id, step, split, metric, layer, value)`` (the columns of
        ``collected_metrics.csv`` without the ``run`` column). ``status``: ``{run_id: status}``
        (default ``"ok"``).
        """
        status = status or {}
        runs = {
            rid: RunRecord(rid, dict(cfg), status.get(rid, "ok")) for rid, cfg in configs.items()
        }
        acc: dict = {}
        for rid, step, split, metric, layer, value in rows:
            acc.setdefault((rid, split, metric, layer or ""), []).append((int(step), float(value)))
        return cls(runs, _finish(acc), source)

    @classmethod
    def from_dir(cls, path, ids=None, *, in_flight: bool = False) -> Results:
        """Load a sweep folder; ``ids`` restricts to those run ids (e.g. the runs of one SPEC
        when the folder holds more). ``in_flight``: an incomplete run is read from the
        checkpoint in its folder, if it has one this numstab reads (status ``in_flight``,
        ``step`` the checkpoint's; its metric rows are the run's up to that step, bit for
        bit), and measured with the finished runs. Only reads: safe beside the sweep that is
        writing the folder."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no sweep folder {path!r}")
        wanted = None if ids is None else set(ids)
        runs = {}
        for name in sorted(os.listdir(path)):
            cfg_path = os.path.join(path, name, "config.json")
            if (wanted is not None and name not in wanted) or not os.path.isfile(cfg_path):
                continue
            cfg = _read_json(cfg_path) or {}
            summary = _read_json(os.path.join(path, name, "summary.json"))
            st = summary.get("status") if isinstance(summary, dict) else None
            runs[name] = RunRecord(
                name,
                _as_recorded(cfg.get("config", {})),
                st if st in ("ok", "failed") else "incomplete",
                summary if isinstance(summary, dict) else None,
            )
        acc: dict = {}
        collected = os.path.join(path, "collected_metrics.csv")
        if os.path.isfile(collected):
            _read_metrics(collected, acc, runs, column="run_id")
        else:
            for rid in runs:
                mpath = os.path.join(path, rid, "metrics.csv")
                if os.path.isfile(mpath):
                    _read_metrics(mpath, acc, runs, rid=rid)
        if not in_flight:
            return cls(runs, _finish(acc), path)
        for rid, rec in runs.items():
            got = _checkpoint_rows(os.path.join(path, rid)) if rec.status == "incomplete" else None
            if got is None:
                continue
            rec.status, rec.step = "in_flight", got[0]
            for k in [k for k in acc if k[0] == rid]:  # a stale collected file's rows
                del acc[k]
            for step, split, metric, layer, value in got[2]:
                acc.setdefault((rid, split, metric, layer), []).append((step, value))
        return cls(runs, _finish(acc), path, measured=("ok", "in_flight"))

    @classmethod
    def from_train_dirs(cls, dirs, *, in_flight: bool = False) -> Results:
        """The runs of ``python -m numstab.train --out DIR`` folders (``summary.json`` and
        ``metrics.csv``): one per folder, its id the folder's name, its configuration the
        resolved TrainConfig the summary records (:func:`_training_config`); a folder whose
        ``metrics.csv`` holds several runs (``numstab.compare``'s ``test`` and
        ``reference``) gives one run each, ``<folder>/<run>``, configured as its checkpoint
        records it. ``in_flight``: a folder without ``summary.json`` yet (a run still
        training, or killed) is read as it stands and measured with the others, status
        ``in_flight``: from its ``metrics.csv`` up to the last logged step (``step``; a last
        line still being written is left out), or, without one (a sweep's run folder), from
        its checkpoint (``step`` the checkpoint's); its configuration its checkpoint's, else
        unknown (``{}``).

        Raises ``FileNotFoundError`` for a folder without those files."""
        configs, rows, status, reached = {}, [], {}, {}
        for d in dirs:
            summary_path = os.path.join(d, "summary.json")
            metrics_path = os.path.join(d, "metrics.csv")
            folder = os.path.basename(os.path.normpath(d))
            finished = os.path.isfile(summary_path) and os.path.isfile(metrics_path)
            acc: dict = {}  # keyed by the rows' own run names
            step = None  # where the rows come from a checkpoint: its step
            if finished or (in_flight and os.path.isfile(metrics_path)):
                _read_metrics(metrics_path, acc, None, column="run", tail=not finished)
            elif in_flight and (got := _checkpoint_rows(d)) is not None:
                step, name, got_rows = got
                for k, split, metric, layer, value in got_rows:
                    acc.setdefault((name, split, metric, layer), []).append((k, value))
            else:
                needs = "metrics.csv or a checkpoint" if in_flight else "summary.json, metrics.csv"
                raise FileNotFoundError(f"{d!r} is not a training output folder (needs {needs})")
            names = sorted({k[0] for k in acc}) or [None]
            ids = {n: f"{folder}/{n}" if len(names) > 1 else folder for n in names}
            recorded = _checkpoint_configs(d)
            summary = None
            if finished:
                with open(summary_path, encoding="utf-8") as f:
                    summary = json.load(f)
            for name, rid in ids.items():
                if summary is not None and len(names) == 1:
                    configs[rid] = _training_config(summary.get("config", {}))
                elif name in recorded or len(recorded) != 1:
                    configs[rid] = recorded.get(name, {})
                else:  # one run: its checkpoint's, whatever name it has there
                    configs[rid] = next(iter(recorded.values()))
                if summary is None:
                    status[rid] = "in_flight"
                    logged = [k for (n, *_), kv in acc.items() if n == name for k, _ in kv]
                    reached[rid] = step if step is not None else max(logged, default=0)
            rows += [(ids[n], k, sp, m, la, v) for (n, sp, m, la), kv in acc.items() for k, v in kv]
        res = cls.from_rows(configs, rows, status=status, source=", ".join(map(str, dirs)))
        for rid, step in reached.items():
            res.runs[rid].step = step
        if in_flight:
            res.measured = ("ok", "in_flight")
        return res

    # --- queries ---------------------------------------------------------------------------

    def series(self, run_id: str, metric: str, split: str = "train", layer: str = ""):
        """``(steps, values)`` of one metric of one run (empty arrays if never logged)."""
        got = self.series_map.get((run_id, split, metric, layer))
        if got is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        return got

    def layers(self, run_id: str, metric: str, split: str = "train") -> list:
        """Layer names logged for a per-parameter metric (``W1 .. WL``, biases, ``global``)."""
        names = {k[3] for k in self.series_map if k[0] == run_id and k[1:3] == (split, metric)}
        return sorted(names, key=_layer_key)

    def select(self, match: dict | None = None, *, status=MEASURED) -> list:
        """Run ids whose configuration matches ``match`` (see
        :func:`analysis.match.config_matches`) and whose status is ``status`` (a status, a
        tuple of them, None: any; by default those in :attr:`measured`), sorted by seed then
        id."""
        want = self.measured if status == MEASURED else status
        want = (want,) if isinstance(want, str) else want
        ids = [
            r.id
            for r in self.runs.values()
            if config_matches(r.config, match) and (want is None or r.status in want)
        ]
        return sorted(ids, key=lambda i: (_sortable(self.runs[i].seed), i))

    def group(self, ids, by=None) -> dict:
        """Group run ids by the values of fields ``by`` (default: :func:`varying_fields` of
        ``ids``, i.e. every field that differs among them except the seed).

        Returns ``{key: [ids]}`` in a stable order, ``key`` a tuple of ``(field, value)`` pairs.
        """
        ids = list(ids)
        if by is None:
            by = varying_fields([self.runs[i].config for i in ids])
        groups: dict = {}
        for i in ids:
            cfg = self.runs[i].config
            key = tuple((f, _hashable(cfg.get(f))) for f in by)
            groups.setdefault(key, []).append(i)
        return dict(sorted(groups.items(), key=lambda kv: tuple(_sortable(v) for _f, v in kv[0])))


def load_results(path, ids=None) -> Results:
    """:meth:`Results.from_dir`."""
    return Results.from_dir(path, ids)


def varying_fields(configs) -> list:
    """Config fields whose value differs among ``configs``, except ``seed`` and derived ones,
    in the configs' key order."""
    configs = list(configs)
    if not configs:
        return []
    out = []
    for k in configs[0]:
        if k == "seed" or k in DERIVED_FIELDS:
            continue
        first = _hashable(configs[0].get(k))
        if any(_hashable(c.get(k)) != first for c in configs[1:]):
            out.append(k)
    return out


def group_label(key) -> str:
    """``perp_grad=tensor loss_dtype=float64`` (``"all runs"`` for the empty key)."""
    if not key:
        return "all runs"
    return " ".join(f"{f}={_show(v)}" for f, v in key)


# --- helpers -------------------------------------------------------------------------------


def _show(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return "[" + ", ".join(str(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _hashable(v):
    """``v`` as a dict key: lists as tuples, dicts as sorted (key, value) tuples, nested."""
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


def _sortable(v):
    if v is None:
        return (0, 0)
    if isinstance(v, (bool, int, float)):
        return (1, v)
    if isinstance(v, tuple):
        return (3, tuple(_sortable(x) for x in v))
    return (2, str(v))


def _layer_key(name: str):
    if name == "global":
        return (2, 0, "")
    kind, num = name[:1], name[1:]
    return (0 if kind == "W" else 1, int(num) if num.isdigit() else 0, name)


def _as_recorded(config: dict) -> dict:
    """A run's configuration with every field of today's :class:`TrainConfig`: a record
    written before a field existed gets the value it was computed with
    (:meth:`TrainConfig.from_dict`), so that runs of one sweep recorded by different versions
    group together; a record TrainConfig refuses is kept as it is."""
    try:
        return {**config, **TrainConfig.from_dict(config).to_dict()}
    except (TypeError, ValueError):
        return dict(config)


def _training_config(config: dict) -> dict:
    """The training configuration a train summary records: its ``resolved`` TrainConfig with
    the fields an older record lacks at their defaults (so that runs of one setup differ only
    in their seed), not the command line's own options (``out``, ``quiet``, ``resume``)."""
    resolved = config.get("resolved")
    if not isinstance(resolved, dict):
        return config
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        return TrainConfig.from_dict({k: v for k, v in resolved.items() if k in known}).to_dict()
    except (TypeError, ValueError):
        return resolved  # a record this version refuses: as recorded


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _checkpoint_rows(run_dir: str):
    """``(step, run name, [(step, split, metric, layer, value), ...])`` of the checkpoint of
    the one run in ``run_dir``, or None: no checkpoint, one of another numstab version or of
    several runs, or one that stays unreadable. A read that fails because the run replaced its
    checkpoint meanwhile (the old arrays file goes once the new manifest is in place) is tried
    again."""
    from numstab.run.checkpoint import CheckpointError, checkpoint_rows, load_checkpoint
    from numstab.sweep.folder import checkpoint_step

    for _ in range(CHECKPOINT_READS):
        before = checkpoint_step(run_dir)
        try:
            ckpt = load_checkpoint(run_dir)
        except CheckpointError:
            if before is None or checkpoint_step(run_dir) == before:
                return None  # not replaced: unreadable as it stands
            continue
        if len(ckpt.runs()) != 1:
            return None
        (name,) = ckpt.runs()
        step = int(ckpt.manifest["runs"][name]["step"])
        return step, name, [(s, sp, m, la, v) for s, _, sp, m, la, v in checkpoint_rows(ckpt)]
    return None


def _checkpoint_configs(run_dir: str) -> dict:
    """``{run name: configuration}`` of the runs in ``run_dir``'s checkpoint, from its manifest
    alone (``{}`` without a readable one)."""
    from numstab.run.checkpoint import MANIFEST

    m = _read_json(os.path.join(run_dir, MANIFEST))
    runs = m.get("runs") if isinstance(m, dict) else None
    return {
        name: _as_recorded(meta["config"])
        for name, meta in (runs.items() if isinstance(runs, dict) else [])
        if isinstance(meta, dict) and isinstance(meta.get("config"), dict)
    }


def _read_metrics(path, acc, runs, *, column=None, rid=None, tail=False):
    """Add the rows of a metrics CSV to ``acc``, keyed by the run named in ``column``
    (``run_id`` in a collected file, ``run`` in a run's own) or else by ``rid``; only the runs
    in ``runs`` (None: every run). A row that does not parse is a ValueError naming the file and
    line. ``tail``: the file may be being written, so a last line without its newline (written
    in part) is left out."""
    with open(path, newline="", encoding="utf-8") as f:
        if tail:  # whole lines only
            text = f.read()
            f = io.StringIO(text[: text.rfind("\n") + 1])
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        col = {h: i for i, h in enumerate(header)}
        i_step, i_split, i_metric = col["step"], col["split"], col["metric"]
        i_layer, i_value = col["layer"], col["value"]
        i_run = col[column] if column is not None else None
        for row in reader:
            try:
                r = row[i_run] if i_run is not None else rid
                key = (r, row[i_split], row[i_metric], row[i_layer])
                kv = (int(row[i_step]), float(row[i_value]))
            except (IndexError, ValueError):
                where = f"{path!r}, line {reader.line_num}"
                raise ValueError(f"{where} is not a metrics row: {','.join(row)!r}") from None
            if runs is None or r in runs:
                acc.setdefault(key, []).append(kv)


def _finish(acc: dict) -> dict:
    out = {}
    for k, pairs in acc.items():
        pairs.sort(key=lambda p: p[0])
        steps = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
        values = np.fromiter((p[1] for p in pairs), dtype=np.float64, count=len(pairs))
        out[k] = (steps, values)
    return out
