"""End to end on the local two-node cluster: `slimtrain launch slurm` trains recipes/tiny-cpu.yaml with
DeepSpeed over gloo across both nodes; a preempted job checkpoints, requeues, resumes, and matches an
uninterrupted run loss for loss."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_slurm_cluster import cluster_or_skip, job_info, read, wait_for_job

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
# A tiny-cpu step takes ~0.1 s here, start-up ~30 s: enough steps that the signal, sent once step
# SIGNAL_AFTER_STEP is logged, lands well before the end (a second or so to arrive, ~10 s to spare).
STEPS = 120
SIGNAL_AFTER_STEP = 10
CHECKPOINT_EVERY = 50
SLIMTRAIN = str(Path(sys.executable).with_name("slimtrain"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cluster_or_skip()
    # One data cache for both jobs: the first prepares the tokenizer and shards, the second reuses them.
    return tmp_path_factory.mktemp("slurm-training")


def launch(shared: Path, name: str, launcher: str) -> tuple[str, Path, Path]:
    """Submits tiny-cpu on 2 CPU nodes through the real CLI; returns (job id, run dir, log)."""
    run_dir = shared / name
    cmd = [
        SLIMTRAIN, "launch", "slurm", str(REPO / "recipes" / "tiny-cpu.yaml"),
        f"run.output_dir={run_dir}", f"train.steps={STEPS}", f"checkpoint.every={CHECKPOINT_EVERY}",
        f"data.cache_dir={shared / 'cache'}", "--nodes", "2", "--gpus-per-node", "0", "--env", "cpu",
        "--time", "10", "--job-name", name, "--launcher", launcher,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=shared)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"Submitted job (\d+)\n\s+log:\s+(\S+)", proc.stdout)
    assert m, proc.stdout
    return m.group(1), run_dir, Path(m.group(2))


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {rec["step"]: rec["loss"] for rec in lines if "loss" in rec and "step" in rec}


@pytest.fixture(scope="module")
def uninterrupted(shared: Path) -> tuple[str, Path, Path]:
    job_id, run_dir, log = launch(shared, "tiny-2n", "torchrun")
    info = wait_for_job(job_id, log, timeout=240)
    assert info["JobState"] == "COMPLETED", read(log)
    return job_id, run_dir, log


def test_two_node_training_writes_checkpoints(uninterrupted: tuple[str, Path, Path]) -> None:
    job_id, run_dir, log = uninterrupted
    info = job_info(job_id)
    assert (info["NumNodes"], info["NodeList"]) == ("2", "slimtrain-n[1-2]"), info
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1)), read(log)
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert (ckpts / f"step_{CHECKPOINT_EVERY:08d}").is_dir()
    final = ckpts / f"step_{STEPS:08d}"
    # Two ranks, one per node (one torchrun process each): each saved its RNG and its ZeRO shard.
    assert json.loads((final / "trainer_state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (final / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert len(list((final / "ds").glob("zero_pp_rank_*_optim_states.pt"))) == 2


def test_preempted_job_requeues_and_matches_the_uninterrupted_run(
    shared: Path, uninterrupted: tuple[str, Path, Path]
) -> None:
    # The other launcher (one task per rank, initialised from SLURM's variables): a different way to
    # start the same two ranks, which must not change a single loss.
    job_id, run_dir, log = launch(shared, "tiny-2n-preempted", "srun")
    deadline = time.monotonic() + 180
    while len(losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}) < SIGNAL_AFTER_STEP:
        if time.monotonic() > deadline or job_info(job_id).get("JobState") not in ("PENDING", "RUNNING"):
            subprocess.run(["scancel", job_id], timeout=30)
            pytest.fail(f"job {job_id} never reached step {SIGNAL_AFTER_STEP}:\n{read(log)}")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)

    info = wait_for_job(job_id, log, timeout=240)
    text = read(log)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), text
    # The console wraps long lines; the message is "resumed from <dir> at step N".
    resumed = re.search(r"resumed\s+from\s.*?at step (\d+)", text, flags=re.S)
    assert resumed and SIGNAL_AFTER_STEP <= int(resumed.group(1)) < STEPS, text
    assert "Traceback" not in text, text

    got, want = losses(run_dir), losses(uninterrupted[1])
    assert sorted(got) == list(range(1, STEPS + 1)), text
    # Exact: the resumed run sees the same batches, RNG and optimizer state (fp32, same world size).
    assert got == want


def test_job_resumed_on_one_node_continues_the_two_node_run(
    shared: Path, uninterrupted: tuple[str, Path, Path]
) -> None:
    # As if the 2-node job had been preempted after its first checkpoint and came back on one node.
    source = uninterrupted[1]
    run_dir = shared / "tiny-1n-resumed"
    ckpt = f"step_{CHECKPOINT_EVERY:08d}"
    shutil.copytree(source / "checkpoints" / ckpt, run_dir / "checkpoints" / ckpt)
    (run_dir / "checkpoints" / "latest").write_text(ckpt)
    shutil.copy(source / "metrics.jsonl", run_dir / "metrics.jsonl")
    proc = subprocess.run(
        [SLIMTRAIN, "launch", "slurm", str(REPO / "recipes" / "tiny-cpu.yaml"), f"run.output_dir={run_dir}",
         f"train.steps={STEPS}", f"checkpoint.every={CHECKPOINT_EVERY}", f"data.cache_dir={shared / 'cache'}",
         "--nodes", "1", "--gpus-per-node", "0", "--env", "cpu", "--time", "10", "--job-name", "tiny-1n"],
        capture_output=True, text=True, timeout=120, cwd=shared,
    )
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"Submitted job (\d+)\n\s+log:\s+(\S+)", proc.stdout)
    info = wait_for_job(m.group(1), Path(m.group(2)), timeout=240)
    text = read(Path(m.group(2)))
    assert info["JobState"] == "COMPLETED", text
    assert re.search(r"written\s+by\s+ZeRO-1/2\s+fp32\s+on\s+2\s+rank\(s\),\s+loading\s+into\s+ZeRO-1/2\s+fp32\s+on\s+1", text), text
    got, want = losses(run_dir), losses(source)
    assert sorted(got) == list(range(1, STEPS + 1)), text
    # One rank reduces the gradients in another order than two: equal to rounding.
    for step in range(CHECKPOINT_EVERY + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), (step, text)
    final = run_dir / "checkpoints" / f"step_{STEPS:08d}" / "ds"
    assert len(list(final.glob("zero_pp_rank_*_optim_states.pt"))) == 1
