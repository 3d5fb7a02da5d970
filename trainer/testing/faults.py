"""Fault injection for the crash/resume tests, driven by the SLIMTRAIN_FAULT environment variable.

`SLIMTRAIN_FAULT="die_during_save@20,hang_after_save@10,nan_loss@5-8,slow_step@1-20"`: each item is a
fault point and the optimizer step(s) it fires at (`slow_*` sleeps half a second, so that a test can
signal a run in the middle; `disk_full_*` raises the OSError of a full disk on the last rank, as a write
there would). Unset (always, outside tests) it costs one dict lookup.
"""

from __future__ import annotations

import errno
import os
import sys
import time

ENV = "SLIMTRAIN_FAULT"


def _steps(spec: str) -> set[int]:
    lo, _, hi = spec.partition("-")
    return set(range(int(lo), int(hi or lo) + 1))


def fault_active(point: str, step: int) -> bool:
    """Whether `point` is armed for `step`."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    for item in spec.split(","):
        name, _, steps = item.strip().partition("@")
        if name == point and step in _steps(steps):
            return True
    return False


def maybe_fault(point: str, step: int, rank: int) -> None:
    """Crash (`die_*`), fail a write (`disk_full_*`) or hang (`hang_*`) here when armed; rank 0 only for crashes,
    the last rank for a failed write, all ranks hang."""
    if not fault_active(point, step):
        return
    if point.startswith("disk_full") and rank == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        print(f"[fault] {point} at step {step}: raising ENOSPC", file=sys.stderr, flush=True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if point.startswith("die") and rank == 0:
        print(f"[fault] {point} at step {step}: exiting", file=sys.stderr, flush=True)
        os._exit(137)
    if point.startswith("slow"):
        time.sleep(0.5)
    if point.startswith("hang"):
        print(f"[fault] {point} at step {step}: hanging", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)
