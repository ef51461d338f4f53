"""Claiming an output directory: one writer at a time, checked before anything is written.

A command that writes into a directory first *claims* it with :func:`claim`:

1. to resume, the directory and its checkpoint manifest must already exist; otherwise the
   claim is refused before anything is created;
2. an exclusive ``fcntl.flock`` on ``DIR/.numstab.lock`` is taken without waiting; while the
   claim is held a second writer is refused (:class:`DirectoryBusy`);
3. under the lock, the directory is checked writable and the files a killed writer can leave
   behind are removed: temporaries of atomic writes (``.tmp-*``), of the writability check
   (``.write-test-*``) and of the plot (``*.tmp.png``), and arrays files of checkpoints that the
   manifest does not name.

The lock file stays (empty) when the claim is released: deleting it would let a writer that
opened it before the deletion and one that creates it afresh hold two different locks. Where
``fcntl`` is missing (not POSIX) there is no lock.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import tempfile
from dataclasses import dataclass, field

from numstab.run.checkpoint import MANIFEST, unreferenced_arrays_files

__all__ = [
    "LOCK_NAME",
    "TEMPORARY_PATTERNS",
    "Claim",
    "DirectoryBusy",
    "OutDirError",
    "claim",
    "remove_leftovers",
    "scope",
]

LOCK_NAME = ".numstab.lock"
#: Names only a writer that was killed mid-write leaves in an output directory.
TEMPORARY_PATTERNS = (".tmp-*", ".write-test-*", "*.tmp.png")


class OutDirError(Exception):
    """An output directory that cannot be used (the message says why)."""


class DirectoryBusy(OutDirError):
    """Another process holds the directory's lock."""


@dataclass
class Claim:
    """A claimed output directory; :meth:`release` (or leaving a ``with`` block) unlocks it.

    ``removed`` lists the leftovers of killed writers that the claim deleted.
    """

    path: str
    removed: tuple[str, ...] = ()
    _fd: int | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


# Claims made inside each active `scope()` block (innermost last): released when it ends.
_SCOPES: list[list[Claim]] = []


@contextlib.contextmanager
def scope():
    """Within the block, every :func:`claim` is released when the block ends (even on error).

    A command's entry point runs in a scope, so that the directory it claimed deep inside
    option handling is unlocked when it returns, also when it is called in-process.
    """
    held: list[Claim] = []
    _SCOPES.append(held)
    try:
        yield held
    finally:
        _SCOPES.remove(held)
        for c in reversed(held):
            c.release()


def claim(
    path,
    *,
    resume: bool = False,
    lock_name: str = LOCK_NAME,
    holder: str = "numstab process",
) -> Claim:
    """Claim ``path`` for writing: check it, lock it, remove what killed writers left.

    Parameters
    ----------
    path : path
        The output directory; created (with parents) unless ``resume``.
    resume : bool
        The directory must exist and hold a checkpoint manifest; nothing is created when it
        does not.
    lock_name, holder : str
        The lock file's name, and who holds it in the refusal message.

    Returns
    -------
    Claim
        Released by the innermost active :func:`scope`, or by the caller.

    Raises
    ------
    DirectoryBusy
        ``another {holder} is writing to {path!r}``.
    OutDirError
        A missing directory or checkpoint for ``resume``; a directory that cannot be created
        or written (the OS's reason).
    """
    path = os.fspath(path)
    if resume:
        if not os.path.isdir(path):
            raise OutDirError(f"{path!r} is not a directory (nothing to resume)")
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise OutDirError(f"{path!r} holds no checkpoint ({MANIFEST} is missing)")
    try:
        if not resume:
            os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, lock_name), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutDirError(f"{path!r} cannot be written: {exc.strerror or exc}") from None
    c = Claim(path=path, _fd=fd)
    try:
        _lock(fd, path, holder)
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise OutDirError(f"{path!r} cannot be written: {exc.strerror or exc}") from None
        c.removed = remove_leftovers(path)
    except BaseException:
        c.release()
        raise
    if _SCOPES:
        _SCOPES[-1].append(c)
    return c


def _lock(fd: int, path: str, holder: str) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DirectoryBusy(f"another {holder} is writing to {path!r}") from None


def remove_leftovers(path: str) -> tuple[str, ...]:
    """Delete the leftovers of killed writers in ``path`` (temporaries, checkpoint arrays
    files the manifest does not name); return their names. Only for a folder no one else
    writes to (its writer holds the claim)."""
    names = [
        e.name
        for e in os.scandir(path)
        if not e.is_dir(follow_symlinks=False)
        and any(fnmatch.fnmatchcase(e.name, p) for p in TEMPORARY_PATTERNS)
    ]
    names += unreferenced_arrays_files(path)
    removed = []
    for name in sorted(set(names)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(path, name))
            removed.append(name)
    return tuple(removed)
