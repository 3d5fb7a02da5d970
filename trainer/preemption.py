"""Requeue a SLURM job that was asked to stop, so that it resumes from its last checkpoint by itself.

The path of a preemption or time-limit warning (see slurm/train.sbatch):

1. SLURM sends SIGUSR1 to the batch shell ``--signal=B:USR1@<lead>`` seconds before the end (or a user
   runs ``scancel --signal=USR1 --batch JOB``);
2. the batch shell forwards it to its ``srun`` step, which delivers it to every process of the step;
   torchrun's agents run with SIGUSR1 ignored (its default action would kill them and, with them,
   the workers), the trainer processes catch it;
3. every rank finishes its step and saves; rank 0 then calls :func:`requeue_job` and all exit 0;
4. SLURM ends the job and queues it again under the same id; the new run finds ``latest`` and resumes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping

# How long `scontrol requeue` may take: it only asks the controller, which answers at once or not at all.
REQUEUE_TIMEOUT_S = 30


def requeue_job(environ: Mapping[str, str] = os.environ) -> bool:
    """Puts the current SLURM job back in the queue; returns whether SLURM accepted.

    Does nothing (returns False) outside a SLURM job or when ``SLIMTRAIN_REQUEUE=0``. SLURM ends the
    running job right after this call (SIGTERM, then SIGKILL after ``KillWait``), so call it last,
    once the checkpoint is complete and the logs are flushed. A failure is reported on stderr, not
    raised: the checkpoint is already safe, and the caller's clean exit should not turn into a crash.
    """
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id or environ.get("SLIMTRAIN_REQUEUE", "1") == "0":
        return False
    # An array task's SLURM_JOB_ID is its own id, so this requeues just that task.
    scontrol = shutil.which("scontrol", path=environ.get("PATH"))
    if scontrol is None:
        return _warn(job_id, "scontrol is not on PATH")
    try:
        proc = subprocess.run(
            [scontrol, "requeue", job_id], capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return _warn(job_id, str(e))
    if proc.returncode != 0:
        return _warn(job_id, proc.stderr.strip() or f"exit status {proc.returncode}")
    return True


def _warn(job_id: str, why: str) -> bool:
    print(
        f"slimtrain: could not requeue SLURM job {job_id} ({why}); the checkpoint is saved: resubmit the "
        f"same job to resume from it (requeue needs sbatch --requeue and JobRequeue=1)",
        file=sys.stderr,
    )
    return False


def restart_count(environ: Mapping[str, str] = os.environ) -> int:
    """How many times SLURM has requeued this job (0 on its first run); for logs."""
    try:
        return int(environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0
