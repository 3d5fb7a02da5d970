"""Sequence parallelism (DeepSpeed-Ulysses, `backend.sequence_parallel`) on 2 gloo ranks: the sharded model equals
one process (logits, loss, gradients) on packed rows whose documents cross the slice boundary; training gives one
rank's losses step by step at ZeRO-0, 1, 2 and at ZeRO-3 with activation checkpointing; SIGKILL and resume is bitwise;
bad layouts are refused naming the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.recipe.schema import DeepSpeedConfig, load_recipe
from train_helpers import REPO, TINY, losses, run_train, run_until_checkpoint_then_kill

HERE = Path(__file__).resolve().parent
SP = ["backend.sequence_parallel=2"]


def test_the_sharded_model_equals_one_process() -> None:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           str(HERE / "sp_parity.py")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["slice"] == [2, 24, 97]  # each rank computed half the sequence, never whole-sequence logits
    assert result["logits"] <= 1e-5 and result["loss"] <= 1e-6 and result["grads"] <= 1e-5


@pytest.mark.slow
def test_training_matches_one_rank_and_resumes_bitwise(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    steps = ["train.steps=6", "checkpoint.every=3", "eval.every=3"]
    one = run_train(tmp_path / "one", cache, steps, nproc=1)
    assert one.returncode == 0, one.stdout[-3000:]
    reference = losses(tmp_path / "one")
    layouts = (("zero2", []), ("zero0", ["backend.zero_stage=0"]), ("zero1", ["backend.zero_stage=1"]),
               ("zero3", ["backend.zero_stage=3", "train.activation_checkpointing=true"]))
    for name, extra in layouts:
        run = run_train(tmp_path / name, cache, steps + SP + extra, nproc=2)
        assert run.returncode == 0, run.stdout[-3000:]
        got = losses(tmp_path / name)
        assert got.keys() == reference.keys()
        assert max(abs(got[s] - reference[s]) for s in got) <= 1e-5, (name, got, reference)
    run_until_checkpoint_then_kill(tmp_path / "killed", cache, 3, steps + SP, nproc=2)
    resumed = run_train(tmp_path / "killed", cache, steps + SP, nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed" in resumed.stdout
    assert losses(tmp_path / "killed") == losses(tmp_path / "zero2")  # every step, bitwise (fp32)


@pytest.mark.parametrize("overrides, message", [
    (["model.num_kv_heads=1"], "backend.sequence_parallel=2 must divide model.num_kv_heads=1"),
    (["data.seq_len=63"], "backend.sequence_parallel=2 must divide data.seq_len=63"),
    (["plugins=[{type: draft, heads: [{kind: medusa, num_heads: 2}]}]"], "'draft' cannot run with "
                                                                          "backend.sequence_parallel=2"),
    (["backend.expert_parallel_size=2"], "the two do not compose on this backend yet"),
    (["data.packer=buckets", "data.seq_len=64", "data.buckets.min_len=1"],
     "backend.sequence_parallel=2 must divide data.buckets.min_len=1"),
])
def test_bad_layouts_are_refused_naming_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=__import__("re").escape(message)):
        load_recipe(TINY, SP + overrides)


def test_a_world_the_groups_do_not_tile_is_refused() -> None:
    with pytest.raises(RecipeError, match="backend.sequence_parallel=2 does not divide the world size 3"):
        DeepSpeedConfig(sequence_parallel=2).data_parallel_size(3)
    assert DeepSpeedConfig(sequence_parallel=2).data_parallel_size(4) == 2


def test_the_memory_estimate_counts_one_slice_of_each_row() -> None:
    from slimtrain.trainer.env.memory import estimate

    whole = estimate(load_recipe(TINY, ["model.vocab_size=512"]), 2, 512)
    sliced = estimate(load_recipe(TINY, SP + ["model.vocab_size=512"]), 2, 512)
    assert sliced.activations == pytest.approx(whole.activations / 2)
    assert sliced.logits == pytest.approx(whole.logits / 2)
