"""Every ```python block of every docs/*.md page (and of README.md) runs on its own.

A reader pastes one block into a fresh interpreter, so each block runs alone, in a fresh
``python`` process, with its own imports; its ``assert`` statements are the checks. A block
that leans on an earlier one fails here with a NameError. Blocks that are not meant to run
(shell sessions, output) are fenced as something other than ``python``.

A block that imports an optional dependency (``OPTIONAL``: torch, JAX, ...) that is not
installed is skipped, naming it; numstab's own dependencies are never skipped.

Each block runs in a new temporary directory, so whatever it writes lands there. The pages are
written to run anywhere numstab is installed (bundled SPECs are loaded by name); a page that
must read repository files by relative path names their folders in ``LINKED``, and the
temporary directory holds a link to each.
The code is compiled with the page's path and padded to its line numbers, so a traceback
points into the Markdown. Blocks run in parallel (``WORKERS`` processes), once per session,
only those selected.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]
LINKED = ()  # repository folders the pages read by relative path (none today)
WORKERS = 2
#: Top-level modules of the optional extras (pyproject.toml): a block importing one that is
#: not installed is skipped (a reader without torch cannot run a torch example either).
OPTIONAL = frozenset({"torch", "jax", "jaxlib", "matplotlib", "dask", "distributed", "sklearn",
                      "cupy", "numba"})
TIMEOUT_S = 300  # a hung block fails; the slowest (docs/sweep.md's) takes ~5 s on an idle core

# Runs the code read from stdin as a script (``__main__``), compiled as ``argv[1]``, line
# ``argv[2]``: the interpreter a reader starts, plus line numbers that point into the page.
RUNNER = (
    "import sys; src = sys.stdin.read(); "
    "exec(compile('\\n' * (int(sys.argv[2]) - 1) + src, sys.argv[1], 'exec'), "
    "{'__name__': '__main__', '__builtins__': __builtins__})"
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def _blocks() -> list[tuple[Path, int, int, str]]:
    """(page, index, first line, code) of every block of every page."""
    out = []
    for page in PAGES:
        for i, (line, code) in enumerate(python_blocks(page.read_text(encoding="utf-8"))):
            out.append((page, i, line, code))
    return out


BLOCKS = _blocks()


def optional_imports(code: str, optional=OPTIONAL) -> set[str]:
    """The modules of ``optional`` that ``code`` imports (anywhere in it)."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & optional


def missing_optional(code: str, optional=OPTIONAL) -> list[str]:
    """The modules of ``optional`` that ``code`` imports and that are not installed here."""
    found = optional_imports(code, optional)
    return sorted(m for m in found if importlib.util.find_spec(m) is None)


def _block_id(block) -> str:
    page, i, line, _ = block
    return f"{page.name}:{i}:L{line}"


def run_block(block, workdir: Path) -> dict:
    """Run one block alone in a fresh interpreter with cwd ``workdir``; rc, output, seconds."""
    page, _, line, code = block
    workdir.mkdir(parents=True)
    for name in LINKED:
        os.symlink(ROOT / name, workdir / name, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MPLBACKEND"] = "Agg"  # a block that plots must not need a display
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, str(page), str(line)],
            input=code, capture_output=True, text=True, cwd=workdir, env=env,
            timeout=TIMEOUT_S,
        )
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = None, f"timed out after {TIMEOUT_S} s\n{exc.stdout or ''}{exc.stderr or ''}"
    return {"rc": rc, "output": out, "seconds": time.perf_counter() - t0}


@pytest.fixture(scope="module")
def block_results(request, tmp_path_factory):
    """Every selected block, run once, in parallel: ``{block id: result}``."""
    selected = [
        item.callspec.params["block"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_block_runs_alone"
        and not missing_optional(item.callspec.params["block"][3])
    ]
    base = tmp_path_factory.mktemp("doc-blocks")
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {
            _block_id(b): pool.submit(run_block, b, base / f"{n:02d}") for n, b in
            enumerate(selected)
        }
        return {k: f.result() for k, f in futures.items()}


def test_block_extraction():
    text = "intro\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "b = a + 1\n")]


def test_optional_imports_are_found_wherever_they_are():
    code = (
        "import numpy as np, torch.nn\n"
        "from numstab.audit import absorbed\n"
        "def f():\n    from jax import numpy as jnp\n"
        "from . import matplotlib\n"  # relative: not the package
    )
    assert optional_imports(code) == {"torch", "jax"}
    # an optional module that no machine has, beside an installed one (numpy): only it skips
    extra = {"numpy", "numstab_absent_extra"}
    block = "import numpy\nimport numstab_absent_extra.sub\n"
    assert missing_optional(block, extra) == ["numstab_absent_extra"]
    assert missing_optional(block) == []  # neither is optional: such a block runs (and fails)


def test_formats_page_exists_and_has_examples():
    page = DOCS / "formats.md"
    assert page in PAGES
    assert len(python_blocks(page.read_text(encoding="utf-8"))) >= 5


def test_a_block_that_leans_on_another_fails(tmp_path):
    """The isolation is real: a name defined by an earlier block is not there."""
    page = DOCS / "api.md"
    first = (page, 0, 1, "import numpy as np\nvalue = np.float32(1)\n")
    second = (page, 1, 7, "assert value == 1\n")
    assert run_block(first, tmp_path / "a")["rc"] == 0
    res = run_block(second, tmp_path / "b")
    assert res["rc"] != 0 and "NameError: name 'value'" in res["output"], res["output"]
    assert f'File "{page}", line 7' in res["output"], res["output"]  # points into the page


def test_blocks_run_in_a_scratch_directory(tmp_path):
    """Files a block writes land in its own directory; the linked folders are readable."""
    code = (
        "from pathlib import Path\n"
        "Path('written.txt').write_text('x')\n"
        f"assert all(Path(n).is_dir() for n in {LINKED!r})\n"
    )
    res = run_block((DOCS / "api.md", 0, 1, code), tmp_path / "w")
    assert res["rc"] == 0, res["output"]
    assert (tmp_path / "w" / "written.txt").read_text() == "x"
    assert not (ROOT / "written.txt").exists()


@pytest.mark.parametrize("block", BLOCKS, ids=[_block_id(b) for b in BLOCKS])
def test_block_runs_alone(block, block_results):
    missing = missing_optional(block[3])
    if missing:
        pytest.skip(f"{_block_id(block)} needs {', '.join(missing)} (not installed)")
    res = block_results[_block_id(block)]
    assert res["rc"] == 0, f"{_block_id(block)} failed (exit {res['rc']}):\n{res['output']}"
