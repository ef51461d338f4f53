"""ml_dtypes is imported only where a format of its own is used, scipy.sparse only where a
training batch's gather matrix is built (from SciPy 1.16).

ml_dtypes 0.7.0 takes about a second to import (nearly all of it registering ufunc loops;
0.6.0 takes milliseconds), and every command line, sweep worker and doc example would pay it;
scipy.sparse about 0.1 s. Each check runs in a fresh interpreter: this test process has long
imported both.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


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


def _scipy_before_1_16() -> bool:
    import scipy

    major, minor = (int(p) for p in scipy.__version__.split(".")[:2])
    return (major, minor) < (1, 16)


def test_scipy_sparse_waits_for_first_use_where_it_loads_no_blas(tmp_path):
    """From SciPy 1.16 the command lines, the audit and the monitor start without scipy.sparse
    and a run imports it when it builds its gather matrix; before 1.16, where it loads a BLAS
    of its own, it is imported with numstab.backend (a thread limit set later then covers
    that BLAS too)."""
    out = _fresh(
        """
        import sys
        import numstab.audit, numstab.monitor
        import numstab.cli.compare, numstab.cli.sweep, numstab.cli.train
        print("at start-up:", "scipy.sparse" in sys.modules)
        from numstab.train import main

        assert main(["--dtype", "float32", "--steps", "2", "--hidden", "4", "--modulus", "5",
                     "--quiet", "--out", "run"]) == 0
        print("after a run:", "scipy.sparse" in sys.modules)
        """,
        tmp_path,
    )
    eager = _scipy_before_1_16()
    said = [line for line in out.splitlines() if line.startswith(("at start-up", "after a run"))]
    assert said == [f"at start-up: {eager}", "after a run: True"]


def test_scipy_sparse_loads_no_blas_of_its_own_from_1_16(tmp_path):
    """The premise of the lazy import, checked on the installed SciPy: importing scipy.sparse
    and multiplying by a CSR matrix adds no BLAS library to the process from 1.16 on (a later
    SciPy that did would need the import at start-up again: this test then fails)."""
    if _scipy_before_1_16():
        pytest.skip("SciPy < 1.16 loads a BLAS of its own here: numstab imports it at start-up")
    out = _fresh(
        """
        import numpy as np
        import threadpoolctl

        def blas():
            return sorted(c["filepath"] for c in threadpoolctl.threadpool_info()
                          if c["user_api"] == "blas")

        before = blas()
        import scipy.sparse
        m = scipy.sparse.csr_matrix(np.eye(4))
        m @ np.ones((4, 3))
        print(len(blas()) - len(before))
        """,
        tmp_path,
    )
    assert int(out.split()[-1]) == 0
