"""Rounding modes and subnormal rules in formats, policies, the run schema and the process.

The exhaustive checks of every mode against the exact oracle are in tests/test_formats.py;
here: the ``@``-names, DAZ, the stochastic-rounding scopes, the run options and their run ids,
and the refusal of a process that flushes subnormals (MXCSR flipped in a subprocess).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from numstab.losses.rounding import Rounding
from numstab.precision import PrecisionPolicy, get_format, quantize, with_arithmetic
from numstab.rounding_modes import flush_subnormals, next_key, stochastic_scope
from numstab.run import TrainConfig
from numstab.sweep import run_id
from numstab.sweep.spec import canonical_json


def test_names_carry_the_arithmetic():
    f = get_format("fp16@sr@ftz")
    assert (f.name, f.rounding, f.subnormals) == ("float16@stochastic@ftz", "stochastic", "ftz")
    assert get_format(f.name) == f and f.plain == get_format("float16")
    assert with_arithmetic("float16") is get_format("float16")
    assert get_format("float32@ftz").subnormals == "ftz"
    with pytest.raises(ValueError, match="emulated formats"):
        get_format("float32@up")
    with pytest.raises(ValueError, match="unknown rounding mode 'sideways'"):
        get_format("float16@sideways")


def test_format_modes_are_quantize_defaults():
    x = np.array([1 + 2.0**-12, -(1 + 2.0**-12), 2.0**-26], dtype=np.float32)
    assert quantize(x, "float16@up").tolist() == [1 + 2.0**-10, -1.0, 2.0**-24]
    assert quantize(x, "float16@up@ftz").tolist() == [1 + 2.0**-10, -1.0, 0.0]
    # an explicit argument wins over the format's own mode
    assert quantize(x, "float16@up", rounding="down").tolist() == [1.0, -(1 + 2.0**-10), 0.0]


def test_flush_to_zero_keeps_the_sign_and_daz_reads_operands_as_zero():
    tiny16 = 2.0**-14
    x = np.array([tiny16, tiny16 / 2, -tiny16 / 4, 0.0, -3.0], dtype=np.float32)
    got = quantize(x, "float16@ftz")
    assert got.tolist() == [tiny16, 0.0, 0.0, 0.0, -3.0] and np.signbit(got[2])
    assert flush_subnormals(x, get_format("float16")).tolist() == got.tolist()
    r = Rounding(get_format("float16@daz"), xp=np)
    a = np.array([tiny16 / 2], dtype=np.float32)
    assert r.add(a, a)[0] == 0.0  # DAZ: both operands read as 0
    assert Rounding(get_format("float16"), xp=np).add(a, a)[0] == tiny16


def test_stochastic_scope_keys_are_ordered_and_resumable():
    with stochastic_scope(1, 5, "update"):
        keys = [next_key() for _ in range(3)]
    with stochastic_scope(1, 5, "update"):
        assert [next_key() for _ in range(3)] == keys
    assert keys[1][2] == keys[0][2] + 1 and keys[0][:2] == (1, 5)
    with pytest.raises(ValueError, match="stochastic_scope"):
        next_key()
    x = np.full(512, 1 + 2.0**-12, dtype=np.float32)
    with stochastic_scope(0, 0, "forward"):
        a, b = quantize(x, "float16@sr"), quantize(x, "float16@sr")
    assert not (a == b).all()  # two roundings, two draws


def test_run_options_keep_old_ids_and_record_new_values():
    base = TrainConfig(dtype="float16", seed=3)
    assert run_id(base) == "2d350191a2a3"  # its id before the options existed (cffbd49)
    assert base.to_dict()["rounding"] == "nearest"  # recorded ...
    assert '"rounding"' not in canonical_json(base)  # ... but left out of the id at default
    assert run_id(base) == run_id(TrainConfig.from_dict(base.to_dict()))
    sr = TrainConfig(dtype="float16", rounding="sr", loss_subnormals="ftz")
    d = sr.to_dict()
    assert d["rounding"] == "stochastic" and d["loss_subnormals"] == "ftz"
    assert run_id(sr) != run_id(base) and TrainConfig.from_dict(d) == sr
    assert sr.policy.storage.name == "float16@stochastic"
    assert sr.policy.loss.name == "float16@stochastic@ftz"
    assert sr.make_optimizer().storage_format.name == "float16@stochastic"
    assert TrainConfig(dtype="e5m2").dtype == "float8_e5m2"
    with pytest.raises(ValueError, match="rounding"):
        TrainConfig(dtype="float32", rounding="stochastic")
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="float16@stochastic")


def test_stochastic_training_is_reproducible_and_differs_from_nearest():
    from numstab.run.loop import Run

    cfg = TrainConfig(dtype="float16", rounding="stochastic", steps=3, hidden=(16,), p=7)
    runs = [Run(cfg), Run(cfg), Run(cfg.replace(rounding="nearest"))]
    for r in runs:
        for _ in range(3):
            r.advance(log=False)
    w = [r.params["W2"] for r in runs]
    assert np.array_equal(w[0], w[1])
    assert not np.array_equal(w[0], w[2])


def test_policy_roles():
    pol = PrecisionPolicy.paper("float16@sr", "bfloat16@rz")
    assert pol.compute.name == "float32"  # GEMMs accumulate in hardware float32
    assert pol.to_dict()["storage"] == "float16@stochastic"
    assert pol.to_dict()["loss"] == "bfloat16@toward_zero"


_HELPER = "void numstab_set_ftz_daz(void){ unsigned m; __asm__ volatile(\"stmxcsr %0\" : " \
          "\"=m\"(m)); m |= 0x8040u; __asm__ volatile(\"ldmxcsr %0\" : : \"m\"(m)); }\n"


@pytest.fixture(scope="module")
def ftz_helper(tmp_path_factory):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the MXCSR FTZ/DAZ bits exist on x86-64 only")
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the helper that sets MXCSR")
    d = tmp_path_factory.mktemp("ftz")
    (d / "ftz.c").write_text(_HELPER)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(d / "libftz.so"), str(d / "ftz.c")],
                   check=True)
    return str(d / "libftz.so")


def _in_ftz_process(lib, body: str, env=None):
    code = textwrap.dedent(f"""
        import ctypes, json, sys
        ctypes.CDLL({lib!r}).numstab_set_ftz_daz()
        """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)


def test_flush_to_zero_process_is_refused(ftz_helper, tmp_path):
    res = _in_ftz_process(ftz_helper, """
        import warnings
        import numpy as np
        from numstab.process_arithmetic import process_arithmetic
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import numstab.audit as A
        state = process_arithmetic()
        try:
            A.sc_fraction(np.zeros((1, 3), dtype=np.float32))
            raised = None
        except A.FlushToZeroError as exc:
            raised = str(exc)
        print(json.dumps({"state": state, "warned": [str(x.message) for x in w],
                          "raised": raised}))
        from numstab.cli.train import main
        sys.exit(main(["--steps", "1", "--modulus", "5", "--hidden", "4"]))
        """)
    assert res.returncode == 2, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[0])
    assert out["state"] == {"ftz": True, "daz": True}
    assert "flush-to-zero (FTZ) and denormals-are-zero (DAZ)" in out["raised"]
    assert any("flush-to-zero" in m for m in out["warned"])
    assert "error: this process does flush-to-zero" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_flush_to_zero_opt_in(ftz_helper):
    import os

    env = {**os.environ, "NUMSTAB_ALLOW_FTZ": "1"}
    res = _in_ftz_process(ftz_helper, """
        import numpy as np
        import numstab.audit as A
        z = np.array([[0.0, -100.0]], dtype=np.float32)
        print(A.sc_fraction(z))
        """, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1.0"


def test_gradual_process_passes():
    from numstab.process_arithmetic import process_arithmetic, require_gradual_underflow

    assert process_arithmetic() == {"ftz": False, "daz": False}
    require_gradual_underflow()


def test_update_role_and_sweep_keys():
    from numstab.run.loop import Run
    from numstab.sweep import parse_spec

    cfg = TrainConfig(dtype="float16", update_rounding="sr", p=7, hidden=(8,))
    pol = cfg.policy
    assert (pol.storage.name, pol.update.name) == ("float16", "float16@stochastic")
    assert pol.to_dict()["update"] == "float16@stochastic"
    assert "update" not in TrainConfig(dtype="float16").policy.to_dict()
    with pytest.raises(ValueError, match="must be the storage format"):
        PrecisionPolicy(storage="float16", compute="float32", loss="float16",
                        update="bfloat16@sr")
    a, b = Run(cfg), Run(cfg.replace(update_rounding=None))
    for r in (a, b):
        r.advance(log=False)
    # the forward/backward are the same; only the update rounds differently
    assert not np.array_equal(a.params["W1"], b.params["W1"])
    sweep = parse_spec({"base": {"p": 7, "hidden": [8], "dtype": "fp16"},
                        "axes": {"rounding": ["nearest", "sr"]}}, max_run_bytes=None)
    assert [r.config.rounding for r in sweep.runs] == ["nearest", "stochastic"]


@pytest.mark.parametrize("stop_at", [0, 7])
def test_stochastic_run_resumes_bit_identically(stop_at, tmp_path):
    """Interrupted at a step and resumed from its checkpoint, a run with stochastic rounding
    (every role) draws the same bits as the uninterrupted run."""
    from test_checkpoint import interrupted_then_resumed

    from numstab.run import train

    cfg = TrainConfig(p=23, hidden=(16, 16), steps=16, log_every=4, lr=0.02, dtype="float16",
                      rounding="stochastic")
    ref = train(cfg)
    run = interrupted_then_resumed(cfg, stop_at, tmp_path / "ckpt", tmp_path / "metrics.csv")
    assert run.log.rows == ref.log.rows
    for k in ref.params:
        assert np.array_equal(run.params[k].view(np.uint32), ref.params[k].view(np.uint32))
    nearest = train(cfg.replace(rounding="nearest"))
    assert not np.array_equal(nearest.params["W1"], ref.params["W1"])
