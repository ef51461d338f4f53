"""The OpenMP team of the framework in the process: compiled kernels run on its threads.

PyTorch's CPU wheels run their parallel regions on an OpenMP team (libgomp on Linux). Between
regions its worker threads spin, waiting for the next one: on a 2-core machine with torch on
both cores, the second core stays busy for milliseconds after each of torch's regions. A
thread of numstab's own started then shares that core with the spinning worker, and a kernel
split over it measured no faster (docs/monitor.md). Handed to the team itself, as the body of
a parallel region of the same OpenMP runtime (``GOMP_parallel``, the entry point compiled
``#pragma omp parallel`` regions call), the blocks run on the worker that holds the core.

:func:`of_torch` finds torch's OpenMP runtime when one is loaded; :meth:`Team.run` runs a
region's body (a C function of one pointer: :mod:`numstab.teamkernels` compiles them) on
``threads`` of its threads, the calling thread among them. A team is called from the thread
that runs torch's own operations (the main thread of a training loop): that thread's team is
the one whose workers spin. Once they sleep (torch idle for a few milliseconds) a region must
wake them, and that costs more than it saves here: :class:`Trial` times both ways and keeps
the faster. No numba or torch import here.
"""

from __future__ import annotations

import ctypes
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["OPENMP_LIBRARIES", "RETRIAL_EVERY", "TRIAL_CALLS", "Team", "Trial", "of_torch"]

#: File names of the OpenMP runtimes whose ``GOMP_parallel`` is looked for (GNU's; LLVM's and
#: Intel's export the same entry point).
OPENMP_LIBRARIES = re.compile(r"lib(gomp|omp|iomp5)[-.\w]*\.(so[.\d]*|dylib)$")

_FOUND: dict = {}  # "torch": the Team of torch's runtime, or None; looked up once per process


@dataclass(frozen=True)
class Team:
    """An OpenMP runtime loaded in the process, at ``path``.

    :meth:`run` calls its ``GOMP_parallel(body, data, threads, 0)``: ``body(data)`` runs on
    ``threads`` threads of the calling thread's team (created by the runtime the first time,
    then reused: torch's workers, when called from the thread torch's regions start from) and
    returns when all have finished. ctypes releases the GIL for the call; the body must not
    need it (a numba ``cfunc`` in nopython mode).
    """

    path: str
    _parallel: object = field(repr=False, compare=False)

    def run(self, body: int, data: np.ndarray, threads: int) -> None:
        """Run the C function at address ``body`` with ``data``'s address as its argument, on
        ``threads`` threads at once (``data`` must stay alive, and is, for the call)."""
        self._parallel(body, data.ctypes.data, int(threads), 0)


def _open(path: str) -> Team | None:
    """The :class:`Team` of the runtime at ``path`` if the process has already loaded it (it
    is not loaded here) and it exports ``GOMP_parallel``, else None."""
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
        fn = lib.GOMP_parallel
    except (OSError, AttributeError):
        return None
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    return Team(path, fn)


def _loaded_runtimes() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux's ``/proc/self/maps``;
    empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split(None, 5)[-1] for line in maps.splitlines() if line.count(" ") >= 5}
    return sorted(p for p in paths if OPENMP_LIBRARIES.search(os.path.basename(p)))


def of_torch() -> Team | None:
    """The OpenMP team torch's CPU operations run on, or None: torch not imported, its
    parallel backend not OpenMP, or its runtime not found among the loaded libraries (the one
    in torch's own folders, else the only one loaded)."""
    if "torch" in _FOUND:
        return _FOUND["torch"]
    torch = sys.modules.get("torch")
    if torch is None:
        return None  # not remembered: torch may be imported later
    team = None
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        root = Path(torch.__file__).resolve().parent
        dirs = (root, root.parent / "torch.libs")  # the wheel's lib/ and auditwheel's folder
        loaded = _loaded_runtimes()
        own = [p for p in loaded if any(Path(p).resolve().is_relative_to(d) for d in dirs)]
        own = own or [
            str(p) for d in (root / "lib", dirs[1]) if d.is_dir()
            for p in sorted(d.iterdir()) if OPENMP_LIBRARIES.search(p.name)
        ]  # fmt: skip
        candidates = own if own else loaded if len(loaded) == 1 else []
        for path in candidates:
            team = _open(path)
            if team is not None:
                break
    _FOUND["torch"] = team
    return team


#: :class:`Trial`: timed calls each way per trial, and calls from one trial to the next.
TRIAL_CALLS = 8
RETRIAL_EVERY = 1000


class Trial:
    """Whether a repeated piece of work runs faster on the team or on the calling thread
    alone, decided by timing both (the results are the same bits either way).

    A region that had to wake the team's sleeping workers took 3.6-7 ms on a 2-core virtual
    machine where the same work took 2-2.3 ms on one thread, and 1.1 ms on the team right
    after torch's own work (the monitor's late batch metrics, docs/monitor.md). Call ``k`` of
    every ``every`` (counted from 0): 0 is not timed (it may compile), 1 to ``2 calls``
    alternate (odd: on the team) and are timed, then the way with the lower median is used
    until the next trial.
    """

    def __init__(self, calls: int = TRIAL_CALLS, every: int = RETRIAL_EVERY):
        if calls < 1 or every <= 2 * calls:
            raise ValueError(f"need calls >= 1 and every > 2 * calls, got {calls}, {every}")
        self.calls, self.every = calls, every
        self.count = self.team_calls = 0
        self.on_team = True
        self._times: tuple[list, list] = ([], [])  # alone, on the team

    def _trying(self) -> int:
        """The call's place in the trial (1 to 2 calls), or 0 outside it."""
        k = self.count % self.every
        return k if 1 <= k <= 2 * self.calls else 0

    def choose(self) -> bool:
        """Whether the next call runs on the team."""
        k = self._trying()
        return k % 2 == 1 if k else self.on_team

    def record(self, on_team: bool, seconds: float) -> None:
        """The call's way and duration (every call, in order)."""
        k = self._trying()
        self.count += 1
        self.team_calls += bool(on_team)
        if k:
            self._times[bool(on_team)].append(seconds)
            if k == 2 * self.calls:
                alone, team = (statistics.median(t) for t in self._times)
                self.on_team = team < alone
                self._times = ([], [])
