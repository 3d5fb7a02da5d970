"""One writer per run directory: the process that drives a run holds `RUN_DIR/.lock` for the run's life.

That process is `slimtrain train` itself when it starts the ranks (they end with it, env/lifeline.py), else
rank 0 (under torchrun or srun). The lock is flock(2) on the file, which records the holder's host and pid:
a second run on the same directory is refused naming them, and a lock left by a run that died (SIGKILL, a
node lost) is free, since the kernel drops a lock with its holder, and is taken over.

Cluster filesystems: flock between nodes works on NFS (v4, or v3 with lockd), GPFS, BeeGFS, and Lustre
mounted with `-o flock`; Lustre's `localflock` (and some FUSE filesystems) only see locks of the same node,
so two runs started on different nodes are not refused there. Where flock is not supported at all, the run
goes on with a warning. After a node failure an NFS server may keep the dead holder's lock for its lease
time (about 90 s): a job SLURM requeued waits that long for it before refusing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from slimtrain.core.locks import lock_file, release
from slimtrain.trainer.errors import RecipeError, SlimtrainError

LOCK = ".lock"
REQUEUE_WAIT_S = 120.0
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
"""What flock fails with on a filesystem that does not support it."""


class RunDirectoryBusy(SlimtrainError):
    """Another live run holds the run directory."""


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold `run_dir`'s lock for the body (waiting up to `wait_s` for it); RunDirectoryBusy when another process
    holds it. A run directory this call made is removed again if it holds nothing but the lock at the end:
    a start that failed leaves no run directory behind."""
    run_dir = Path(run_dir).absolute()
    made = _outermost_missing(run_dir)
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, wait_s)
    except OSError as exc:
        raise RecipeError(f"run.output_dir={str(run_dir)!r} cannot be written ({exc}); choose a directory this "
                          "user can write") from None
    try:
        if fd is not None:
            since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            os.ftruncate(fd, 0)
            os.write(fd, f"host={socket.gethostname()} pid={os.getpid()} since={since}\n".encode())
        yield
    finally:
        if fd is not None:
            release(fd, path)
        if made is not None:
            _remove_empty(run_dir, made)


def _outermost_missing(path: Path) -> Path | None:
    """The outermost of `path` and its parents that does not exist (what mkdir -p makes), None if it exists."""
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _remove_empty(path: Path, top: Path) -> None:
    """Remove `path` and its parents up to `top` while they are empty."""
    while True:
        try:
            path.rmdir()
        except OSError:  # not empty: the run wrote something
            return
        if path == top:
            return
        path = path.parent


def _acquire(path: Path, wait_s: float) -> int | None:
    """The locked descriptor of `path`, or None where the filesystem has no flock (with a warning)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = lock_file(path, blocking=False)
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                raise
            print(f"slimtrain: warning: cannot lock {path} ({exc}); this filesystem does not support flock, so a "
                  "second run started on this run directory would not be refused", file=sys.stderr)
            return None
        if fd is not None:
            return fd
        if time.monotonic() >= deadline:
            raise RunDirectoryBusy(_busy_message(path))
        time.sleep(1.0)


def _busy_message(path: Path) -> str:
    try:
        holder = path.read_text(encoding="utf-8").strip()
    except OSError:
        holder = ""
    fields = dict(item.split("=", 1) for item in holder.split() if "=" in item)
    who = (f"pid {fields['pid']} on host {fields['host']}, since {fields.get('since', '?')}"
           if "pid" in fields and "host" in fields else "a process that has not yet written its name")
    return (f"run.output_dir={str(path.parent)!r} is in use by another run ({who}); one run writes a run directory "
            "at a time. Wait for that run to end (or stop it), or set another run.output_dir. The lock "
            f"{path} frees itself when its holder ends")


def wait_for_requeue() -> float:
    """How long to wait for the lock: a job SLURM requeued may find its dead predecessor's lock still held by
    an NFS server for the lease time; a fresh start is refused at once."""
    return REQUEUE_WAIT_S if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 else 0.0
