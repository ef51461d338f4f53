"""Collect a sweep folder into three CSV tables: every metric, one row per run, one per group.

Files (rows sorted by the axis columns, then run id), written atomically into ``DIR``:
``collected_metrics.csv``, ``collected_summary.csv`` and ``collected_grouped.csv``; see
:func:`collect`. A malformed run folder is skipped and reported, never raised on.
"""

from __future__ import annotations

import csv
import os
import statistics

from numstab.run import CSV_HEADER
from numstab.run.atomic import atomic_open
from numstab.sweep.cells import _cell, _cell_axis, _error_text, _freeze, _jsonable, _sort_key
from numstab.sweep.folder import _read_metrics, _read_run_config, _run_dirs, _state

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
    out = os.fspath(out)
    entries, columns, skipped = _read_runs(out)
    rows = [_summary_row(rid, cfg, s, columns) for rid, cfg, s in entries]
    rows.sort(key=lambda r: (tuple(_sort_key(r[c]) for c in columns), r["run_id"]))
    grouped = _group(rows, columns)

    paths = {k: os.path.join(out, f"collected_{k}.csv") for k in ("metrics", "summary", "grouped")}
    n_metrics = _write_metrics(paths["metrics"], out, rows, skipped)
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


def _read_runs(out: str) -> tuple[list, list, list]:
    """``(id, config.json, summary or None)`` of each usable run folder, the columns of all
    of them (in order of appearance), and the folders skipped (``{"path", "reason"}``)."""
    entries, columns, skipped = [], [], []
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
    return entries, columns, skipped


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


def _write_metrics(path: str, out: str, rows: list, skipped: list) -> int:
    """Write ``collected_metrics.csv`` from the finished runs of ``rows``; return its number
    of data rows. A ``metrics.csv`` that cannot be read is appended to ``skipped``."""
    n_metrics = 0
    with atomic_open(path) as f:
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
    return n_metrics


def _write_csv(path: str, header: list, rows: list, axis_cols: list) -> None:
    with atomic_open(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for row in rows:
            w.writerow([_cell_axis(row[h]) if h in axis_cols else _cell(row[h]) for h in header])
