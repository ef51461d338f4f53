"""``python -m numstab.train``: the train command (:mod:`numstab.cli.train`).

Importing names from here is deprecated (kept for one release): the training loop and its
configuration are :mod:`numstab.run`.
"""

import sys

from numstab._deprecated import forward_module
from numstab.cli.train import main

__all__ = ["main"]

__getattr__ = forward_module("numstab.train", "numstab.run")

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
