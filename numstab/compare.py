"""``python -m numstab.compare``: the compare command (:mod:`numstab.cli.compare`).

Importing other names from here is deprecated (kept for one release): use
:mod:`numstab.cli.compare`.
"""

import sys

from numstab._deprecated import forward_module
from numstab.cli.compare import main

__all__ = ["main"]

__getattr__ = forward_module("numstab.compare", "numstab.cli.compare")

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
