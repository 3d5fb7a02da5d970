"""backend.grad_accum_dtype: bf16 training sums its micro-batches' gradients in fp32 at ZeRO-2/3, also with
the optimizer offloaded (measured on the real DeepSpeed engine, ds_grad_accum.py on one gloo rank), and the
recipe refuses what DeepSpeed cannot do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from slimtrain.trainer.backends.deepspeed import ds_config
from slimtrain.trainer.recipe.schema import DeepSpeedConfig, OptimConfig, TrainConfig

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def errors() -> dict[tuple[int, str], float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(HERE / "ds_grad_accum.py")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {(r["stage"], r["grad_accum_dtype"], r["offload_optimizer"]): r["relative_error"] for r in rows}


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_gradients_of_64_micro_batches_are_summed_in_fp32(errors: dict, stage: int) -> None:
    # fp32 sum: only the rounding of the measurement itself is left. bf16 sum (DeepSpeed's default): each
    # addition rounds the running sum to 8 bits of mantissa.
    assert errors[(stage, "auto", False)] < 1e-5, errors
    assert errors[(stage, "bf16", False)] > 1e-3, errors


@pytest.mark.parametrize("stage", [2, 3])
def test_offloaded_optimizers_sum_every_micro_batch(errors: dict, stage: int) -> None:
    # With the optimizer in CPU memory, ZeRO-2/3 move gradients there during the backward pass and read
    # then whether the micro-batch ends the step; DeepSpeed alone told them one micro-batch late (0.76).
    assert errors[(stage, "auto", True)] < 1e-5, errors


@pytest.mark.parametrize("stage, precision, expected", [
    (0, "bf16", None), (1, "bf16", None), (2, "bf16", "fp32"), (3, "bf16", "fp32"), (2, "fp32", None),
])
def test_the_ds_config_asks_for_fp32_sums_where_auto_means_it(stage: int, precision: str, expected: str | None) -> None:
    cfg = DeepSpeedConfig(zero_stage=stage, precision=precision)
    conf = ds_config(cfg, TrainConfig(steps=1, global_batch_size=8, micro_batch_size=1), OptimConfig(), 1)
    assert (conf.get("data_types") or {}).get("grad_accum_dtype") == expected
    assert cfg.resolved_grad_accum_dtype() == ("bf16" if precision == "bf16" and stage < 2 else "fp32")


@pytest.mark.parametrize("settings, words", [
    (dict(zero_stage=1, grad_accum_dtype="fp32"), ["backend.grad_accum_dtype='fp32'", "zero_stage=2"]),
    (dict(zero_stage=0, grad_accum_dtype="fp32"), ["backend.zero_stage 2 or 3, got 0"]),
    (dict(precision="fp32", grad_accum_dtype="bf16"), ["backend.precision='bf16'"]),
    (dict(zero_stage=2, raw={"data_types": {"grad_accum_dtype": "fp32"}}), ["use backend.grad_accum_dtype"]),
])
def test_impossible_sums_are_refused_with_the_fix(settings: dict, words: list[str]) -> None:
    with pytest.raises(ValidationError) as info:
        DeepSpeedConfig(**settings)
    for word in words:
        assert word in str(info.value)


def test_bf16_sums_stay_available_to_save_memory() -> None:
    cfg = DeepSpeedConfig(zero_stage=3, grad_accum_dtype="bf16")
    conf = ds_config(cfg, TrainConfig(steps=1, global_batch_size=8, micro_batch_size=1), OptimConfig(), 1)
    assert "data_types" not in conf
