"""Elementwise passes on a thread pool over blocks of elements.

NumPy's ufuncs release the GIL, so contiguous blocks of one array can be computed on several
cores at once. Only passes where every element's result depends on that element alone are
split (the correctly rounded ``exp``/``log`` of :mod:`numstab.elementary`), and the blocks
are put back in order: the results are the same bits at every thread count
(``tests/test_parallel.py`` compares 1 and 2 threads).

The thread count is explicit: :func:`using` sets it for a block of code (``Run.advance``
sets its run's ``elementwise_threads``; None there means the BLAS thread count in effect,
read through threadpoolctl), and 1 (no pool) is the default outside.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

import threadpoolctl

__all__ = ["blas_limit", "blas_threads", "map_blocks", "team", "threads", "using"]

_THREADS: ContextVar[int] = ContextVar("numstab_elementwise_threads", default=1)
_TEAM: ContextVar = ContextVar("numstab_openmp_team", default=None)
_POOLS: dict[int, ThreadPoolExecutor] = {}
_BLAS: list = []  # the threadpoolctl controllers of the BLAS libraries, looked up once


def threads() -> int:
    """The elementwise thread count in effect (1 outside :func:`using`)."""
    return _THREADS.get()


def _blas_controllers() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded at the first call."""
    if not _BLAS:
        _BLAS.append(threadpoolctl.ThreadpoolController().select(user_api="blas"))
    return _BLAS[0].lib_controllers


def blas_threads() -> int:
    """The thread count of NumPy's BLAS now (the largest over the BLAS libraries loaded)."""
    return max((c.num_threads for c in _blas_controllers()), default=1)


@contextmanager
def blas_limit(n: int) -> Iterator[None]:
    """NumPy's BLAS on at most ``n`` threads in this block (each library above ``n`` set to
    it, then restored): threadpoolctl's ``limit`` without its bookkeeping, for a block
    entered every training step (the monitor's)."""
    libs = [(c, c.num_threads) for c in _blas_controllers()]
    libs = [(c, k) for c, k in libs if k > n]
    for c, _ in libs:
        c.set_num_threads(n)
    try:
        yield
    finally:
        for c, k in libs:
            c.set_num_threads(k)


def team():
    """The OpenMP team set by :func:`using` for this block (:class:`numstab.ompteam.Team`),
    or None: numstab's own pool."""
    return _TEAM.get()


@contextmanager
def using(n: int | None, team=None) -> Iterator[int]:
    """Run elementwise passes on ``n`` threads in this block (None: :func:`blas_threads`).

    ``team``: an OpenMP team (:func:`numstab.ompteam.of_torch`) on which the compiled
    kernels that can (the fused softmax's, :mod:`numstab.teamkernels`) run their blocks,
    instead of numstab's pool; the results are the same bits."""
    n = blas_threads() if n is None else int(n)
    if n < 1:
        raise ValueError(f"elementwise threads must be >= 1, got {n}")
    tokens = _THREADS.set(n), _TEAM.set(team)
    try:
        yield n
    finally:
        _TEAM.reset(tokens[1])
        _THREADS.reset(tokens[0])


def _pool(n: int) -> ThreadPoolExecutor:
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="numstab-elementwise")
    return _POOLS[n]


def map_blocks(fn: Callable[[int, int], object], n_items: int, quantum: int) -> list:
    """``[fn(start, stop), ...]`` over contiguous blocks covering ``range(n_items)``, in
    order; on :func:`threads` threads when there are at least two quanta per thread.

    Block boundaries are multiples of ``quantum``; each call runs in a copy of the caller's
    context (its workspace, its scopes). ``fn`` must write disjoint parts of its outputs.
    """
    n = threads()
    per = -(-n_items // max(n, 1))
    per = -(-per // quantum) * quantum
    if n <= 1 or n_items < 2 * quantum * n:
        return [fn(0, n_items)]
    bounds = [(s, min(s + per, n_items)) for s in range(0, n_items, per)]
    pool = _pool(n)
    futures = [pool.submit(contextvars.copy_context().run, fn, a, b) for a, b in bounds[1:]]
    first = fn(*bounds[0])  # the calling thread takes the first block
    return [first, *(f.result() for f in futures)]
