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
the one whose workers spin. No numba or torch import here.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["OPENMP_LIBRARIES", "Team", "of_torch"]

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
