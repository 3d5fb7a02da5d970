"""A run's life in its run directory, on one rank: the final evaluation and checkpoint happen once, a finished
run is left alone, each job gets its own time limit, a fresh start keeps an earlier run's files, a changed model
or a run directory the ranks see differently stops the run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from train_helpers import REPO, TINY, _env, losses, run_train
from slimtrain.trainer.lifecycle.checkpoint import save_checkpoint
from slimtrain.trainer.errors import CheckpointError
from slimtrain.trainer.lifecycle.loop import Trainer

pytestmark = [pytest.mark.slow]

# `slimtrain train`, with every checkpoint save and evaluation printed (and the live prefetch threads after it).
TRACED = """
import sys, threading
import slimtrain.trainer.lifecycle.loop as L
save, evaluate = L.save_checkpoint, L.Trainer._evaluate
def traced_save(root, step, *a, **k):
    print(f"SAVE {step}", flush=True)
    return save(root, step, *a, **k)
def traced_evaluate(self, wandb):
    out = evaluate(self, wandb)
    alive = sum(t.name == "slimtrain-prefetch" for t in threading.enumerate())
    print(f"EVAL {self.state.step} {alive}", flush=True)
    return out
L.save_checkpoint, L.Trainer._evaluate = traced_save, traced_evaluate
from slimtrain.trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def traced_run(run_dir: Path, cache: Path, overrides: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    cmd = [sys.executable, "-c", TRACED, "train", str(TINY), "--nproc=1", f"run.output_dir={run_dir}",
           f"data.cache_dir={cache}", *overrides]
    proc = subprocess.run(cmd, env=_env(None), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    return proc, [line for line in proc.stdout.splitlines() if line.startswith(("SAVE ", "EVAL "))]


def test_the_end_is_evaluated_and_saved_once_and_a_finished_run_is_left_alone(tmp_path: Path, data_cache: Path) -> None:
    # eval.batches=1 cuts every pass over the validation split short: its prefetch thread must still end.
    overrides = ["train.steps=6", "checkpoint.every=2", "eval.every=2", "eval.batches=1"]
    proc, trace = traced_run(tmp_path, data_cache, overrides)
    assert proc.returncode == 0, proc.stdout
    assert trace == ["EVAL 2 1", "SAVE 2", "EVAL 4 1", "SAVE 4", "EVAL 6 1", "SAVE 6"]  # 1: the train loader's
    state = json.loads((tmp_path / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["finished"] and state["last_eval"]["eval_loss"] > 0
    metrics = (tmp_path / "metrics.jsonl").read_text()

    proc, trace = traced_run(tmp_path, data_cache, overrides)
    assert proc.returncode == 0, proc.stdout
    assert trace == [] and "finished already at step 6" in proc.stdout
    assert (tmp_path / "metrics.jsonl").read_text() == metrics

    proc, trace = traced_run(tmp_path, data_cache, ["train.steps=8", *overrides[1:]])  # train on past the end
    assert proc.returncode == 0, proc.stdout
    assert trace == ["EVAL 8 1", "SAVE 8"] and sorted(losses(tmp_path)) == list(range(1, 9))


def test_the_time_limit_is_each_jobs_own(tmp_path: Path, data_cache: Path) -> None:
    # Steps slowed to over half a second; 0.3 minutes = 18 s per job, start-up included.
    stops = []
    for _ in range(2):
        proc = run_train(tmp_path, data_cache, ["train.stop_after_minutes=0.3", "train.steps=200"], nproc=1,
                         fault="slow_step@1-200")
        assert proc.returncode == 0 and "(time)" in proc.stdout, proc.stdout
        stops.append(max(losses(tmp_path)))
    assert stops[0] >= 2 and stops[1] - stops[0] >= 2, stops  # not one step per resumed job


def test_a_fresh_start_moves_the_earlier_run_aside(tmp_path: Path, data_cache: Path) -> None:
    assert run_train(tmp_path, data_cache, ["train.steps=4", "checkpoint.every=2"], nproc=1).returncode == 0
    earlier = losses(tmp_path)
    proc = run_train(tmp_path, data_cache, ["train.steps=2", "checkpoint.resume=never"], nproc=1)
    assert proc.returncode == 0, proc.stdout
    assert "previous_1" in proc.stdout and sorted(losses(tmp_path)) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert losses(tmp_path / "previous_1") == earlier
    assert (tmp_path / "previous_1" / "checkpoints" / "step_00000004" / "manifest.json").is_file()


def test_a_resume_with_another_model_stops_before_launch(tmp_path: Path, data_cache: Path) -> None:
    assert run_train(tmp_path, data_cache, ["train.steps=2", "checkpoint.every=2"], nproc=1).returncode == 0
    proc = run_train(tmp_path, data_cache, ["train.steps=4", "model.hidden_size=32"], nproc=1)
    assert proc.returncode == 2, proc.stdout
    assert "model.hidden_size=64 there, 32 here" in proc.stdout and "Traceback" not in proc.stdout


class TwoRanks:
    """A backend whose all-reduce adds another rank's numbers (`other`) to this rank's."""

    rank, world_size = 0, 2

    def __init__(self, other: float) -> None:
        self.other = other
        self.sums = 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        self.sums += 1
        other = [self.other] if self.sums == 1 else [0.0]  # the other rank agrees with the sum it saw
        return [v + o for v, o in zip(values, other)]

    def barrier(self) -> None:
        pass

    def save(self, directory: Path) -> None:
        (directory / "ds").mkdir(parents=True, exist_ok=True)
        (directory / "ds" / "w.pt").write_bytes(b"w")


def test_ranks_that_see_different_checkpoints_stop(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 10, TwoRanks(0), {"step": 10}, "run: {}\n", keep=2)
    agree = SimpleNamespace(ckpt_root=tmp_path, backend=TwoRanks(10.0))
    assert Trainer._agreed_resume_point(agree).name == "step_00000010"
    node_local = SimpleNamespace(ckpt_root=tmp_path, backend=TwoRanks(-1.0))  # the other rank sees no checkpoint
    with pytest.raises(CheckpointError, match="every node shares"):
        Trainer._agreed_resume_point(node_local)


def test_resume_never_starts_over_once_not_on_every_requeue(tmp_path: Path, monkeypatch) -> None:
    from slimtrain.trainer.lifecycle.branch import check_fresh_start, resume_mode
    from slimtrain.trainer.recipe.schema import load_recipe
    from slimtrain.trainer.errors import RecipeError

    never = load_recipe(TINY, [f"run.output_dir={tmp_path}", "checkpoint.resume=never"])
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert resume_mode(never) == "never"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert resume_mode(never) == "never"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # preempted and requeued: go on from its checkpoint
    assert resume_mode(never) == "auto"
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    own = load_recipe(TINY, [f"run.output_dir={tmp_path}", "checkpoint.resume=never",
                             f"checkpoint.branch_from={tmp_path / 'checkpoints' / 'step_00000004'}"])
    with pytest.raises(RecipeError, match="inside this run's directory"):
        check_fresh_start(own)
    check_fresh_start(load_recipe(TINY, [f"run.output_dir={tmp_path / 'new'}", "checkpoint.resume=never",
                                         f"checkpoint.branch_from={tmp_path / 'checkpoints'}"]))


def test_a_ds_config_deepspeed_refuses_names_backend_raw(tmp_path: Path, data_cache: Path) -> None:
    proc = run_train(tmp_path, data_cache, ["backend.raw.zero_optimization.reduce_bucket_size=abc"], nproc=1)
    assert proc.returncode == 2, proc.stdout
    assert "reduce_bucket_size: got 'abc'" in proc.stdout and "fix that key under backend.raw" in proc.stdout
    assert "Traceback" not in proc.stdout
