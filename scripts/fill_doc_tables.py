#!/usr/bin/env python
"""Refresh the generated blocks of a markdown page from run outputs (never retyped).

Usage::

    python scripts/fill_doc_tables.py docs/reproduction.md [--runs runs/repro] [--only STEM ...]

A block is delimited by two HTML comments::

    <!-- BEGIN claims fig1-short -->
    ... replaced ...
    <!-- END claims fig1-short -->

``claims STEM`` takes ``<runs>/STEM/claims.md`` (written by ``scripts/reproduce.py``) without its
heading line; ``claims STEM/FILE.md`` takes that file instead (e.g. the
``claims-panels-b.md`` of a panel subset). ``file PATH`` takes a file relative to the
repository root verbatim, inside a fenced block. Everything outside the blocks is left as it
is. A block whose source is missing is an error naming the file (nothing is written).
``--only`` refreshes just the blocks with those arguments (e.g. ``fig16-full``: the runs of
one figure, where the other figures' run folders are not on this machine); the others are
left as they are.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"(?P<begin><!-- BEGIN (?P<kind>claims|file) (?P<arg>\S+) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- END (?P=kind) (?P=arg) -->)",
    re.DOTALL,
)


def block_text(kind: str, arg: str, runs: Path) -> str:
    if kind == "claims":
        src = runs / arg if arg.endswith(".md") else runs / arg / "claims.md"
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no claims (run scripts/reproduce.py for {arg} first)")
        lines = src.read_text().splitlines()
        if lines and lines[0].startswith("#"):
            lines = lines[1:]
        return "\n".join(lines).strip() + "\n"
    src = ROOT / arg
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    return "```\n" + src.read_text().rstrip() + "\n```\n"


def fill(text: str, runs: Path, only=None) -> tuple[str, int]:
    """``text`` with its blocks refreshed (those whose argument is in ``only``, if given) and
    how many were."""
    count = 0

    def sub(m: re.Match) -> str:
        nonlocal count
        if only is not None and m["arg"] not in only:
            return m[0]
        count += 1
        return m["begin"] + block_text(m["kind"], m["arg"], runs) + m["end"]

    return BLOCK.sub(sub, text), count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", type=Path, help="markdown page to refresh in place")
    p.add_argument(
        "--runs",
        type=Path,
        default=ROOT / "runs" / "repro",
        help="folder with one sub-folder per reproduced figure",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="ARG",
        help="refresh only the blocks with these arguments (e.g. fig16-full)",
    )
    args = p.parse_args(argv)
    try:
        new, n = fill(args.page.read_text(), args.runs, args.only)
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.only is not None and n == 0:
        print(f"error: no block named {' '.join(args.only)} in {args.page}", file=sys.stderr)
        return 2
    args.page.write_text(new)
    print(f"{args.page}: {n} block(s) refreshed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
