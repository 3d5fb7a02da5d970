"""MoE on 2 gloo ranks with DeepSpeed, as a user runs it (every balancing loss, capacity, the bias): a run
killed right after its step-10 checkpoint and resumed logs every number of the straight run bitwise, the aux-loss-free bias included (its selection
decides every later step)."""

from __future__ import annotations


import pytest
from train_helpers import records, run_train, run_until_checkpoint_then_kill

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

MOE = ("plugins=[{type: moe, num_experts: 4, top_k: 2, expert_intermediate_size: 32, num_shared_experts: 1, "
       "router: sigmoid, bias_update_rate: 0.01, z_loss_weight: 0.001, seq_aux_loss_weight: 0.001, "
       "global_aux_loss_weight: 0.01, capacity_factor: 1.5}]")
OVERRIDES = [MOE, "train.steps=20", "checkpoint.every=10", "eval.every=10", "logging.plot=true"]


def test_moe_resumes_bitwise_after_sigkill_bias_included(tmp_path) -> None:
    cache = tmp_path / "cache"
    straight = run_train(tmp_path / "straight", cache, OVERRIDES)
    assert straight.returncode == 0, straight.stdout[-3000:]
    run_until_checkpoint_then_kill(tmp_path / "resumed", cache, 10, OVERRIDES)
    resumed = run_train(tmp_path / "resumed", cache, OVERRIDES)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    want, got = records(tmp_path / "straight"), records(tmp_path / "resumed")
    assert want == got
    last = [r for r in want if "loss" in r][-1]
    assert {"moe/aux", "moe/seq_aux", "moe/global_aux", "moe/z", "moe/maxvio", "moe/maxvio/layer1", "moe/cv",
            "moe/entropy", "moe/dropped", "moe/maxvio_micro"} <= set(last)
    assert len(last["moe/load/layer0"]) == 4
    assert {"eval/moe/aux", "eval/moe/z"} <= set(want[-1])
    assert (tmp_path / "straight" / "moe_load.png").read_bytes()[:4] == b"\x89PNG"  # the heat map, at the end
