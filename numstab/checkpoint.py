"""Checkpoints of training runs: ``.npz`` arrays plus a JSON manifest, written atomically.

Layout of a checkpoint directory::

    checkpoint.json            the manifest (what, when, checksums); replaced atomically
    checkpoint-000120.npz      the arrays of the step-120 checkpoint

The arrays file is written first (temporary name, ``fsync``, rename), then the manifest that
names it (same procedure), then older arrays files are deleted. A crash at any point leaves the
previous complete checkpoint readable. Arrays are read with ``allow_pickle=False`` and checked
against the manifest's SHA-256, dtype and shape before anything is used; a checkpoint from a
different configuration or numstab version is refused with the differences listed.

What is saved per run: parameters (carrier dtype; longdouble as ``<f16``), optimizer state
tensors and step, the mini-batch RNG state, the run's step; and once: every metric row logged
so far, plus a driver's JSON ``extra`` (e.g. the compare command's audit records). Restoring all
of it and continuing reproduces the uninterrupted run bit for bit (same machine, same BLAS
thread count).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import numstab
from numstab.atomic import atomic_open
from numstab.backend import namespace, to_numpy

__all__ = [
    "MANIFEST",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "restore_log",
    "restore_run",
    "save_checkpoint",
]

MANIFEST = "checkpoint.json"
FORMAT = "numstab-checkpoint"
FORMAT_VERSION = 1
_METRIC_FIELDS = ("step", "run", "split", "metric", "layer", "value")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupted, or from something else."""


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint: its manifest and arrays (all checksums verified)."""

    directory: Path
    manifest: dict
    arrays: dict

    @property
    def extra(self) -> dict:
        return self.manifest.get("extra", {})

    def runs(self) -> list[str]:
        return list(self.manifest["runs"])


# --- writing ------------------------------------------------------------------------------


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _run_arrays(name: str, run) -> tuple[dict, dict]:
    from numstab.optim import state_arrays

    arrays = {f"{name}/param/{k}": np.array(to_numpy(v), copy=True) for k, v in run.params.items()}
    for k, v in state_arrays(run.opt_state).items():
        arrays[f"{name}/opt/{k}"] = v
    meta = {
        "config": run.config.to_dict(),
        "step": int(run.step),
        "opt_step": int(run.opt_state.step),
        "rng_state": run.batch_rng.bit_generator.state,
    }
    return arrays, meta


def _metric_arrays(rows) -> dict:
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in _METRIC_FIELDS]
    return {
        "metrics/step": np.asarray(cols[0], dtype=np.int64),
        "metrics/run": np.asarray(cols[1], dtype=np.str_),
        "metrics/split": np.asarray(cols[2], dtype=np.str_),
        "metrics/metric": np.asarray(cols[3], dtype=np.str_),
        "metrics/layer": np.asarray(cols[4], dtype=np.str_),
        "metrics/value": np.asarray(cols[5], dtype=np.float64),
    }


def save_checkpoint(directory, runs: dict, log, *, extra: dict | None = None) -> Path:
    """Write a checkpoint of ``runs`` (name -> :class:`~numstab.train.Run`) and ``log``.

    Parameters
    ----------
    directory : path
        Created if missing. The previous checkpoint there stays valid until this one is
        complete, then its arrays file is removed.
    runs : dict of str -> Run
    log : MetricLog
        Its rows so far are saved (all runs share one log in the compare command).
    extra : dict, optional
        JSON-serialisable driver state saved in the manifest.

    Returns
    -------
    Path of the manifest.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict = {}
    run_meta = {}
    for name, run in runs.items():
        a, m = _run_arrays(name, run)
        arrays.update(a)
        run_meta[name] = m
    arrays.update(_metric_arrays(log.rows))
    steps = [m["step"] for m in run_meta.values()]
    tag = f"checkpoint-{max(steps) if steps else 0:06d}"
    npz_name = f"{tag}.npz"
    with atomic_open(directory / npz_name, "wb") as f:
        np.savez(f, **arrays)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "numstab_version": numstab.__version__,
        "arrays_file": npz_name,
        "runs": run_meta,
        "extra": extra or {},
        "arrays": {
            k: {"dtype": v.dtype.str, "shape": list(v.shape), "sha256": _sha256(v)}
            for k, v in arrays.items()
        },
    }
    text = json.dumps(manifest, indent=1, sort_keys=True, default=_json_default).encode()
    with atomic_open(directory / MANIFEST, "wb") as f:
        f.write(text)
    for old in directory.glob("checkpoint-*.npz"):
        if old.name != npz_name:
            old.unlink(missing_ok=True)
    return directory / MANIFEST


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --- reading ------------------------------------------------------------------------------


def load_checkpoint(directory) -> Checkpoint:
    """Read and verify a checkpoint directory.

    Raises
    ------
    CheckpointError
        No manifest; a manifest that is not JSON or not a numstab checkpoint; another
        checkpoint format version or numstab version; an arrays file that is missing,
        truncated or unreadable; an array missing, extra, or with a dtype, shape or SHA-256
        different from the manifest. Nothing is returned unless everything checks out.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {str(directory)!r}: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint manifest {str(path)!r} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a numstab checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {manifest.get('format_version')!r} is not supported "
            f"(this numstab reads version {FORMAT_VERSION})"
        )
    if manifest.get("numstab_version") != numstab.__version__:
        raise CheckpointError(
            f"checkpoint was written by numstab {manifest.get('numstab_version')!r}, this is "
            f"numstab {numstab.__version__!r}: resuming across versions is refused because the "
            "arithmetic may differ"
        )
    npz = directory / str(manifest.get("arrays_file", ""))
    if not npz.is_file():
        raise CheckpointError(f"checkpoint arrays file {str(npz)!r} is missing")
    expected = manifest.get("arrays", {})
    arrays = {}
    try:
        with np.load(npz, allow_pickle=False) as data:
            names = set(data.files)
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"checkpoint arrays do not match the manifest: missing {missing}, "
                    f"unexpected {unexpected}"
                )
            for key, info in expected.items():
                a = data[key]
                if a.dtype.str != info["dtype"] or list(a.shape) != info["shape"]:
                    raise CheckpointError(
                        f"checkpoint array {key!r} has dtype {a.dtype.str} shape "
                        f"{list(a.shape)}, the manifest says {info['dtype']} {info['shape']}"
                    )
                if _sha256(a) != info["sha256"]:
                    raise CheckpointError(
                        f"checkpoint array {key!r} fails its SHA-256 check (the file is corrupted)"
                    )
                arrays[key] = a
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, EOFError, ValueError on truncated data
        raise CheckpointError(
            f"checkpoint arrays file {str(npz)!r} is unreadable: {type(exc).__name__}: {exc}"
        ) from None
    return Checkpoint(directory=directory, manifest=manifest, arrays=arrays)


def config_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable ``key: saved -> current`` lines for every differing config key."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


def restore_run(run, ckpt: Checkpoint, name: str, *, allow_more_steps: bool = False) -> None:
    """Load a run's parameters, optimizer state, RNG and step from a checkpoint, in place.

    With ``allow_more_steps`` the configurations may differ in ``steps`` alone, as long as the
    new ``steps`` is not below the checkpoint's step (continuing a run for longer: nothing
    else in a step depends on the total).

    Raises
    ------
    CheckpointError
        The checkpoint has no run ``name``, or its configuration differs from ``run.config``
        (the differing keys are listed).
    """
    meta = ckpt.manifest["runs"].get(name)
    if meta is None:
        raise CheckpointError(f"checkpoint has no run {name!r} (it has {ckpt.runs()})")
    saved = _normalise(meta["config"])
    if allow_more_steps and run.config.steps >= int(meta["step"]):
        saved["steps"] = run.config.steps
    diff = config_differences(saved, _normalise(run.config.to_dict()))
    if diff:
        raise CheckpointError(
            f"checkpoint run {name!r} was made with a different configuration: " + "; ".join(diff)
        )
    prefix = f"{name}/param/"
    params = {k[len(prefix) :]: v for k, v in ckpt.arrays.items() if k.startswith(prefix)}
    if set(params) != set(run.params):
        raise CheckpointError(
            f"checkpoint parameters {sorted(params)} do not match the model's {sorted(run.params)}"
        )
    for k, v in params.items():
        if v.dtype != to_numpy(run.params[k][:0]).dtype or v.shape != run.params[k].shape:
            raise CheckpointError(
                f"checkpoint parameter {k!r} is {v.dtype} {v.shape}, the "
                f"model needs {run.params[k].dtype} {run.params[k].shape}"
            )
    oprefix = f"{name}/opt/"
    opt = {k[len(oprefix) :]: v for k, v in ckpt.arrays.items() if k.startswith(oprefix)}
    try:
        state = run.optimizer.load_state_arrays(opt, int(meta["opt_step"]), like=run.params)
    except ValueError as exc:
        raise CheckpointError(
            f"checkpoint optimizer state of run {name!r} is invalid: {exc}"
        ) from None
    xp = namespace(*run.params.values())
    for k, v in params.items():
        run.params[k][...] = v if xp is np else xp.asarray(v)
    run.opt_state = state
    run.batch_rng.bit_generator.state = meta["rng_state"]
    run.step = int(meta["step"])


def _normalise(cfg: dict) -> dict:
    """JSON round trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(cfg, sort_keys=True, default=_json_default))


def restore_log(log, ckpt: Checkpoint) -> None:
    """Replace ``log``'s rows by the checkpoint's and rewrite its CSV (atomically)."""
    a = ckpt.arrays
    rows = [
        (int(s), str(r), str(sp), str(m), str(la), float(v))
        for s, r, sp, m, la, v in zip(
            a["metrics/step"],
            a["metrics/run"],
            a["metrics/split"],
            a["metrics/metric"],
            a["metrics/layer"],
            a["metrics/value"],
            strict=True,
        )
    ]
    log.reset(rows)
