"""The compressor on 2 gloo ranks with DeepSpeed, as a user runs it: a frozen-decoder branch from a dense
checkpoint trains the encoder and projector only (the decoder bitwise as it was), logs the gap metrics at every
evaluation, and resumes bitwise after SIGKILL."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

from train_helpers import records, run_train, run_until_checkpoint_then_kill  # noqa: E402

from slimtrain.trainer.lifecycle.branch import source_weights  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BLOCK = ("{type: compressor, decoder: frozen, encoder: {source: truncate, layers: 1}, pooling_factor: 4, "
         "context_tokens: 16, continuation_tokens: 16, min_context_tokens: 4, lr_scale: 2.0, eval_exact_match: 2}")


def test_frozen_decoder_branch_trains_the_compressor_and_resumes_bitwise(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dense = run_train(tmp_path / "dense", cache, ["train.steps=10", "checkpoint.every=10"])
    assert dense.returncode == 0, dense.stdout[-3000:]
    source = tmp_path / "dense" / "checkpoints" / "step_00000010"
    branch = [f"plugins=[{BLOCK}]", f"checkpoint.branch_from={source}", "train.steps=20", "checkpoint.every=5",
              "eval.every=5"]
    straight = run_train(tmp_path / "straight", cache, branch)
    assert straight.returncode == 0, straight.stdout[-3000:]
    run_until_checkpoint_then_kill(tmp_path / "resumed", cache, 15, branch)
    resumed = run_train(tmp_path / "resumed", cache, branch)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    want = records(tmp_path / "straight")
    assert want == records(tmp_path / "resumed")

    before = source_weights(source)
    after = source_weights(tmp_path / "straight" / "checkpoints" / "step_00000020")
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # the decoder: bitwise as the dense run left it
    encoder = {n: t for n, t in after.items() if n.startswith("compressor.")}
    assert encoder and not any(n in before for n in encoder)
    # The truncated encoder started as the decoder's first layer and trained away from it.
    moved = (encoder["compressor.encoder.layers.0.attn.q_proj.weight"] - before["layers.0.attn.q_proj.weight"]).abs()
    assert 0 < float(moved.max()) < float(before["layers.0.attn.q_proj.weight"].abs().max())

    last = [r for r in want if "eval/compressor/gap_closed" in r][-1]
    for key in ("loss_none", "loss_full", "loss_comp", "loss_zeroed", "loss_shuffled", "rec_acc", "rec_exact",
                "ppl_comp"):
        assert f"eval/compressor/{key}" in last, sorted(last)
    assert last["eval/compressor/loss_full"] < last["eval/compressor/loss_none"]  # the context helps the decoder
    assert math.isfinite(last["eval/compressor/gap_closed"])
