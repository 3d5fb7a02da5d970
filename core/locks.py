"""Exclusive locks on a file with flock(2): held while the holder keeps the file open, freed by the kernel when
the holder exits, however it exits (SIGKILL included), so a lock left by a dead process is never stale.

A holder may remove the lock file when it is done (no empty lock files pile up): whoever was waiting on the
removed file then finds that the path names another file (or none) and locks that one instead.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def lock_file(path: Path, blocking: bool = True) -> int | None:
    """Open `path` (created if missing) and take an exclusive lock on it; returns the open descriptor (close it,
    or call `release`, to unlock), or None when another process holds it and `blocking` is False.

    Raises FileNotFoundError when the directory of `path` is gone, and OSError (ENOLCK, EOPNOTSUPP...) where the
    filesystem does not support flock.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the holder removed the file while we waited on it: lock the file the path names now


def release(fd: int, path: Path | None = None) -> None:
    """Unlock: remove `path` first when given (still locked, so no process can be waiting to take it), then close."""
    try:
        if path is not None and _same_file(fd, path):
            os.unlink(path)
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
