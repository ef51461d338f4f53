"""scripts/fill_doc_tables.py copies generated tables into a page between markers, only there."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "fill_doc_tables", ROOT / "scripts" / "fill_doc_tables.py"
)
fdt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fdt)

PAGE = """# Title

prose before
<!-- BEGIN claims figX-short -->
stale table
<!-- END claims figX-short -->
prose after
"""


def _runs(tmp_path, body="| a | b |\n|---|---|\n| 1 | 2 |\n"):
    d = tmp_path / "runs" / "figX-short"
    d.mkdir(parents=True)
    (d / "claims.md").write_text("## Fig. X heading (budget short)\n\n" + body)
    return tmp_path / "runs"


def test_block_is_replaced_and_the_rest_kept(tmp_path):
    runs = _runs(tmp_path)
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert fdt.main([str(page), "--runs", str(runs)]) == 0
    text = page.read_text()
    assert "stale table" not in text and "| 1 | 2 |" in text
    assert "Fig. X heading" not in text  # the claims file's own heading is dropped
    assert text.startswith("# Title\n\nprose before\n<!-- BEGIN claims figX-short -->\n")
    assert text.endswith("<!-- END claims figX-short -->\nprose after\n")
    # Idempotent: a second fill changes nothing.
    assert fdt.main([str(page), "--runs", str(runs)]) == 0
    assert page.read_text() == text


def test_missing_source_is_an_error_and_writes_nothing(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert fdt.main([str(page), "--runs", str(tmp_path / "nowhere")]) == 2
    assert "figX-short" in capsys.readouterr().err
    assert page.read_text() == PAGE


def test_file_block_is_fenced(tmp_path):
    text, n = fdt.fill(
        "<!-- BEGIN file README.md -->\nold\n<!-- END file README.md -->\n", tmp_path
    )
    assert n == 1 and text.startswith("<!-- BEGIN file README.md -->\n```\n# numstab\n")


@pytest.mark.parametrize(
    "marker", ["<!-- BEGIN claims a -->\nx\n<!-- END claims b -->\n", "no markers\n"]
)
def test_unmatched_or_absent_markers_are_left_alone(tmp_path, marker):
    assert fdt.fill(marker, tmp_path) == (marker, 0)


def test_claims_block_can_name_a_file(tmp_path):
    runs = _runs(tmp_path)
    (runs / "figX-short" / "claims-panels-b.md").write_text("## head\n\n| b only |\n")
    marker = "claims figX-short/claims-panels-b.md -->\n"
    text, n = fdt.fill(f"<!-- BEGIN {marker}<!-- END {marker}", runs)
    assert n == 1 and "| b only |" in text and "| 1 | 2 |" not in text


def test_only_refreshes_the_named_blocks(tmp_path, capsys):
    """``--only`` fills the named block from its runs and leaves another, whose runs are not
    there (an error without ``--only``), as it was; a name matching no block is an error."""
    runs = _runs(tmp_path)
    other = "<!-- BEGIN claims figY-full -->\nkept table\n<!-- END claims figY-full -->\n"
    page = tmp_path / "page.md"
    page.write_text(PAGE + other)
    assert fdt.main([str(page), "--runs", str(runs)]) == 2
    assert fdt.main([str(page), "--runs", str(runs), "--only", "figX-short"]) == 0
    text = page.read_text()
    assert "| 1 | 2 |" in text and "stale table" not in text and "kept table" in text
    capsys.readouterr()
    assert fdt.main([str(page), "--runs", str(runs), "--only", "figZ"]) == 2
    assert "figZ" in capsys.readouterr().err and page.read_text() == text
