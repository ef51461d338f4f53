"""Behaviour is unchanged by refactoring: runs of this tree are byte-identical to a base revision.

``scripts/check_bit_identity.py`` trains the same small configurations (float32, float16,
bfloat16 and float64 ``train`` runs and a ``compare`` run) with the code of :data:`BASE`
(checked out in a temporary git worktree) and with this tree, on this machine with these
packages, and compares the ``metrics.csv`` files byte for byte. A change that is meant to
change results moves :data:`BASE` to its own revision, saying so in its message.
"""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The last revision before the module redesign (losses package, run/ and cli/ packages).
BASE = "386267a8793f"


def _has_base() -> bool:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return False
    r = subprocess.run(["git", "cat-file", "-e", BASE + "^{commit}"], cwd=ROOT,
                       capture_output=True)  # fmt: skip
    return r.returncode == 0


@pytest.mark.skipif(not _has_base(), reason=f"needs a git checkout holding revision {BASE}")
def test_runs_are_byte_identical_to_the_base_revision(capsys):
    path = ROOT / "scripts" / "check_bit_identity.py"
    spec = importlib.util.spec_from_file_location("check_bit_identity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    code = mod.main(["--base", BASE])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("identical") >= len(mod.CASES) and "DIFFERENT" not in out
