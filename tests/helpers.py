"""Helpers shared by several test modules (imported as ``from helpers import ...``)."""

from __future__ import annotations

import signal

from numstab.run.driver import StopFlag


class StopAfter(StopFlag):
    """A stop request (SIGTERM) at the ``n``-th step boundary, as if the signal had come."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __bool__(self):
        self.n -= 1
        if self.n < 0:
            self.signum = signal.SIGTERM
        return self.n < 0
