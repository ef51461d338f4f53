"""Every ```python block of every docs/*.md page runs.

The blocks of one page share a namespace and run in order (a page reads top to bottom); their
``assert`` statements are the checks. They run from the repository root, as the pages assume
(relative paths such as ``analysis/specs/...``). Code is compiled with the page's file name and
padded to its line numbers, so a traceback points into the Markdown.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
PAGES = sorted(DOCS.glob("*.md"))


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def test_block_extraction():
    text = "intro\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "b = a + 1\n")]


def test_formats_page_exists_and_has_examples():
    page = DOCS / "formats.md"
    assert page in PAGES
    assert len(python_blocks(page.read_text(encoding="utf-8"))) >= 5


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": f"docs.{page.stem}"}
    for line, code in python_blocks(page.read_text(encoding="utf-8")):
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)
