"""Atomic file writes: a temporary file beside the target, fsync, rename, fsync the folder.

A reader never sees a half-written file: either the previous version or the new one. Used for
every output numstab writes whole (summaries, checkpoints, collected tables).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_open", "fsync_dir", "write_text"]


def fsync_dir(path) -> None:
    """fsync a directory so that a rename inside it survives a crash (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """Open a temporary file beside ``path`` for writing (``"w"`` text or ``"wb"`` binary).

    On normal exit the file is flushed, fsynced, given mode 0644 and renamed over ``path``, and
    the folder is fsynced; on an exception the temporary file is removed and ``path`` is left
    as it was. An ``OSError`` (disk full, file too large) names ``path``, not the temporary.
    The temporary's name is ``.tmp-XXXXXXXX-<name of path>`` (removed by
    :func:`numstab.run.outdir.claim` if a kill leaves it behind).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        os.fchmod(fd, 0o644)
        kw = {"newline": "", "encoding": "utf-8"} if mode == "w" else {}
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, tmp):
            # Writes through a descriptor carry no file name (or the temporary's).
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise
    fsync_dir(d)


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(text)
