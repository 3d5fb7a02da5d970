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

from slimtrain.trainer.export.hf import export_checkpoint  # noqa: E402
from slimtrain.trainer.lifecycle.branch import source_weights  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BLOCK = ("{type: compressor, decoder: frozen, encoder: {source: truncate, layers: 1}, pooling_factor: 4, "
         "context_tokens: 16, continuation_tokens: 16, min_context_tokens: 4, lr_scale: 2.0, eval_exact_match: 2}")


def test_frozen_decoder_branch_trains_the_compressor_and_resumes_bitwise(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dense = run_train(tmp_path / "dense", cache, ["train.steps=10", "checkpoint.every=10"])
    assert dense.returncode == 0, dense.stdout[-3000:]
    source = tmp_path / "dense" / "checkpoints" / "step_00000010"
    twin = export_checkpoint(source, tmp_path / "dense-export")  # an extra decoder: the dense run's HF export
    block = BLOCK[:-1] + f", decoders: [{{name: twin, path: '{twin}'}}]}}"
    branch = [f"plugins=[{block}]", f"checkpoint.branch_from={source}", "train.steps=20", "checkpoint.every=5",
              "eval.every=5"]
    _another_tokenizer_is_refused(twin, tmp_path, cache, branch)
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
    # Each step trained through one decoder, drawn by step: the twin's loss appears on its steps only.
    steps = [r for r in want if "loss" in r]
    assert 0 < sum("compressor/decoder_twin" in r for r in steps) < len(steps)
    assert "eval/compressor/gap_closed/twin" in last
    _export_and_compress(tmp_path / "straight", tmp_path)


def _another_tokenizer_is_refused(twin: Path, tmp_path: Path, cache: Path, branch: list[str]) -> None:
    """The same decoder with another tokenizer of the same size: refused before the build, naming the field."""
    import shutil

    from test_model_sources import save_tokenizer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(twin, other)
    for f in other.glob("*token*"):
        f.unlink()
    save_tokenizer(other, [f"w{i}" for i in range(511)])  # 512 tokens, as tiny-cpu's
    overrides = [o.replace(str(twin), str(other)) for o in branch]
    proc = run_train(tmp_path / "refused", cache, overrides)
    assert proc.returncode != 0
    assert "plugins.compressor.decoders.0.path" in proc.stdout and "another tokenizer" in proc.stdout


def _export_and_compress(run_dir: Path, tmp_path: Path) -> None:
    """`slimtrain export` of the trained run, then `slimtrain compress` on a text with the run's tokenizer."""
    import subprocess

    out = export_checkpoint(run_dir, tmp_path / "export")
    assert (out / "compressor" / "config.json").is_file() and (out / "tokenizer.json").is_file()
    text = tmp_path / "context.py"
    text.write_text("def add(a, b):\n    return a + b\n\n\nclass Point:\n    x = 0\n")
    proc = subprocess.run([sys.executable, "-m", "slimtrain.trainer.cli", "compress", str(out), "--text", str(text),
                           "--prompt", "def", "--out", str(tmp_path / "emb.pt"), "--generate", "8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "vectors" in proc.stdout
    embeds = torch.load(tmp_path / "emb.pt")
    assert embeds.dim() == 2 and embeds.shape[1] == 64  # tiny-cpu's hidden size


def test_a_joint_decoder_trains_and_evaluates_under_zero3(tmp_path: Path) -> None:
    """ZeRO-3 gathers parameters in each module's forward, on every rank together: the task vectors are read in
    the projector's forward and the greedy exact-match decodes run the same number of forwards on every rank."""
    block = BLOCK.replace("decoder: frozen", "decoder: joint")
    proc = run_train(tmp_path / "z3", tmp_path / "cache", [f"plugins=[{block}]", "backend.zero_stage=3",
                                                            "train.steps=4", "eval.every=4", "checkpoint.every=4"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    last = records(tmp_path / "z3")[-1]
    assert math.isfinite(last["eval/compressor/loss_comp"]) and "eval/compressor/rec_exact" in last
