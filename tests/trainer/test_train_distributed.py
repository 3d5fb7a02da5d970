"""End-to-end training on 2 gloo ranks: ZeRO stages agree, accumulation is exact, resume is bitwise, and a
checkpoint resumes on another number of ranks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from train_helpers import grad_norms, losses, run_and_signal, run_train, run_until_checkpoint_then_kill

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[int, dict[int, float]]:
    """Uninterrupted 20-step runs at ZeRO-2 and ZeRO-3 (the references for the resume tests)."""
    out = {}
    for stage in (2, 3):
        run_dir = tmp_path_factory.mktemp(f"straight-z{stage}")
        proc = run_train(run_dir, data_cache, [f"backend.zero_stage={stage}"])
        assert proc.returncode == 0, proc.stdout
        out[stage] = losses(run_dir)
    return out


def test_straight_run_learns_and_checkpoints(straight: dict, tmp_path: Path, data_cache: Path) -> None:
    curve = straight[2]
    assert sorted(curve) == list(range(1, 21))
    assert curve[20] < curve[1] - 0.5, f"loss did not fall: {curve}"


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_after_sigkill_is_bitwise_exact(stage: int, straight: dict, tmp_path: Path, data_cache: Path) -> None:
    run_until_checkpoint_then_kill(tmp_path, data_cache, 10, [f"backend.zero_stage={stage}"])
    proc = run_train(tmp_path, data_cache, [f"backend.zero_stage={stage}"])
    assert proc.returncode == 0, proc.stdout
    assert "resumed" in proc.stdout
    resumed = losses(tmp_path)
    assert resumed == straight[stage]  # every step, bitwise (fp32)


def test_sigterm_saves_exits_cleanly_and_resumes_exactly(straight: dict, tmp_path: Path, data_cache: Path) -> None:
    import signal

    proc = run_and_signal(tmp_path, data_cache, signal.SIGTERM, after_step=3)
    assert proc.returncode == 0, proc.stdout
    assert "stopped at step" in proc.stdout and "(terminated)" in proc.stdout
    stopped = max(losses(tmp_path))
    assert 3 <= stopped < 20
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    proc = run_train(tmp_path, data_cache)
    assert proc.returncode == 0, proc.stdout
    assert losses(tmp_path) == straight[2]


def test_kill_during_save_keeps_previous_checkpoint(straight: dict, tmp_path: Path, data_cache: Path) -> None:
    proc = run_train(tmp_path, data_cache, ["checkpoint.every=10"], fault="die_during_save@20")
    assert proc.returncode != 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000010"
    assert (ckpts / "step_00000020.tmp").exists() and not (ckpts / "step_00000020").exists()
    proc = run_train(tmp_path, data_cache)
    assert proc.returncode == 0, proc.stdout
    assert losses(tmp_path) == straight[2]


def test_resume_on_fewer_ranks_reshards_zero2(straight: dict, tmp_path: Path, data_cache: Path) -> None:
    """2 ranks to step 10, SIGKILL, resume on 1 rank: DeepSpeed's universal checkpoint moves the optimizer
    shards, and steps 11-20 equal the 2-rank run's to rounding (reduction order; here within 1e-6)."""
    run_until_checkpoint_then_kill(tmp_path, data_cache, 10)
    step10 = tmp_path / "checkpoints" / "step_00000010"
    before = sorted(p.name for p in (step10 / "ds").iterdir())
    refused = run_train(tmp_path, data_cache, ["backend.zero_stage=3"], nproc=1)
    assert refused.returncode != 0
    assert "written by ZeRO-1/2 fp32 on 2 rank(s) and this run uses ZeRO-3 fp32 on 1 rank(s)" in refused.stdout
    assert "Resume with backend.zero_stage=1 or 2" in refused.stdout
    proc = run_train(tmp_path, data_cache, nproc=1)
    assert proc.returncode == 0, proc.stdout
    assert "resharding step_00000010: written by ZeRO-1/2 fp32 on 2 rank(s), loading into ZeRO-1/2 fp32 on 1 " \
        "rank(s)" in proc.stdout
    assert sorted(p.name for p in (step10 / "ds").iterdir()) == before and not (step10 / ".reshard").exists()
    resumed = losses(tmp_path)
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(straight[2][step], rel=1e-6, abs=0), step
    assert len(list((tmp_path / "checkpoints" / "step_00000020" / "ds").glob("*optim_states.pt"))) == 1


def test_resume_on_more_ranks_reshards_zero3(straight: dict, tmp_path: Path, data_cache: Path) -> None:
    """1 rank to step 10, SIGKILL, resume on 2 ranks at ZeRO-3. DeepSpeed's ZeRO-3 universal load gives
    all parameter groups the first group's hyperparameters and one shared Adam step tensor; both are
    undone, so the run matches the 2-rank ZeRO-3 run (the no-decay group would otherwise decay, and the
    step count would advance twice per step)."""
    overrides = ["backend.zero_stage=3"]
    run_until_checkpoint_then_kill(tmp_path, data_cache, 10, overrides, nproc=1)
    proc = run_train(tmp_path, data_cache, overrides, nproc=2)
    assert proc.returncode == 0, proc.stdout
    assert "written by ZeRO-3 fp32 on 1 rank(s), loading into ZeRO-3 fp32 on 2 rank(s)" in proc.stdout
    assert not (tmp_path / "checkpoints" / "step_00000010" / ".reshard").exists()
    resumed = losses(tmp_path)
    for step in range(1, 21):
        assert resumed[step] == pytest.approx(straight[3][step], rel=1e-6, abs=0), step


def test_zero_stages_agree(straight: dict, tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> None:
    curves, norms = {2: straight[2], 3: straight[3]}, {}
    for stage in (0, 1):
        run_dir = tmp_path_factory.mktemp(f"z{stage}")
        proc = run_train(run_dir, data_cache, [f"backend.zero_stage={stage}"])
        assert proc.returncode == 0, proc.stdout
        curves[stage], norms[stage] = losses(run_dir), grad_norms(run_dir)
    # ZeRO-0 in fp32 steps our optimizer unwrapped (DeepSpeed keeps no norm there): we take it ourselves.
    for step in range(1, 21):
        assert norms[0][step] == pytest.approx(norms[1][step], rel=1e-4), step
    # ZeRO changes only where gradients are reduced and optimizer state lives: fp32 results agree
    # to rounding (reduction order), here within 1e-5 relative over all 20 steps.
    for stage in (0, 1, 3):
        for step in range(1, 21):
            assert curves[stage][step] == pytest.approx(curves[2][step], rel=1e-5), (stage, step)


def test_offloaded_optimizer_trains_the_same(straight: dict, tmp_path: Path, data_cache: Path) -> None:
    """`backend.offload_optimizer` as a recipe sets it (DeepSpeed refuses a client optimizer with offloading
    unless the generated ds_config says otherwise): our fused AdamW steps the fp32 partitions in CPU memory."""
    proc = run_train(tmp_path, data_cache, ["backend.zero_stage=2", "backend.offload_optimizer=true"])
    assert proc.returncode == 0, proc.stdout
    curve = losses(tmp_path)
    for step in range(1, 21):
        assert curve[step] == pytest.approx(straight[2][step], rel=1e-5), step


def test_compiled_blocks_with_activation_checkpointing_train_the_same(straight: dict, tmp_path: Path,
                                                                      data_cache: Path) -> None:
    proc = run_train(tmp_path, data_cache, ["train.compile=true", "train.activation_checkpointing=true"])
    assert proc.returncode == 0, proc.stdout
    curve = losses(tmp_path)
    # Recomputation is exact; compilation fuses element-wise work, which rounds differently in the last bits.
    for step in range(1, 21):
        assert curve[step] == pytest.approx(straight[2][step], rel=1e-4), step


def test_zero3_with_activation_checkpointing_and_chunked_loss_trains_the_same(straight: dict, tmp_path: Path,
                                                                            data_cache: Path) -> None:
    """The 8B recipe's memory settings: ZeRO-3 gathers the head in its hooks once per loss chunk and again
    when the backward recomputes it."""
    proc = run_train(tmp_path, data_cache, ["backend.zero_stage=3", "train.activation_checkpointing=true",
                                            "train.loss_chunk_tokens=48"])
    assert proc.returncode == 0, proc.stdout
    curve = losses(tmp_path)
    for step in range(1, 21):  # the chunks' fp32 partial sums add up in another order
        assert curve[step] == pytest.approx(straight[3][step], rel=1e-5), step


def test_gradient_accumulation_equals_larger_micro_batch(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> None:
    curves = []
    for micro in (1, 4):
        run_dir = tmp_path_factory.mktemp(f"mb{micro}")
        proc = run_train(run_dir, data_cache, [f"train.micro_batch_size={micro}", "train.steps=8"])
        assert proc.returncode == 0, proc.stdout
        curves.append(losses(run_dir))
    for step in range(1, 9):
        assert curves[0][step] == pytest.approx(curves[1][step], rel=1e-5), step


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path: Path, data_cache: Path) -> None:
    # Step 2 alone is NaN: skipped and counted, training goes on. Steps 4-6 are NaN: three in a row stop it.
    proc = run_train(tmp_path, data_cache, ["train.steps=8", "train.max_nonfinite_steps=3"], fault="nan_loss@2,nan_loss@4-8")
    assert proc.returncode != 0
    assert "3 steps in a row had a non-finite loss" in proc.stdout
    import json

    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [r["skipped"] for r in records] == [False, True, False, True, True]  # step 6 stopped the run
    assert all(math.isfinite(r["loss"]) for r in (records[0], records[2]))  # the skip did not poison the weights


def test_bad_geometry_fails_before_any_process_starts(tmp_path: Path, data_cache: Path) -> None:
    proc = run_train(tmp_path, data_cache, ["train.global_batch_size=6", "train.micro_batch_size=4"])
    assert proc.returncode == 2
    assert "train.global_batch_size=6 is not divisible" in proc.stdout
    assert not (tmp_path / "metrics.jsonl").exists() and "torch.distributed.run" not in proc.stdout


def test_compiled_run_resumes_bitwise(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> None:
    # The compiled graphs recompile for evaluation (no grad) and for the short last loss chunk (2 x 64 tokens
    # in chunks of 48); the resumed run compiles them afresh and must still compute every step bit for bit.
    compiled = ["train.compile=true", "train.loss_chunk_tokens=48", "eval.every=3", "train.steps=14",
                "checkpoint.every=7"]
    straight_dir, resumed_dir = tmp_path_factory.mktemp("compiled-straight"), tmp_path_factory.mktemp("compiled-resumed")
    proc = run_train(straight_dir, data_cache, compiled)
    assert proc.returncode == 0, proc.stdout
    run_until_checkpoint_then_kill(resumed_dir, data_cache, 7, compiled)
    proc = run_train(resumed_dir, data_cache, compiled)
    assert proc.returncode == 0, proc.stdout
    assert "resumed" in proc.stdout
    assert losses(resumed_dir) == losses(straight_dir)  # every step, bitwise (fp32)
