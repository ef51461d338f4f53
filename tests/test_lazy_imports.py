"""ml_dtypes is imported only where a format of its own is used.

ml_dtypes 0.7.0 takes about a second to import (nearly all of it registering ufunc loops;
0.6.0 takes milliseconds), and every command line, sweep worker and doc example would pay it.
Each check runs in a fresh interpreter: this test process has long imported ml_dtypes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _fresh(code: str, tmp_path) -> str:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_float32_run_and_its_audit_never_import_ml_dtypes(tmp_path):
    out = _fresh(
        """
        import sys
        import numpy as np
        import numstab.audit, numstab.compare, numstab.monitor, numstab.sweep, numstab.testing
        from numstab.train import main
        from numstab.precision import format_of, get_format
        from numstab.audit import audit_cross_entropy

        assert main(["--dtype", "float32", "--steps", "3", "--hidden", "4", "--modulus", "5",
                     "--quiet", "--out", "run"]) == 0
        z = np.array([[0.0, -20.0, -30.0]], dtype=np.float32)
        audit_cross_entropy(z, np.array([0]))
        for dt in (np.float16, np.float32, np.float64, np.int64):
            format_of(np.zeros(1, dt))
        get_format(np.dtype(np.float32))
        print("ml_dtypes loaded:", "ml_dtypes" in sys.modules)
        """,
        tmp_path,
    )
    assert out.splitlines()[-1] == "ml_dtypes loaded: False"


def test_its_formats_work_in_a_fresh_interpreter_by_name_and_by_dtype(tmp_path):
    out = _fresh(
        """
        import sys
        import numpy as np
        from numstab.backend import as_dtype, is_ml_dtype
        from numstab.data import dense_inputs
        from numstab.precision import format_of, get_format, round_to

        # a NumPy dtype is never ml_dtypes' (and asking does not import it)
        assert not is_ml_dtype(np.dtype(np.float32), "bfloat16")
        assert "ml_dtypes" not in sys.modules
        # a name only ml_dtypes registers is found
        bf16 = as_dtype("bfloat16")
        import ml_dtypes
        assert bf16 == np.dtype(ml_dtypes.bfloat16) and is_ml_dtype(bf16, "bfloat16")
        # 1 + 2**-8 is a tie between 1 and 1 + 2**-7 in bfloat16: to even, 1
        r = round_to(np.array([1.0 + 2.0**-8, 3.0]), "bfloat16")
        assert r.dtype == bf16 and r.astype(np.float64).tolist() == [1.0, 3.0]
        assert format_of(r).name == "bfloat16" and get_format(r.dtype).name == "bfloat16"
        e4m3 = round_to(np.array([448.0]), "float8_e4m3fn")
        assert format_of(e4m3).name == "float8_e4m3fn"
        x = dense_inputs(np.array([[1, 2]]), "onehot", 10, dtype="bfloat16")
        assert x.dtype == bf16 and x.astype(np.float32).sum() == 2
        print("ok")
        """,
        tmp_path,
    )
    assert out.split() == ["ok"]
