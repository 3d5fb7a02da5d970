"""No rank outlives its launcher, however the launcher dies (SIGKILL included).

torchrun's agent starts every worker in a session of its own, so a kill of the launcher's process group
(`kill -9 -- -PID`, a closed terminal) reaches neither the workers nor their signal handlers; and a SIGKILL of
the launcher alone reaches nothing. Orphaned ranks would train on, writing metrics and checkpoints into a run
directory whose lock died with the launcher, racing a restart there. Two mechanisms end them:

- Linux: the kernel sends SIGKILL to a process whose parent dies (prctl PR_SET_PDEATHSIG). `slimtrain train
  --nproc N` starts torchrun's agent through `python -m slimtrain.trainer.env.lifeline`, which sets it before
  running the agent; every rank sets it too (its parent: that agent, a torchrun agent of a SLURM job, or
  slurmstepd under `srun`, where SLURM also ends the whole step).
- everywhere (macOS too): a daemon thread in every rank checks once a second that its parent, and the launcher
  named by SLIMTRAIN_LAUNCHER_PID, still run, and SIGKILLs its own process when one is gone.

SIGKILL, not SIGTERM: SIGTERM asks a rank to save a checkpoint first (lifecycle.signals), which an orphan must
not do; the last complete checkpoint stays `latest` and a restart resumes from it.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import runpy
import signal
import sys
import threading
from pathlib import Path

LAUNCHER_PID = "SLIMTRAIN_LAUNCHER_PID"
"""Environment variable naming the `slimtrain train` process that started the local ranks (and holds the run
directory's lock for them)."""
_PR_SET_PDEATHSIG = 1
POLL_S = 1.0


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere nothing); exits at once when
    `parent` is already gone (it may have died before the request was made)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            print(f"slimtrain: prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); "
                  "relying on the watchdog thread", file=sys.stderr)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def tie_rank_to_launcher() -> None:
    """In a rank started by a launcher: end this process with its parent and with the `slimtrain train` that
    started it (SLIMTRAIN_LAUNCHER_PID), by both mechanisms of this module."""
    parent = os.getppid()
    die_with_parent(parent)
    launcher = int(os.environ.get(LAUNCHER_PID) or 0) or None

    done = threading.Event()

    def watch() -> None:
        while os.getppid() == parent and (launcher is None or alive(launcher)):
            if done.wait(POLL_S):
                return  # the rank is exiting on its own
        print("slimtrain: the launcher of this rank is gone; ending the rank", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="slimtrain-lifeline", daemon=True)
    thread.start()

    def stop() -> None:
        # End the thread before the interpreter finalizes: a daemon thread still waiting then is stopped from
        # under it, which is suspected of the rare C++ abort seen once at a rank's exit.
        done.set()
        thread.join(timeout=2 * POLL_S)

    atexit.register(stop)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process took the number: ours is gone
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(pid, 0) found it
    return state not in ("Z", "X")


def agent_command(module_args: list[str]) -> list[str]:
    """The command that runs `python -m <module_args...>` (torchrun's agent) tied to this process."""
    return [sys.executable, "-m", "slimtrain.trainer.env.lifeline", str(os.getpid()), *module_args]


def main(argv: list[str]) -> None:
    """`python -m slimtrain.trainer.env.lifeline PARENT_PID MODULE ARGS...`: run MODULE as `python -m` would,
    dying with PARENT_PID."""
    parent, module, *args = argv
    die_with_parent(int(parent))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
