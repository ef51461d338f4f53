"""GPU (CuPy) checks. Marked ``gpu``: they skip with a one-line reason without CuPy or a device.

``scripts/gpu_check.py`` runs them on a GPU machine; ``test_gpu_check_script_without_gpu``
runs everywhere else.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numstab.backend import get_backend

ROOT = Path(__file__).resolve().parent.parent


def _cupy_or_reason():
    try:
        return get_backend("cupy"), None
    except RuntimeError as exc:
        return None, str(exc).split(":")[0]


CP, WHY = _cupy_or_reason()
needs_gpu = pytest.mark.skipif(CP is None, reason=f"no CuPy GPU: {WHY}")


def test_gpu_check_script_without_gpu():
    if CP is not None:
        pytest.skip("a GPU is present: scripts/gpu_check.py runs the real check")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no GPU" in proc.stdout


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("fmt", ["float32", "float64", "float16", "bfloat16"])
def test_step_on_gpu_matches_numpy(fmt):
    """A full-batch evaluation on CuPy agrees with NumPy: same inputs and parameters, GEMMs
    and reductions in other orders, so values agree within the accumulated rounding of a
    3-layer network (bounded here by 2**-(p-12) relative, i.e. 12 bits of slack), and the
    parameters live on the device."""
    from numstab.backend import to_numpy
    from numstab.precision import get_format
    from numstab.run import Run, TrainConfig

    cfg = TrainConfig(dtype=fmt, p=59, hidden=(64, 64), steps=3)
    host, dev = Run(cfg), Run(cfg.replace(backend="cupy"))
    assert all(type(v).__module__.startswith("cupy") for v in dev.params.values())
    eh, ed = host.evaluate("train"), dev.evaluate("train")
    rel = 2.0 ** -(get_format(fmt).precision - 12)
    np.testing.assert_allclose(to_numpy(ed.logits), eh.logits, rtol=rel, atol=rel)
    for _ in range(3):
        dev.advance(log=False)
    assert all(type(v).__module__.startswith("cupy") for v in dev.params.values())


@pytest.mark.gpu
@needs_gpu
def test_bfloat16_emulation_on_gpu_is_bit_identical():
    """The rounding emulation on device arrays equals ml_dtypes on every bfloat16 pattern."""
    import ml_dtypes

    from numstab.backend import to_numpy
    from numstab.precision import quantize

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    with np.errstate(invalid="ignore"):
        x = bits.astype(np.float32)
    s = np.unique(x[np.isfinite(x)].astype(np.float64))
    mids = ((s[:-1] + s[1:]) / 2).astype(np.float32)
    for arr in (x, mids):
        host = quantize(arr, "bfloat16")
        dev = to_numpy(quantize(CP.asarray(arr), "bfloat16"))
        fin = ~np.isnan(host)
        np.testing.assert_array_equal(dev[fin].view(np.uint32), host[fin].view(np.uint32))
        assert np.isnan(dev[~fin]).all()
