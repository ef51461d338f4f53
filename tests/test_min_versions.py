"""scripts/check_min_versions.py pins what pyproject.toml declares, and the bounds are testable.

Fast: nothing is installed. The pins are compared with pyproject.toml as read by ``tomllib``
(an independent parse); the requirement parser with hand-written strings.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "check_min_versions", ROOT / "scripts" / "check_min_versions.py"
)
cmv = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cmv  # dataclasses look their module up there
_spec.loader.exec_module(cmv)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
RUNTIME = PYPROJECT["project"]["dependencies"]
TEST_EXTRA = PYPROJECT["project"]["optional-dependencies"]["test"]


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", req).group()).lower()


#: Exact pins of the test extra, each explained by a comment in pyproject.toml.
PINNED = {"torch"}


def test_every_runtime_and_test_dependency_has_one_lower_bound_and_no_cap():
    for req in [*RUNTIME, *TEST_EXTRA]:
        if _name(req) in PINNED:
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9.]+", req), f"{req!r}: one exact pin"
            continue
        assert req.count(">=") == 1, f"{req!r}: needs exactly one '>=' lower bound"
        assert not re.search(r"<|==|~=|!=", req), f"{req!r}: no upper bound or exclusion"


def test_pins_are_the_lower_bounds_of_pyproject():
    pins = cmv.min_pins(cmv.requirements(PYPROJECT, ("test",)))
    want = {_name(r): re.split(">=|==", r)[1].strip() for r in [*RUNTIME, *TEST_EXTRA]}
    assert pins == want
    assert pins["numpy"] and pins["dask"] and pins["ml-dtypes"]  # extras and '_' normalized


def test_constraints_file_has_no_extras_and_one_pin_a_line():
    text = cmv.constraints_text(cmv.min_pins(cmv.requirements(PYPROJECT, ("test",))))
    lines = text.splitlines()
    assert len(lines) == len(RUNTIME) + len(TEST_EXTRA)
    assert all(re.fullmatch(r"[a-z0-9-]+==[0-9][0-9A-Za-z.]*", line) for line in lines), lines
    assert "dask==" in text and "[" not in text  # pip refuses extras in constraints


def test_print_pins_command(capsys):
    assert cmv.main(["--print-pins"]) == 0
    out = capsys.readouterr().out
    for req in RUNTIME:
        assert f"{_name(req)}=={req.split('>=')[1].strip()}\n" in out


@pytest.mark.parametrize(
    ("text", "name", "extras", "specs", "marker"),
    [
        ("numpy>=2.1.2", "numpy", (), ((">=", "2.1.2"),), None),
        ("dask[distributed] >= 2024.1", "dask", ("distributed",), ((">=", "2024.1"),), None),
        ("a_b.c>=1,<2 ; python_version<'3.12'", "a_b.c", (), ((">=", "1"), ("<", "2")),
         "python_version<'3.12'"),
        ("torch", "torch", (), (), None),
    ],
)
def test_parse_requirement(text, name, extras, specs, marker):
    r = cmv.parse_requirement(text)
    assert (r.name, r.extras, r.specs, r.marker) == (name, extras, specs, marker)


def test_bounds_and_merging():
    capped = cmv.parse_requirement("x>=1.2,<2")
    assert capped.lower_bound == "1.2" and capped.upper_bounds == ("<2",)
    assert cmv.parse_requirement("x").lower_bound is None
    assert cmv.parse_requirement("x==2.13.0").lower_bound == "2.13.0"  # an exact pin
    # the same package in the dependencies and an extra: the larger bound wins (1.10 > 1.9)
    reqs = [cmv.parse_requirement("X_y>=1.9"), cmv.parse_requirement("x-y>=1.10", "extra t")]
    assert cmv.min_pins(reqs) == {"x-y": "1.10"}
    assert cmv.same_version("2.0.0", "2") and not cmv.same_version("2.1.2", "2.1")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("pkg @ https://example.org/p.whl", "direct URL"),
        ("x>=1,>>2", "'>>2'"),
        ("", "is not a requirement"),
    ],
)
def test_bad_requirements_are_refused(text, pattern):
    with pytest.raises(ValueError, match=re.escape(pattern)):
        cmv.parse_requirement(text)


def test_bad_command_lines_exit_2_with_one_line(tmp_path, capsys):
    assert cmv.main(["--extras", "nope", "--print-pins"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown extra 'nope'" in err[0]
    not_a_venv = tmp_path / "data"
    not_a_venv.mkdir()
    (not_a_venv / "keep.txt").write_text("x")
    assert cmv.main(["--venv", str(not_a_venv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a virtual environment" in err[0]
    assert (not_a_venv / "keep.txt").read_text() == "x"  # refused: nothing touched
    assert cmv.main(["--venv", str(not_a_venv / "keep.txt")]) == 2  # a file
    assert "not a virtual environment" in capsys.readouterr().err
    assert (not_a_venv / "keep.txt").read_text() == "x"


def test_install_targets_leave_out_what_is_named_and_keep_the_rest_as_written():
    reqs = cmv.requirements(PYPROJECT, ("test",))
    assert cmv.install_targets(reqs, ("test",)) == ["-e", ".[test]"]
    kept = [r for r in TEST_EXTRA if _name(r) != "torch"]
    assert len(kept) == len(TEST_EXTRA) - 1  # torch is in the extra: one requirement goes
    assert cmv.install_targets(reqs, ("test",), ("Torch",)) == ["-e", ".", *kept]


def test_without_and_newest_on_the_command_line(capsys):
    assert cmv.main(["--without", "numpy", "--print-pins"]) == 2  # a runtime dependency
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--without 'numpy'" in err[0] and "extras test" in err[0]
    assert cmv.main(["--without", "torch", "--print-pins"]) == 0
    pins = capsys.readouterr().out
    assert "torch==" not in pins and "mpmath==" in pins and "jax==" in pins
    assert cmv.main(["--newest", "--without", "torch", "--print-pins"]) == 0
    assert capsys.readouterr().out == "# no pins (--newest)\n"
