"""The ``numstab`` command: subcommands, ``python -m numstab``, ``--version``, packaging."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import subprocess
import sys

import pytest

import numstab
from numstab.__main__ import COMMANDS, main


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=120
    )


def test_console_script_points_at_the_dispatcher():
    (ep,) = importlib.metadata.entry_points(group="console_scripts", name="numstab")
    assert ep.load() is main


@pytest.mark.parametrize("command", ["compare", "train", "sweep"])
def test_version_everywhere(command):
    for args in (["numstab", "--version"], ["numstab", command, "--version"],
                 [f"numstab.{command}", "--version"]):
        r = _run(*args)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().endswith(numstab.__version__), r.stdout


def test_python_m_numstab_runs_a_subcommand(tmp_path):
    r = _run("numstab", "train", "--steps", "3", "--hidden", "4", "--modulus", "5",
             "--quiet", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "metrics.csv").read_text().count("\n") > 1


@pytest.mark.parametrize(("argv", "code", "text"), [
    ([], 2, "a command is required"),
    (["bogus"], 2, "unknown command 'bogus'"),
    (["--help"], 0, "compare"),
])
def test_dispatcher_answers(argv, code, text, capsys):
    assert main(argv) == code
    out = capsys.readouterr()
    assert text in (out.out + out.err)


def test_every_command_is_a_module_with_main():
    import importlib

    for module, _ in COMMANDS.values():
        assert callable(importlib.import_module(module).main)


def test_package_is_typed():
    assert importlib.resources.files("numstab").joinpath("py.typed").is_file()


def test_the_wheel_ships_the_specs_and_the_type_marker(tmp_path):
    # What an installed (not editable) numstab holds: build the wheel and read its file list.
    import pathlib
    import zipfile

    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("numstab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "numstab/py.typed" in names
    for spec in ("example", "fig1", "fig2", "fig4", "fig5", "fig6", "fig8", "extra"):
        assert f"numstab/specs/{spec}.toml" in names, spec
    assert any(n.endswith("entry_points.txt") for n in names)
