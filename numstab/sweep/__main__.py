"""``python -m numstab.sweep``: the sweep command (:mod:`numstab.cli.sweep`)."""

import sys

from numstab.cli.sweep import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
