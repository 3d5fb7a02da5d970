"""On the local two-node cluster (slurm/local-cluster.sh up): jobs span both nodes, SIGUSR1 reaches the
trainer processes through the batch script, and a requeued job comes back by itself.

The trainer here is a stand-in program that behaves like `slimtrain train` towards SLURM (rendezvous,
signal handling, requeue) without training; test_slurm_training.py runs the real one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slimtrain.trainer.launch.slurm import SlurmLaunch, render_script, submit

pytestmark = pytest.mark.slurm

# A job that outlives this fails the test (after being cancelled), rather than hanging CI.
JOB_TIMEOUT_S = 150
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def cluster_or_skip() -> None:
    """Skip without a cluster on a workstation; under CI a missing cluster is a failure."""
    why = None
    if shutil.which("sinfo") is None:
        why = "sinfo not found: start the local cluster with `bash slurm/local-cluster.sh up`"
    else:
        proc = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix,alloc", "-o", "%N"],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0 or len(set(proc.stdout.split())) < 2:
            said = (proc.stdout.strip() or proc.stderr.strip() or "no output").splitlines()[-1]
            why = f"the local cluster is not up (sinfo: {said}): run `bash slurm/local-cluster.sh up`"
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the cluster must be up: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module", autouse=True)
def _cluster() -> None:
    cluster_or_skip()


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    fields: dict[str, str] = {}
    for word in out.stdout.split():
        key, _, value = word.partition("=")
        fields.setdefault(key, value)
    return fields


def wait_for_job(job_id: str, log: Path, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
    """Polls until the job has ended (requeues included); returns its final record."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=30)
    pytest.fail(f"job {job_id} still {job_info(job_id).get('JobState')} after {timeout} s; log:\n{read(log)}")


def wait_for_files(paths: list[Path], job_id: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline or job_info(job_id).get("JobState") in TERMINAL:
            subprocess.run(["scancel", job_id], timeout=30)
            missing = [p.name for p in paths if not p.exists()]
            pytest.fail(f"job {job_id}: {missing} never appeared; log:\n{read(log)}")
        time.sleep(0.5)


def read(path: Path) -> str:
    return path.read_text() if path.exists() else f"<no {path}>"


def test_a_step_spans_both_nodes() -> None:
    out = subprocess.run(
        ["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c", "echo $SLURMD_NODENAME $SLURM_PROCID"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert sorted(out.split("\n")[:2]) == ["slimtrain-n1 0", "slimtrain-n2 1"]


# Behaves like `slimtrain train` towards SLURM: forms a 2-process gloo group from the launcher's
# variables, catches SIGUSR1 and, on the first run, "checkpoints", has rank 0 requeue the job and
# exits 0; on the requeued run it records that it resumed.
STAND_IN = textwrap.dedent(
    """\
    #!{python}
    import os, signal, socket, sys, time
    import torch, torch.distributed as dist
    from slimtrain.trainer.env.distributed import export_dist_env, resolve_dist_env
    from slimtrain.trainer.lifecycle.preemption import requeue_job, restart_count

    out = sys.argv[-1].split("=", 1)[1]
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    env = export_dist_env(resolve_dist_env())
    dist.init_process_group("gloo")
    total = torch.tensor([env.rank + 1])
    dist.all_reduce(total)
    run = restart_count()
    tag = f"run{{run}}-rank{{env.rank}}"
    with open(f"{{out}}/start-{{tag}}", "w") as f:
        f.write(f"{{os.environ['SLURMD_NODENAME']}} {{env.source}} {{env.world_size}} {{int(total)}}")
    if run == 0:
        deadline = time.time() + 60
        while not got and time.time() < deadline:
            time.sleep(0.1)
        flag = torch.tensor([len(got)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank stops at the same "step"
        open(f"{{out}}/usr1-{{tag}}", "w").write(str(got))
        dist.barrier()  # the "checkpoint" is complete on every rank before the requeue
        dist.destroy_process_group()
        if env.rank == 0 and got:
            requeue_job()
    else:
        dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_usr1_checkpoints_requeues_and_resumes(tmp_path: Path, launcher: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Launcher variables left in the submitting shell travel with sbatch; the job must ignore them.
    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="stale-host", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    program = tmp_path / "slimtrain-stand-in"
    program.write_text(STAND_IN.format(python=sys.executable))
    program.chmod(0o755)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# not read by the stand-in\n")
    opts = SlurmLaunch(
        recipe=recipe, overrides=(f"out={tmp_path}",), nodes=2, gpus_per_node=0, launcher=launcher,  # type: ignore[arg-type]
        env="cpu", time="00:10:00", job_name=f"usr1-{launcher}", log_dir=tmp_path / "logs",
        workdir=tmp_path, slimtrain=str(program),
    )
    job = submit(opts, render_script(opts))
    wait_for_files([tmp_path / "start-run0-rank0", tmp_path / "start-run0-rank1"], job.job_id, job.log)

    subprocess.run(["scancel", "--signal=USR1", "--batch", job.job_id], check=True, timeout=30)
    info = wait_for_job(job.job_id, job.log)
    log = read(job.log)

    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log
    for rank in (0, 1):
        # Each rank caught the signal itself (not killed by it), and ran again after the requeue.
        assert read(tmp_path / f"usr1-run0-rank{rank}") == "[10]", log
        assert (tmp_path / f"start-run1-rank{rank}").exists(), log
    starts = [read(tmp_path / f"start-run0-rank{r}").split() for r in (0, 1)]
    assert sorted(s[0] for s in starts) == ["slimtrain-n1", "slimtrain-n2"], "one process per node"
    expected_source = "torchrun" if launcher == "torchrun" else "slurm"
    assert all(s[1:] == [expected_source, "2", "3"] for s in starts), starts  # 1 + 2 summed over 2 ranks
    assert "SIGUSR1" in log and "requeueing job" in log and "run 2," in log, log
    # The requeue waits for the step to end: no process is killed on its way out.
    assert "Traceback" not in log and "*** STEP" not in log, log
    assert not list((tmp_path / "logs").glob(".requeue-*")), "the requeue request is consumed"
