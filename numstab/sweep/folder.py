"""The sweep folder ``DIR``: one subfolder per run, named by its id, and their files.

``DIR/<id>/config.json`` is written when the run is submitted, then ``metrics.csv`` and
``summary.json`` when it ends, in that order, each atomically (temporary file, fsync, rename).
``summary.json`` is the commit marker: its ``status`` (``ok`` or ``failed``) is the run's state;
a folder with only ``config.json`` is ``incomplete``. With ``checkpoint_every`` the run's worker
also writes its checkpoints there (``checkpoint.json`` and its arrays file, as
:mod:`numstab.run.checkpoint` writes them), from which an incomplete run continues.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re

from numstab.cli import json_default
from numstab.run.atomic import atomic_open
from numstab.run.checkpoint import MANIFEST, checkpoint_files
from numstab.run.outdir import remove_leftovers
from numstab.sweep.cells import _finite_or_none
from numstab.sweep.spec import PlannedRun

_ID_RE = re.compile(r"^[0-9a-f]{12}$")


def _write_json(path: str, obj) -> None:
    """Write ``obj`` as strict JSON, atomically: NumPy scalars and tuples become JSON types
    (the CLI's encoder hook), then non-finite numbers become null."""
    plain = json.loads(json.dumps(obj, default=json_default))
    with atomic_open(path) as f:
        f.write(json.dumps(_finite_or_none(plain), indent=2, allow_nan=False) + "\n")


def _read_json(path: str):
    """The JSON in ``path``, or None when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def has_checkpoint(run_dir: str) -> bool:
    """Whether the run folder holds a checkpoint manifest (an incomplete run resumes there)."""
    return os.path.exists(os.path.join(run_dir, MANIFEST))


def checkpoint_step(run_dir: str) -> int | None:
    """The step of the checkpoint in the run folder, read from its manifest alone (the arrays
    are checked when the run resumes); None without a readable one."""
    return checkpoint_progress(run_dir)[0]


def checkpoint_progress(run_dir: str) -> tuple[int | None, float | None]:
    """``(step, pace)``: the step of the checkpoint in the run folder and the wall seconds a
    step took, read from the manifest alone: over the last leg where the manifest names the
    step it started from (``extra.leg_start_step``), else over all of them
    (``extra.wall_seconds_legs``); None for what it does not hold."""
    m = _read_json(os.path.join(run_dir, MANIFEST))
    m = m if isinstance(m, dict) else {}
    runs = m.get("runs")
    metas = runs.values() if isinstance(runs, dict) else []
    steps = [r.get("step") for r in metas if isinstance(r, dict)]
    steps = [s for s in steps if _is_count(s)]
    if not steps:
        return None, None
    step, extra = max(steps), m.get("extra")
    legs = extra.get("wall_seconds_legs") if isinstance(extra, dict) else None
    if not (isinstance(legs, list) and legs and all(_is_seconds(x) for x in legs)):
        return step, None
    start = extra.get("leg_start_step")
    if _is_count(start) and start < step:
        return step, legs[-1] / (step - start)
    return step, (sum(legs) / step if step > 0 else None)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _state(run_dir: str) -> tuple[str, dict | None]:
    """``("ok" | "failed" | "incomplete" | "new", summary)`` of a run folder."""
    s = _read_json(os.path.join(run_dir, "summary.json"))
    if isinstance(s, dict) and s.get("status") in ("ok", "failed"):
        return s["status"], s
    if os.path.exists(os.path.join(run_dir, "config.json")):
        return "incomplete", None
    return "new", None


def _prepare_run_dir(run_dir: str, r: PlannedRun, columns, *, fresh: bool = False) -> None:
    """Make a run's folder incomplete (no summary, no metrics) and write its config.json;
    ``fresh`` (a rerun: ``force`` or ``retry_failed``) also removes its checkpoint, so that
    the run starts from step 0 (otherwise an incomplete run continues from it)."""
    os.makedirs(run_dir, exist_ok=True)
    remove_leftovers(run_dir)  # of a worker killed while writing a checkpoint (the sweep's claim)
    for name in ["summary.json", "metrics.csv", *(checkpoint_files(run_dir) if fresh else [])]:
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


def _write_run_result(run_dir: str, result: dict, planned: PlannedRun) -> dict:
    """Write a finished run's ``metrics.csv`` then ``summary.json``; return the summary."""
    metrics = result.pop("metrics_csv", None)
    if metrics:
        with atomic_open(os.path.join(run_dir, "metrics.csv")) as f:
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


def _run_dirs(out: str) -> list[str]:
    """Names of the run folders of ``out`` (an id, holding a ``config.json``), sorted."""
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
