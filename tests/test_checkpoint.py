"""Checkpoints: exact resume, refusal of anything corrupted or different, signals."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from numstab.run import MetricLog, TrainConfig, train
from numstab.run import checkpoint as ckpt_module
from numstab.run.checkpoint import MANIFEST, CheckpointError, load_checkpoint
from numstab.run.driver import StopFlag, Stopped

BASE = TrainConfig(p=23, hidden=(16, 16), steps=24, log_every=4, lr=0.02)


def interrupted_then_resumed(cfg, stop_at, tmp_path, log_path=None):
    """Run ``cfg`` with a stop request at step ``stop_at``, then resume it to the end."""
    flag = StopFlag()
    if stop_at == 0:
        flag.signum = signal.SIGINT

    def progress(t):
        if t == stop_at:
            flag.signum = signal.SIGTERM

    log = MetricLog(log_path)
    with pytest.raises(Stopped) as info:
        train(cfg, log=log, checkpoint_dir=tmp_path, progress=progress, stop=flag)
    assert info.value.step == stop_at
    log.close()
    log2 = MetricLog(log_path)
    run = train(cfg, log=log2, checkpoint_dir=tmp_path, resume=True)
    log2.close()
    return run


@pytest.mark.parametrize(
    "cfg",
    [BASE, BASE.replace(dtype="float16"), BASE.replace(perp_grad="tensor"),
     BASE.replace(batch_size=50)],
    ids=["float32", "float16", "perp-adamw", "minibatch"],
)
@pytest.mark.parametrize("stop_at", [0, 5, 12, 24])
def test_interrupt_and_resume_is_bit_identical(cfg, stop_at, tmp_path):
    ref = train(cfg)
    csv_path = tmp_path / "metrics.csv"
    run = interrupted_then_resumed(cfg, stop_at, tmp_path / "ckpt", csv_path)
    assert run.log.rows == ref.log.rows
    for k in ref.params:
        np.testing.assert_array_equal(run.params[k].view(np.uint8), ref.params[k].view(np.uint8))
    # The CSV on disk holds exactly the uninterrupted run's rows.
    lines = csv_path.read_text().splitlines()
    assert len(lines) - 1 == len(ref.log.rows)


def test_periodic_checkpoints_keep_only_the_latest_arrays(tmp_path):
    train(BASE, checkpoint_dir=tmp_path, checkpoint_every=5)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[1] == MANIFEST
    assert re.fullmatch(r"checkpoint-000024-[0-9a-f]{8}\.npz", files[0])
    ck = load_checkpoint(tmp_path)
    assert ck.manifest["arrays_file"] == files[0]
    assert ck.manifest["runs"]["run"]["step"] == 24 and ck.extra["finished"] is True


def test_resuming_a_finished_run_adds_nothing(tmp_path):
    first = train(BASE, checkpoint_dir=tmp_path)
    again = train(BASE, checkpoint_dir=tmp_path, resume=True)
    assert again.log.rows == first.log.rows


@pytest.mark.parametrize(
    "short_steps, long_steps",
    [(24, 40), (22, 40), (24, 24)],
    ids=["at-a-log-step", "between-log-steps", "same-length"],
)
def test_a_finished_run_continued_for_longer_is_bit_identical(short_steps, long_steps, tmp_path):
    # A finished run resumed with a larger `steps` continues to the new length; its metrics
    # and parameters equal those of one uninterrupted run of the longer configuration (the
    # short run's final-evaluation rows are replaced by the ordinary step's).
    longer = BASE.replace(steps=long_steps)
    ref = train(longer)
    csv_path = tmp_path / "metrics.csv"
    log = MetricLog(csv_path)
    train(BASE.replace(steps=short_steps), log=log, checkpoint_dir=tmp_path)
    log.close()
    log2 = MetricLog(csv_path)
    run = train(longer, log=log2, checkpoint_dir=tmp_path, resume=True)
    log2.close()
    assert run.step == long_steps and run.log.rows == ref.log.rows
    for k in ref.params:
        np.testing.assert_array_equal(run.params[k].view(np.uint8), ref.params[k].view(np.uint8))
    assert len(csv_path.read_text().splitlines()) - 1 == len(ref.log.rows)
    assert load_checkpoint(tmp_path).manifest["runs"]["run"]["step"] == long_steps


def _arrays(directory):
    return {k: (a.dtype.str, a.shape, a.tobytes())
            for k, a in load_checkpoint(directory).arrays.items()}


def test_death_between_arrays_file_and_manifest_keeps_the_checkpoint(tmp_path, monkeypatch):
    """A finished 24-step run continued to 40 steps and stopped at its first step boundary
    writes a checkpoint of step 24 again. The process dies after that checkpoint's arrays
    file is renamed into place and before its manifest is (the manifest write raises): the
    directory must still hold the finished run's checkpoint, byte for byte."""
    train(BASE, checkpoint_dir=tmp_path)
    before = _arrays(tmp_path)

    class Death(BaseException):
        pass

    real = ckpt_module.atomic_open

    @contextlib.contextmanager
    def dying(path, mode="w"):
        if os.path.basename(path) == MANIFEST:
            raise Death
        with real(path, mode) as f:
            yield f

    monkeypatch.setattr(ckpt_module, "atomic_open", dying)
    flag = StopFlag()
    flag.signum = signal.SIGTERM
    with pytest.raises(Death):
        train(BASE.replace(steps=40), checkpoint_dir=tmp_path, resume=True, stop=flag)
    monkeypatch.undo()
    assert _arrays(tmp_path) == before
    assert len(list(tmp_path.glob("checkpoint-*.npz"))) == 2  # the new file did land
    ck = load_checkpoint(tmp_path)
    assert ck.manifest["runs"]["run"]["step"] == 24 and ck.extra["finished"] is True


def test_continuing_to_fewer_steps_than_done_is_refused(tmp_path):
    train(BASE, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="steps: checkpoint 24, now 20"):
        train(BASE.replace(steps=20), checkpoint_dir=tmp_path, resume=True)
    # Any other difference is still refused, whatever `steps` says.
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.02, now 0.03"):
        train(BASE.replace(steps=40, lr=0.03), checkpoint_dir=tmp_path, resume=True)


@pytest.fixture
def checkpoint(tmp_path):
    flag = StopFlag()
    with pytest.raises(Stopped):
        train(BASE, checkpoint_dir=tmp_path,
              progress=lambda t: setattr(flag, "signum", signal.SIGINT) if t == 8 else None,
              stop=flag)
    return tmp_path


def _npz(path):
    return next(path.glob("checkpoint-*.npz"))


def test_truncated_arrays_file_is_refused(checkpoint):
    f = _npz(checkpoint)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        train(BASE, checkpoint_dir=checkpoint, resume=True)


def test_flipped_byte_is_refused(checkpoint):
    f = _npz(checkpoint)
    # Flip one byte inside the stored (uncompressed) parameter data of W2.
    with zipfile.ZipFile(f) as z:
        info = z.getinfo("run/param/W2.npy")
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data = bytearray(f.read_bytes())
    data[offset] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="W2|unreadable"):
        train(BASE, checkpoint_dir=checkpoint, resume=True)


def test_swapped_arrays_are_refused(checkpoint):
    f = _npz(checkpoint)
    with np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["run/param/W2"], arrays["run/opt/W2/exp_avg"] = (
        arrays["run/opt/W2/exp_avg"], arrays["run/param/W2"])
    np.savez(f, **arrays)
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(BASE, checkpoint_dir=checkpoint, resume=True)


def test_missing_array_is_refused(checkpoint):
    f = _npz(checkpoint)
    with np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "run/param/W3"}
    np.savez(f, **arrays)
    with pytest.raises(CheckpointError, match="missing.*run/param/W3"):
        train(BASE, checkpoint_dir=checkpoint, resume=True)


def test_other_version_is_refused(checkpoint):
    m = checkpoint / MANIFEST
    manifest = json.loads(m.read_text())
    manifest["numstab_version"] = "0.0.1"
    m.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"numstab '0\.0\.1'"):
        train(BASE, checkpoint_dir=checkpoint, resume=True)


def test_other_configuration_is_refused_with_the_differences(checkpoint):
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0\.02, now 0\.03"):
        train(BASE.replace(lr=0.03), checkpoint_dir=checkpoint, resume=True)


def test_no_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        train(BASE, checkpoint_dir=tmp_path, resume=True)


def test_pickled_arrays_are_never_loaded(checkpoint):
    """An object array (which needs pickle) in the arrays file is refused, not unpickled."""
    f = _npz(checkpoint)
    with np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["run/param/W2"] = np.array([object()] * 3, dtype=object)
    np.savez(f, **arrays)
    with pytest.raises(CheckpointError):
        load_checkpoint(checkpoint)


def test_sigint_in_a_subprocess_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "numstab.train", "--modulus", "23", "--hidden", "16", "16",
           "--steps", "100000", "--log-every", "50", "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.csv").exists() or (out / "metrics.csv").stat().st_size < 2000:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    ck = load_checkpoint(out)
    step = ck.manifest["runs"]["run"]["step"]
    assert 0 < step < 100000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"]["kind"] == "interrupted"
    assert os.path.getsize(out / "metrics.csv") > 0


def test_a_checkpoint_from_before_the_elementary_option_resumes_as_libm(tmp_path):
    # Checkpoints written before TrainConfig had `elementary` were computed with the
    # platform's libm exp/log. Such a record (the field removed, the manifest's checksum
    # recomputed) must resume as libm -- bit-identical to an uninterrupted libm run -- and
    # must not be refused as "elementary: checkpoint <absent>, now 'correct'".
    libm = BASE.replace(elementary="libm")
    ref = train(libm)
    stop = StopFlag()

    def progress(t):
        if t == 12:
            stop.signum = signal.SIGTERM

    with pytest.raises(Stopped):
        train(libm, checkpoint_dir=tmp_path, progress=progress, stop=stop)
    path = tmp_path / MANIFEST
    m = json.loads(path.read_text())
    del m["runs"]["run"]["config"]["elementary"]
    m["manifest_sha256"] = ckpt_module._manifest_digest(m)
    path.write_text(json.dumps(m))
    run = train(libm, checkpoint_dir=tmp_path, resume=True)
    assert run.log.rows == ref.log.rows
    # Today's default (correct) is a different computation: refused, naming the field.
    with pytest.raises(CheckpointError, match="elementary"):
        train(BASE.replace(steps=30), checkpoint_dir=tmp_path, resume=True)
