"""Checkpoints of training runs: ``.npz`` arrays plus a JSON manifest, written atomically.

Layout of a checkpoint directory::

    checkpoint.json                   the manifest (what, when, checksums); replaced atomically
    checkpoint-000120-3f9a01c2.npz    the arrays of the step-120 checkpoint

The arrays file is written first (temporary name, ``fsync``, rename), then the manifest that
names it (same procedure), then the arrays files it does not name are deleted. Every arrays
file gets a name that no file in the directory has (step and a random suffix), so the file the
current manifest names is never overwritten: a crash at any point leaves the previous complete
checkpoint readable.

Reading validates every field before anything is used: the manifest's structure and types,
each array's SHA-256, dtype and shape, the consistency of the fields with the arrays (each
run's step with its metric rows, the optimizer's step with the run's step, optimizer state
shapes with the parameters), and a SHA-256 of the manifest itself; then, against the run to
restore, the configuration (differences listed) and the parameter shapes and dtypes. Anything
wrong raises :class:`CheckpointError` as ``"<field>: <what is wrong> (<file>)"``. Arrays are
read with ``allow_pickle=False``.

What is saved per run: parameters (carrier dtype; longdouble as ``<f16``), optimizer state
tensors and step, the mini-batch RNG state, the run's step; and once: every metric row logged
so far, plus a driver's JSON ``extra`` (e.g. the compare command's audit records). Restoring all
of it and continuing reproduces the uninterrupted run bit for bit (same machine, same BLAS
thread count).
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import numstab
from numstab.backend import namespace, to_numpy
from numstab.optim import state_arrays
from numstab.run.atomic import atomic_open

__all__ = [
    "MANIFEST",
    "Checkpoint",
    "CheckpointError",
    "checkpoint_files",
    "checkpoint_rows",
    "load_checkpoint",
    "restore_log",
    "restore_run",
    "save_checkpoint",
    "unreferenced_arrays_files",
]

MANIFEST = "checkpoint.json"
FORMAT = "numstab-checkpoint"
#: 2 adds ``manifest_sha256`` and unique arrays-file names; version 1 is still read.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_METRIC_FIELDS = ("step", "run", "split", "metric", "layer", "value")
_METRIC_KINDS = {"step": "i", "run": "U", "split": "U", "metric": "U", "layer": "U", "value": "f"}
_ARRAYS_NAME = re.compile(r"checkpoint-\d+(-[0-9a-f]+)?\.npz")
_ARRAYS_GLOB = "checkpoint-*.npz"
_RUN_FIELDS = ("config", "opt_step", "rng_state", "step")
_TOP_FIELDS = ("arrays", "arrays_file", "extra", "format", "format_version", "numstab_version",
               "runs")
_HEX64 = re.compile(r"[0-9a-f]{64}")


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


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's canonical JSON, without its own ``manifest_sha256``."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _run_arrays(name: str, run) -> tuple[dict, dict]:
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
    """Write a checkpoint of ``runs`` (name -> :class:`~numstab.run.Run`) and ``log``.

    Parameters
    ----------
    directory : path
        Created if missing. The previous checkpoint there stays valid until this one is
        complete (its arrays file is never overwritten); then the arrays files the new manifest
        does not name are removed.
    runs : dict of str -> Run
    log : MetricLog
        Its rows so far are saved (all runs share one log in the compare command).
    extra : dict, optional
        JSON-serialisable driver state saved in the manifest.

    Returns
    -------
    Path of the manifest.

    Raises
    ------
    OSError
        A write failed (disk full, file too large); the previous checkpoint is intact.
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
    step = max(steps) if steps else 0
    npz_name = f"checkpoint-{step:06d}-{secrets.token_hex(4)}.npz"
    while (directory / npz_name).exists():  # never replace a file, above all the current one
        npz_name = f"checkpoint-{step:06d}-{secrets.token_hex(4)}.npz"
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
    manifest = json.loads(json.dumps(manifest, default=_json_default))  # as a reader sees it
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with atomic_open(directory / MANIFEST, "wb") as f:
        f.write(text)
    # The new manifest is durable (atomic_open fsynced it and the folder): only now may the
    # arrays file of the previous one go.
    for old in directory.glob(_ARRAYS_GLOB):
        if old.name != npz_name:
            old.unlink(missing_ok=True)
    return directory / MANIFEST


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def checkpoint_files(directory) -> list[str]:
    """Names of every checkpoint file in ``directory``: the manifest first (if present), then
    each ``checkpoint-*.npz``; deleting them in this order never leaves a manifest that names
    a missing arrays file."""
    directory = Path(directory)
    arrays = sorted(p.name for p in directory.glob(_ARRAYS_GLOB))
    return ([MANIFEST] if (directory / MANIFEST).exists() else []) + arrays


def unreferenced_arrays_files(directory) -> list[str]:
    """Names of ``checkpoint-*.npz`` files in ``directory`` that its manifest does not name.

    They are left by a writer killed after an arrays file was renamed into place and before
    the manifest naming it was. Empty when there is no readable manifest naming an existing
    arrays file (then nothing is known to be unused).
    """
    directory = Path(directory)
    try:
        current = json.loads((directory / MANIFEST).read_text()).get("arrays_file")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return []
    if not isinstance(current, str) or not (directory / current).is_file():
        return []
    return sorted(p.name for p in directory.glob(_ARRAYS_GLOB) if p.name != current)


# --- reading ------------------------------------------------------------------------------


def _where(path) -> str:
    return f"({str(path)!r})"


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo


def load_checkpoint(directory) -> Checkpoint:
    """Read and verify a checkpoint directory.

    Raises
    ------
    CheckpointError
        No manifest; a manifest that is not JSON or not a numstab checkpoint; another
        checkpoint format version or numstab version; a manifest field missing, unexpected,
        of the wrong type or out of range; an arrays file that is missing, truncated or
        unreadable; an array missing, extra, or with a dtype, shape or SHA-256 different
        from the manifest; fields inconsistent with the arrays (a run's ``step`` with its
        metric rows, ``opt_step`` with ``step``, optimizer state with the parameters, ragged
        metric columns); a manifest that fails its own SHA-256. The message names the field
        and the file. Nothing is returned unless everything checks out.
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
    version = manifest.get("format_version")
    if not _is_int(version) or version not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint format version {version!r} is not supported "
            f"(this numstab reads versions {', '.join(map(str, _READABLE_VERSIONS))})"
        )
    if manifest.get("numstab_version") != numstab.__version__:
        raise CheckpointError(
            f"checkpoint was written by numstab {manifest.get('numstab_version')!r}, this is "
            f"numstab {numstab.__version__!r}: resuming across versions is refused because the "
            "arithmetic may differ"
        )
    _check_manifest(manifest, path)
    npz = directory / manifest["arrays_file"]
    arrays = _read_arrays(npz, manifest["arrays"])
    _check_consistency(manifest, arrays, path, npz)
    if version >= 2 and manifest["manifest_sha256"] != _manifest_digest(manifest):
        raise CheckpointError(
            f"manifest_sha256: the manifest's contents do not match its SHA-256 (it was edited "
            f"or corrupted) {_where(path)}"
        )
    return Checkpoint(directory=directory, manifest=manifest, arrays=arrays)


def _check_manifest(m: dict, path: Path) -> None:
    """Types and ranges of every manifest field, and the array names the runs imply."""
    w = _where(path)

    def fail(field, problem):
        raise CheckpointError(f"{field}: {problem} {w}")

    required = _TOP_FIELDS + (("manifest_sha256",) if m["format_version"] >= 2 else ())
    for k in required:
        if k not in m:
            fail(k, "missing")
    extra_keys = sorted(set(m) - set(required))
    if extra_keys:
        fail(extra_keys[0], "unexpected field")
    if "manifest_sha256" in m and not (
        isinstance(m["manifest_sha256"], str) and _HEX64.fullmatch(m["manifest_sha256"])
    ):
        fail("manifest_sha256", f"must be 64 hexadecimal digits, got {m['manifest_sha256']!r}")
    af = m["arrays_file"]
    if not isinstance(af, str) or not _ARRAYS_NAME.fullmatch(af):
        fail("arrays_file", f"must be a file name checkpoint-<step>[-<hex>].npz, got {af!r}")
    if not isinstance(m["extra"], dict):
        fail("extra", f"must be a JSON object, got {type(m['extra']).__name__}")
    if "finished" in m["extra"] and not isinstance(m["extra"]["finished"], bool):
        fail("extra.finished", f"must be true or false, got {m['extra']['finished']!r}")
    runs = m["runs"]
    if not isinstance(runs, dict) or not runs:
        fail("runs", f"must be a non-empty JSON object, got {runs!r:.60}")
    for name, meta in runs.items():
        if not name or "/" in name:
            fail("runs", f"run name {name!r} is empty or contains '/'")
        _check_run_meta(f"runs.{name}", meta, fail)
    arrays = m["arrays"]
    if not isinstance(arrays, dict):
        fail("arrays", f"must be a JSON object, got {type(arrays).__name__}")
    for key, info in arrays.items():
        _check_array_entry(f"arrays.{key}", info, fail)
    want = {f"metrics/{c}" for c in _METRIC_FIELDS}
    missing = sorted(want - set(arrays))
    if missing:
        fail(missing[0], "missing (every checkpoint has all six metric columns)")
    for key in arrays:
        name, sep, rest = key.partition("/")
        kind = rest.split("/", 1)[0]
        if not (key in want or (sep and name in runs and kind in ("param", "opt") and "/" in rest)):
            fail("arrays", f"unexpected array {key!r} (not a metric column or a run's array)")
    for name in runs:
        if not any(k.startswith(f"{name}/param/") for k in arrays):
            fail("arrays", f"run {name!r} has no parameters")


def _check_run_meta(field: str, meta, fail) -> None:
    if not isinstance(meta, dict):
        fail(field, f"must be a JSON object, got {type(meta).__name__}")
    for k in _RUN_FIELDS:
        if k not in meta:
            fail(f"{field}.{k}", "missing")
    unexpected = sorted(set(meta) - set(_RUN_FIELDS))
    if unexpected:
        fail(f"{field}.{unexpected[0]}", "unexpected field")
    cfg = meta["config"]
    if not isinstance(cfg, dict) or not cfg:
        fail(f"{field}.config", f"must be a non-empty JSON object, got {cfg!r:.60}")
    # The two config fields the consistency checks rely on; the rest is compared with the
    # configuration of the run being restored (restore_run).
    if not _is_int(cfg.get("log_every"), 1):
        fail(f"{field}.config.log_every", f"must be an integer >= 1, got {cfg.get('log_every')!r}")
    if not isinstance(cfg.get("normalized_lr", False), bool):
        fail(f"{field}.config.normalized_lr", f"must be true or false, got "
             f"{cfg.get('normalized_lr')!r}")
    step, opt_step = meta["step"], meta["opt_step"]
    if not _is_int(step):
        fail(f"{field}.step", f"must be an integer >= 0, got {step!r}")
    if not _is_int(opt_step):
        fail(f"{field}.opt_step", f"must be an integer >= 0, got {opt_step!r}")
    problem = _rng_state_problem(meta["rng_state"])
    if problem:
        fail(f"{field}.rng_state", problem)


def _rng_state_problem(state) -> str | None:
    """Why ``state`` is not a PCG64 state that round-trips exactly (None if it is one)."""
    ok = (
        isinstance(state, dict)
        and state.get("bit_generator") == "PCG64"
        and set(state) == {"bit_generator", "state", "has_uint32", "uinteger"}
        and isinstance(state["state"], dict)
        and set(state["state"]) == {"state", "inc"}
        and all(_is_int(v) and v < 2**128 for v in state["state"].values())
        and state["state"]["inc"] % 2 == 1  # PCG64's increment is always odd
        and state["has_uint32"] in (0, 1)
        and _is_int(state["has_uint32"])
        and _is_int(state["uinteger"])
        and state["uinteger"] < 2**32
    )
    if ok:
        bg = np.random.PCG64()
        try:
            bg.state = state
        except (TypeError, ValueError, KeyError, OverflowError):
            ok = False
        ok = ok and bg.state == state
    return None if ok else f"not a PCG64 generator state: {state!r:.80}"


def _check_array_entry(field: str, info, fail) -> None:
    if not isinstance(info, dict):
        fail(field, f"must be an object with dtype, shape and sha256, got {info!r:.60}")
    for k in ("dtype", "shape", "sha256"):
        if k not in info:
            fail(f"{field}.{k}", "missing")
    for k in sorted(set(info) - {"dtype", "shape", "sha256"}):
        fail(f"{field}.{k}", "unexpected field")
    try:
        dt = np.dtype(info["dtype"]) if isinstance(info["dtype"], str) else None
    except TypeError:
        dt = None
    if dt is None or dt.hasobject or dt.names is not None or dt.str != info["dtype"]:
        fail(f"{field}.dtype", f"not a plain NumPy dtype string: {info['dtype']!r}")
    shape = info["shape"]
    if not isinstance(shape, list) or not all(_is_int(n) for n in shape):
        fail(f"{field}.shape", f"must be a list of integers >= 0, got {shape!r}")
    if not isinstance(info["sha256"], str) or not _HEX64.fullmatch(info["sha256"]):
        fail(f"{field}.sha256", f"must be 64 hexadecimal digits, got {info['sha256']!r}")


def _read_arrays(npz: Path, expected: dict) -> dict:
    """The arrays file's arrays, each checked against its (validated) manifest entry."""
    if not npz.is_file():
        raise CheckpointError(f"checkpoint arrays file {str(npz)!r} is missing")
    arrays = {}
    try:
        with np.load(npz, allow_pickle=False) as data:
            names = set(data.files)
            missing = sorted(set(expected) - names)
            unexpected = sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"checkpoint arrays do not match the manifest: missing {missing}, "
                    f"unexpected {unexpected} {_where(npz)}"
                )
            for key, info in expected.items():
                a = data[key]
                if a.dtype.str != info["dtype"] or list(a.shape) != info["shape"]:
                    raise CheckpointError(
                        f"checkpoint array {key!r} has dtype {a.dtype.str} shape "
                        f"{list(a.shape)}, the manifest says {info['dtype']} {info['shape']} "
                        f"{_where(npz)}"
                    )
                if _sha256(a) != info["sha256"]:
                    raise CheckpointError(
                        f"checkpoint array {key!r} fails its SHA-256 check (the file is "
                        f"corrupted) {_where(npz)}"
                    )
                arrays[key] = a
    except CheckpointError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, EOFError, ValueError on truncated data
        raise CheckpointError(
            f"checkpoint arrays file {str(npz)!r} is unreadable: {type(exc).__name__}: {exc}"
        ) from None
    return arrays


def _check_consistency(m: dict, arrays: dict, path: Path, npz: Path) -> None:
    """The manifest's runs against the arrays: metric rows, optimizer step and state.

    A manifest field that disagrees with the arrays is blamed on the manifest, an array that
    disagrees with others on the arrays file.
    """

    def fail(field, problem):
        where = path if field.startswith("runs.") else npz
        raise CheckpointError(f"{field}: {problem} {_where(where)}")

    cols = {c: arrays[f"metrics/{c}"] for c in _METRIC_FIELDS}
    n = cols["step"].shape[0] if cols["step"].ndim == 1 else -1
    for c, a in cols.items():
        if a.ndim != 1 or a.dtype.kind != _METRIC_KINDS[c]:
            fail(f"metrics/{c}", f"must be a 1-d array of kind {_METRIC_KINDS[c]!r}, got "
                 f"{a.dtype.str} of shape {list(a.shape)}")
        if a.shape[0] != n:
            fail(f"metrics/{c}", f"{a.shape[0]} entries, but metrics/step has {n} (ragged)")
    steps, names = cols["step"], cols["run"]
    strangers = sorted(set(names.tolist()) - set(m["runs"]))
    if strangers:
        fail("metrics/run", f"rows of run {strangers[0]!r}, which the manifest does not have")
    finished = m["extra"].get("finished", False)
    for name, meta in m["runs"].items():
        _check_logged_steps(name, meta, steps[names == name], finished, fail)
        _check_opt_step(name, meta, fail)
        _check_opt_state(name, meta, arrays, fail)


def _check_logged_steps(name, meta, logged, finished: bool, fail) -> None:
    """A run at step ``s`` has logged every multiple of ``log_every`` below ``s`` and nothing
    at or after ``s`` (a finished run: also its final evaluation at ``s``, nothing after)."""
    s, every = meta["step"], meta["config"]["log_every"]
    field = f"runs.{name}.step"
    have = set(np.unique(logged).tolist())
    last = max(have) if have else None
    if finished:
        if last != s:
            fail(field, f"{s}, but the finished run's metric rows end at step {last}")
    elif last is not None and last >= s:
        fail(field, f"{s}, but run {name!r} has metric rows at step {last} (not yet reached)")
    due = set(range(0, s, every))
    lacking = sorted(due - have)
    if lacking:
        fail(field, f"{s}, but run {name!r} has no metric rows at step {lacking[0]} (logged "
             f"every {every} steps)")


def _check_opt_step(name, meta, fail) -> None:
    """One optimizer update per step (NormalizedLR skips, and does not count, a step whose
    gradient is exactly 0: at most one per step)."""
    step, opt_step = meta["step"], meta["opt_step"]
    if meta["config"].get("normalized_lr", False):
        if opt_step > step:
            fail(f"runs.{name}.opt_step", f"{opt_step} updates in {step} steps")
    elif opt_step != step:
        fail(f"runs.{name}.opt_step", f"{opt_step}, but the run is at step {step} (one update "
             "per step)")


def _check_opt_state(name, meta, arrays: dict, fail) -> None:
    params = {
        k[len(f"{name}/param/") :]: a for k, a in arrays.items() if k.startswith(f"{name}/param/")
    }
    for key, a in arrays.items():
        if not key.startswith(f"{name}/opt/"):
            continue
        pname = key[len(f"{name}/opt/") :].rpartition("/")[0]
        if pname not in params:
            fail(key, f"optimizer state of {pname!r}, which is not a parameter of run {name!r}")
        if a.shape != params[pname].shape:
            fail(key, f"shape {list(a.shape)}, but parameter {name}/param/{pname} has "
                 f"{list(params[pname].shape)}")
        if meta["opt_step"] == 0 and np.any(a != 0):
            fail(key, "non-zero optimizer state before the first update (opt_step 0)")


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
        (the differing keys are listed), or its arrays do not fit the run's model and
        optimizer. Nothing is changed then.
    """
    meta = ckpt.manifest["runs"].get(name)
    if meta is None:
        raise CheckpointError(f"checkpoint has no run {name!r} (it has {ckpt.runs()})")
    try:
        # Read as a config, so fields added since the checkpoint was written take the value
        # that reproduces it (TrainConfig.from_dict), not today's default.
        saved = _normalise(type(run.config).from_dict(meta["config"]).to_dict())
    except ValueError as exc:
        raise CheckpointError(f"runs.{name}.config: {exc} ({MANIFEST})") from None
    if allow_more_steps and run.config.steps >= int(meta["step"]):
        saved["steps"] = run.config.steps
    diff = config_differences(saved, _normalise(run.config.to_dict()))
    if diff:
        raise CheckpointError(
            f"checkpoint run {name!r} was made with a different configuration: " + "; ".join(diff)
        )
    npz = _where(ckpt.directory / ckpt.manifest["arrays_file"])
    prefix = f"{name}/param/"
    params = {k[len(prefix) :]: v for k, v in ckpt.arrays.items() if k.startswith(prefix)}
    if set(params) != set(run.params):
        raise CheckpointError(
            f"{prefix}: the checkpoint has parameters {sorted(params)}, the model "
            f"{sorted(run.params)} {npz}"
        )
    for k, v in params.items():
        if v.dtype != to_numpy(run.params[k][:0]).dtype or v.shape != run.params[k].shape:
            raise CheckpointError(
                f"{prefix}{k}: {v.dtype} {list(v.shape)}, the model needs "
                f"{run.params[k].dtype} {list(run.params[k].shape)} {npz}"
            )
    oprefix = f"{name}/opt/"
    opt = {k[len(oprefix) :]: v for k, v in ckpt.arrays.items() if k.startswith(oprefix)}
    try:
        state = run.optimizer.load_state_arrays(opt, int(meta["opt_step"]), like=run.params)
    except ValueError as exc:
        raise CheckpointError(f"{oprefix}: invalid optimizer state: {exc} {npz}") from None
    kept = sorted(p for p, ts in run.opt_state.tensors.items() if ts)
    if sorted(state.tensors) != kept:
        raise CheckpointError(
            f"{oprefix}: the checkpoint has optimizer state for {sorted(state.tensors)}, the "
            f"optimizer keeps state for {kept} {npz}"
        )
    rng = type(run.batch_rng.bit_generator)()
    try:
        rng.state = meta["rng_state"]
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"runs.{name}.rng_state: {exc}") from None
    xp = namespace(*run.params.values())
    for k, v in params.items():
        run.params[k][...] = v if xp is np else xp.asarray(v)
    run.opt_state = state
    run.batch_rng.bit_generator.state = meta["rng_state"]
    run.step = int(meta["step"])


def _normalise(cfg: dict) -> dict:
    """JSON round trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(cfg, sort_keys=True, default=_json_default))


def checkpoint_rows(ckpt: Checkpoint) -> list[tuple]:
    """The metric rows ``(step, run, split, metric, layer, value)`` saved in ``ckpt``."""
    a = ckpt.arrays
    return [
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


def restore_log(log, ckpt: Checkpoint) -> None:
    """Replace ``log``'s rows by the checkpoint's and rewrite its CSV (atomically)."""
    log.reset(checkpoint_rows(ckpt))
