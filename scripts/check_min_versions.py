#!/usr/bin/env python
"""Run the test suite with every dependency at its declared minimum version.

Usage::

    python scripts/check_min_versions.py [--venv DIR] [--python PY] [--extras test]
                                         [--newest] [--without NAMES]
                                         [--print-pins] [-- PYTEST_ARGS...]

Reads ``pyproject.toml``, turns every ``>=`` lower bound of the runtime dependencies and of the
chosen extras (default: ``test``) into a pin ``name==min``, creates a fresh virtual environment
(in a temporary folder, removed afterwards, or in ``--venv DIR``, kept), installs ``-e .[extras]``
there with those pins as a pip constraints file, prints the installed versions and runs
``python -m pytest`` from the repository root (default arguments ``-q -p no:cacheprovider``).

The pinned packages are installed from wheels only (``--only-binary``): a minimum that needs a
compiler and C headers to install is not a minimum a user gets. Packages that are not pinned
(the dependencies of the dependencies) resolve to whatever pip picks.

``--newest`` pins nothing: every package resolves to the newest release pip finds, as for a
user installing today. ``--without torch`` leaves packages of the extras out (the extra's other
requirements are installed by name): torch requires sympy, and sympy (1.14) caps mpmath
below 1.4, so the test extra's environment, CI's included, holds mpmath 1.3 while a user who
installs numstab without torch gets the newest mpmath. ``--newest --without torch`` tests
that environment (the tests that need torch skip).

Exit status: pytest's; 2 for bad arguments or an unreadable ``pyproject.toml``; 6 when the
environment cannot be created or the pins cannot be installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL_FAILED = 6
DEFAULT_PYTEST_ARGS = ("-q", "-p", "no:cacheprovider")

# PEP 508, the subset pyproject dependencies use: name, optional [extras], comma-separated
# version specifiers, optional "; marker". URLs ("name @ url") are not version-bounded at all.
_REQ = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*"
    r"(?:\[(?P<extras>[^\]]*)\])?\s*"
    r"(?P<specs>[^;@]*?)\s*"
    r"(?:;\s*(?P<marker>.*?))?\s*$"
)
_SPEC = re.compile(r"^\s*(?P<op>===|==|!=|~=|>=|<=|>|<)\s*(?P<version>[0-9A-Za-z*][^\s,]*)\s*$")


@dataclass(frozen=True)
class Requirement:
    """One dependency string of ``pyproject.toml``, split into its parts."""

    name: str  # as written
    extras: tuple[str, ...]
    specs: tuple[tuple[str, str], ...]  # ((operator, version), ...)
    marker: str | None
    source: str  # "dependencies" or "extra <name>"
    text: str = ""  # as written in pyproject.toml

    @property
    def key(self) -> str:
        """The normalized project name (PEP 503): what pip compares."""
        return re.sub(r"[-_.]+", "-", self.name).lower()

    @property
    def lower_bound(self) -> str | None:
        """The version of the ``>=`` specifier (or of a lone ``==`` pin), or None."""
        lows = [v for op, v in self.specs if op == ">="] or [
            v for op, v in self.specs if op == "==" and len(self.specs) == 1
        ]
        return lows[0] if len(lows) == 1 else None

    @property
    def upper_bounds(self) -> tuple[str, ...]:
        """Specifiers that cap the version from above (``<``, ``<=``, ``==``, ``~=``, ``===``)."""
        return tuple(f"{op}{v}" for op, v in self.specs if op in ("<", "<=", "==", "~=", "==="))


def parse_requirement(text: str, source: str = "dependencies") -> Requirement:
    """Split a requirement string; raises ValueError naming it when it is not one."""
    if "@" in text.split(";")[0]:
        raise ValueError(f"{source}: {text!r} is a direct URL reference (no version bound)")
    m = _REQ.match(text)
    if m is None:
        raise ValueError(f"{source}: {text!r} is not a requirement (name[extras] specifiers)")
    specs = []
    for part in filter(None, (p.strip() for p in m["specs"].split(","))):
        s = _SPEC.match(part)
        if s is None:
            raise ValueError(f"{source}: {text!r}: {part!r} is not a version specifier")
        specs.append((s["op"], s["version"]))
    extras = tuple(e.strip() for e in (m["extras"] or "").split(",") if e.strip())
    return Requirement(m["name"], extras, tuple(specs), m["marker"] or None, source, text.strip())


def requirements(pyproject: dict, extras=("test",)) -> list[Requirement]:
    """The runtime dependencies, then those of each named extra, in file order."""
    project = pyproject.get("project", {})
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise ValueError(f"unknown extra {unknown[0]!r}; pyproject.toml has {sorted(optional)}")
    reqs = [parse_requirement(r) for r in project.get("dependencies", [])]
    for extra in extras:
        reqs += [parse_requirement(r, f"extra {extra}") for r in optional[extra]]
    return reqs


def min_pins(reqs: list[Requirement]) -> dict[str, str]:
    """``{normalized name: minimum version}`` from every ``>=`` bound.

    A package named twice (in the dependencies and in an extra) gets the larger bound: pip must
    satisfy both. Requirements without a ``>=`` bound are left out (the caller reports them).
    """
    pins: dict[str, str] = {}
    for r in reqs:
        low = r.lower_bound
        if low is None:
            continue
        if r.key in pins and _version_key(pins[r.key]) >= _version_key(low):
            continue
        pins[r.key] = low
    return pins


def _version_key(v: str) -> tuple:
    """Order release versions numerically (1.10 > 1.9; 2 == 2.0); enough for lower bounds."""
    parts = [int(x) for x in re.findall(r"\d+", v.split("+")[0])]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def constraints_text(pins: dict[str, str]) -> str:
    """A pip constraints file: one ``name==version`` a line (no extras: pip forbids them)."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def same_version(installed: str, pinned: str) -> bool:
    return _version_key(installed) == _version_key(pinned)


# --- the environment ----------------------------------------------------------------------


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _env_for(venv: Path) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = str(_venv_python(venv).parent) + os.pathsep + env.get("PATH", "")
    return env


def installed_versions(python: Path, env: dict) -> dict[str, str]:
    """``{normalized name: version}`` of every distribution in that interpreter."""
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    return {re.sub(r"[-_.]+", "-", d["name"]).lower(): d["version"] for d in json.loads(out)}


def install_targets(reqs: list[Requirement], extras, without=()) -> list[str]:
    """pip's targets: ``-e .[extras]``, or, with packages left out, ``-e .`` and every other
    requirement of the extras as written (markers included).

    Raises ValueError naming a package of ``without`` that no chosen extra requires."""
    keys = {re.sub(r"[-_.]+", "-", w).lower() for w in without}
    in_extras = {r.key for r in reqs if r.source.startswith("extra ")}
    unknown = sorted(keys - in_extras)
    if unknown:
        raise ValueError(f"--without {unknown[0]!r}: not a requirement of the extras "
                         f"{', '.join(extras) or '(none)'}")
    if not keys:
        return ["-e", "." + (f"[{','.join(extras)}]" if extras else "")]
    kept = [r.text for r in reqs if r.source.startswith("extra ") and r.key not in keys]
    return ["-e", ".", *dict.fromkeys(kept)]


def build_env(venv: Path, base_python: str, pins: dict[str, str], targets) -> bool:
    """Create ``venv`` and install ``targets`` under the pins; False (said why) on failure."""
    env = _env_for(venv)
    step = [base_python, "-m", "venv", str(venv)]
    if subprocess.run(step).returncode != 0:
        print(f"error: could not create a virtual environment in {venv}", file=sys.stderr)
        return False
    constraints = venv / "min-constraints.txt"
    constraints.write_text(constraints_text(pins), encoding="utf-8")
    cmd = [
        str(_venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
        "-c", str(constraints), *(["--only-binary", ",".join(sorted(pins))] if pins else []),
        *targets,
    ]
    print("$", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0:
        print(f"error: pip could not install the requirements (exit {rc}); pins: "
              + (", ".join(f"{k}=={v}" for k, v in sorted(pins.items())) or "none"),
              file=sys.stderr)
        return False
    return True


# --- command line -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="check_min_versions.py",
        description="Install every dependency at its minimum version and run the tests.",
        epilog="Arguments after '--' go to pytest (default: -q -p no:cacheprovider).",
    )
    p.add_argument("--venv", type=Path, help="create (or reuse) the environment here and keep it")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the new environment (default: this one)")
    p.add_argument("--extras", default="test",
                   help="comma-separated extras whose bounds are pinned too (default: test)")
    p.add_argument("--newest", action="store_true",
                   help="pin nothing: the newest release of every package (as a user gets today)")
    p.add_argument("--without", default="", metavar="NAMES",
                   help="comma-separated packages of the extras to leave out (e.g. torch)")
    p.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml",
                   help=argparse.SUPPRESS)
    p.add_argument("--print-pins", action="store_true",
                   help="print the constraints file and stop (no install)")
    return p


def read_pyproject(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        return tomllib.load(f)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    pytest_args = argv[split + 1:] or list(DEFAULT_PYTEST_ARGS)
    args = _parser().parse_args(argv[:split])
    extras = tuple(e.strip() for e in args.extras.split(",") if e.strip())
    try:
        reqs = requirements(read_pyproject(args.pyproject), extras)
    except (OSError, ValueError) as exc:  # tomllib.TOMLDecodeError is a ValueError
        print(f"error: {args.pyproject}: {exc}", file=sys.stderr)
        return 2
    without = tuple(w.strip() for w in args.without.split(",") if w.strip())
    try:
        targets = install_targets(reqs, extras, without)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    left_out = {re.sub(r"[-_.]+", "-", w).lower() for w in without}
    pins = {} if args.newest else {
        k: v for k, v in min_pins(reqs).items() if k not in left_out
    }
    for r in reqs:
        if r.lower_bound is None:
            print(f"warning: {r.source}: {r.name} has no single '>=' bound; not pinned",
                  file=sys.stderr)
    if args.print_pins:
        print(constraints_text(pins) or "# no pins (--newest)\n", end="")
        return 0
    if args.venv is not None and args.venv.exists():
        if not args.venv.is_dir() or (
            not (args.venv / "pyvenv.cfg").is_file() and any(args.venv.iterdir())
        ):
            print(f"error: --venv {args.venv}: exists and is not a virtual environment "
                  "(give a new path or an existing venv)", file=sys.stderr)
            return 2

    t0 = time.perf_counter()
    tmp = None
    if args.venv is None:
        tmp = Path(tempfile.mkdtemp(prefix="numstab-minver-"))
        venv = tmp / "venv"
    else:
        venv = args.venv.resolve()
    try:
        print("pins:\n" + constraints_text(pins), end="", flush=True)
        if not build_env(venv, args.python, pins, targets):
            return INSTALL_FAILED
        python = _venv_python(venv)
        env = _env_for(venv)
        have = installed_versions(python, env)
        py = subprocess.run([str(python), "-c", "import sys; print(sys.version.split()[0])"],
                            capture_output=True, text=True, env=env).stdout.strip()
        print(f"installed (Python {py}):")
        wrong = []
        for name in sorted({r.key for r in reqs} - left_out):
            got, low = have.get(name, "missing"), pins.get(name)
            ok = got != "missing" and (low is None or same_version(got, low))
            wrong += [] if ok else [name]
            print(f"  {name}=={got}" + ("" if ok else f"   <- pinned {low}"))
        for name in sorted(left_out & set(have)):  # pulled in by another package
            print(f"  {name}=={have[name]}   (left out, installed as a dependency)")
        if wrong:
            print(f"error: not installed at the pinned version: {', '.join(wrong)}",
                  file=sys.stderr)
            return INSTALL_FAILED
        t1 = time.perf_counter()
        print(f"$ {python} -m pytest {' '.join(pytest_args)}", flush=True)
        rc = subprocess.run([str(python), "-m", "pytest", *pytest_args], cwd=ROOT, env=env)
        print(f"pytest exit {rc.returncode}; install {t1 - t0:.0f} s, "
              f"tests {time.perf_counter() - t1:.0f} s")
        return rc.returncode
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
