"""``numstab`` / ``python -m numstab``: one command with the subcommands compare, train, sweep.

``numstab compare ...`` is ``python -m numstab.compare ...`` (and likewise for train and
sweep); each subcommand has its own ``--help`` and ``--version``.
"""

from __future__ import annotations

import importlib
import sys

import numstab

__all__ = ["COMMANDS", "main"]

#: Subcommand -> (module whose ``main(argv)`` runs it, one-line description).
COMMANDS = {
    "compare": ("numstab.cli.compare", "train a format beside a reference and audit it (main job)"),
    "train": ("numstab.cli.train", "train one run and log its metrics"),
    "sweep": ("numstab.cli.sweep", "run a grid of runs from a SPEC file, or collect its tables"),
}

USAGE = "usage: numstab {compare,train,sweep} [options]   (numstab COMMAND --help for each)"


def _help() -> str:
    rows = "\n".join(f"  {name:8s} {what}" for name, (_, what) in COMMANDS.items())
    return f"{USAGE}\n\nnumstab {numstab.__version__}: commands\n{rows}\n"


def main(argv=None) -> int:
    """Dispatch to a subcommand; returns its exit code (2 for an unknown one)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        sys.stderr.write(f"numstab: error: a command is required\n{USAGE}\n")
        return 2
    head = argv[0]
    if head in ("-h", "--help"):
        sys.stdout.write(_help())
        return 0
    if head == "--version":
        print(f"numstab {numstab.__version__}")
        return 0
    if head not in COMMANDS:
        sys.stderr.write(
            f"numstab: error: unknown command {head!r}; valid: {', '.join(COMMANDS)}\n"
        )
        return 2
    # Imported on demand: each subcommand pulls in only what it needs (sweep: Dask, if used).
    module = importlib.import_module(COMMANDS[head][0])
    return module.main(argv[1:])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
