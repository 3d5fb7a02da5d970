"""Requeue a SLURM job that was asked to stop, so that it resumes from its last checkpoint by itself.

The path of a preemption or time-limit warning (see slurm/train.sbatch):

1. SLURM sends SIGUSR1 to the batch shell ``--signal=B:USR1@<lead>`` seconds before the end (or a user
   runs ``scancel --signal=USR1 --batch JOB``);
2. the batch shell forwards it to its ``srun`` step, which delivers it to every process of the step;
   torchrun's agents run with SIGUSR1 ignored (its default action would kill them and, with them,
   the workers), the trainer processes catch it;
3. every rank finishes its step and saves; rank 0 then calls :func:`requeue_job` and all exit 0;
4. the job is requeued under the same id; the new run finds ``latest`` and resumes.

Who requeues: ``scontrol requeue`` ends the running job at once (SIGTERM to every process), so called
from rank 0 it would cut short the other ranks' exit and torchrun's, and fill the log with their
tracebacks. Our batch script therefore names a request file (``SLIMTRAIN_REQUEUE_REQUEST``):
:func:`requeue_job` writes it, and the script requeues once the whole step has exited cleanly.
Without that variable (a job script of one's own) :func:`requeue_job` calls ``scontrol`` itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

# How long `scontrol requeue` may take: it only asks the controller, which answers at once or not at all.
REQUEUE_TIMEOUT_S = 30


def requeue_job(environ: Mapping[str, str] = os.environ) -> bool:
    """Asks for the current SLURM job to be queued again; returns whether the request was made.

    Does nothing (returns False) outside a SLURM job or when ``SLIMTRAIN_REQUEUE=0``. Under our batch
    script it writes ``$SLIMTRAIN_REQUEUE_REQUEST`` (the script requeues after the step); otherwise it
    runs ``scontrol requeue``, after which SLURM ends the job (SIGTERM, then SIGKILL after ``KillWait``):
    call it last, once the checkpoint is complete and the logs are flushed. A failure is reported on
    stderr, not raised: the checkpoint is safe, and a clean exit should not turn into a crash.
    """
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id or environ.get("SLIMTRAIN_REQUEUE", "1") == "0":
        return False
    request = environ.get("SLIMTRAIN_REQUEUE_REQUEST")
    if request:
        try:
            Path(request).write_text(f"{job_id}\n")
            return True
        except OSError as e:
            print(f"slimtrain: cannot write the requeue request {request} ({e}); asking SLURM directly", file=sys.stderr)
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
