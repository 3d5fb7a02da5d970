"""QAT through `slimtrain train` on 2 gloo ranks: fake-quant starts at its step, LSQ state resumes bitwise,
and the export of the trained checkpoint serves the QAT model's logits (transformers, packed and dequantized)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from train_helpers import REPO, losses, run_train  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Fake-quant starts at step 3 (LSQ steps calibrated in its first forward); checkpoints at 3 and 6.
QAT = ["model.intermediate_size=192", "train.steps=6", "checkpoint.every=3",
       "plugins=[{type: qat, weights: {bits: 4, group_size: 32}, estimator: lsq, start_step: 2}]"]
# The tokenizer and shards of tiny-cpu persist here between sessions (prepare verifies them on open).
CACHE = REPO / ".cache" / "slimtrain" / "data"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 uninterrupted QAT steps on 2 ranks (checkpoints at 3 and 6)."""
    run_dir = tmp_path_factory.mktemp("qat-straight")
    proc = run_train(run_dir, CACHE, QAT)
    assert proc.returncode == 0, proc.stdout
    return run_dir


def _from_step3(straight: Path, run_dir: Path) -> Path:
    """A run directory holding only the straight run's step-3 checkpoint (taken just after calibration)."""
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_00000003", ckpts / "step_00000003")
    (ckpts / "latest").write_text("step_00000003\n")
    return run_dir


def test_lsq_qat_resumes_bitwise_and_exports_what_it_trained(straight: Path, tmp_path: Path) -> None:
    records = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["qat/active"] for r in records if "qat/active" in r} == {
        1: 0.0, 2: 0.0, 3: 1.0, 4: 1.0, 5: 1.0, 6: 1.0}

    resumed = _from_step3(straight, tmp_path / "resumed")
    proc = run_train(resumed, CACHE, QAT)
    assert proc.returncode == 0 and "resumed" in proc.stdout, proc.stdout
    after = losses(resumed)
    assert after == {s: v for s, v in losses(straight).items() if s > 3}  # bitwise: LSQ steps and flags resumed

    _check_export(straight, tmp_path / "hf")


def test_lsq_qat_resumes_on_one_rank(straight: Path, tmp_path: Path) -> None:
    """A universal (resharded) load restores parameters and optimizer state only; the calibrated LSQ step
    sizes are buffers, restored from the checkpoint's model states (else they would recalibrate)."""
    resumed = _from_step3(straight, tmp_path / "resumed")
    proc = run_train(resumed, CACHE, QAT, nproc=1)
    assert proc.returncode == 0 and "resharding" in proc.stdout, proc.stdout
    after, want = losses(resumed), losses(straight)
    for step in (4, 5, 6):
        assert after[step] == pytest.approx(want[step], rel=1e-6, abs=0), step


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same 6 steps on 2 ranks without the plugin (checkpoints at 2, 4 and 6)."""
    run_dir = tmp_path_factory.mktemp("dense")
    proc = run_train(run_dir, CACHE, [*QAT[:2], "checkpoint.every=2"])
    assert proc.returncode == 0, proc.stdout
    return run_dir


def test_qat_branched_from_a_dense_checkpoint_equals_one_qat_run(straight: Path, dense: Path, tmp_path: Path) -> None:
    """QAT added at step 2 of a dense run (checkpoint.branch_from) trains exactly as the run that had the
    plugin from the start: its step-size gains had no gradient before fake-quant started (value 1, zero
    moments), which is what the branch gives the parameters the dense checkpoint lacks."""
    source = dense / "checkpoints" / "step_00000002"
    before = sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in source.rglob("*"))
    branch = tmp_path / "branch"
    proc = run_train(branch, CACHE, [*QAT, f"checkpoint.branch_from={source}"])
    assert proc.returncode == 0, proc.stdout
    assert "branched" in proc.stdout and "14 new parameter tensor(s) start fresh" in proc.stdout, proc.stdout
    assert losses(branch) == {s: v for s, v in losses(straight).items() if s > 2}  # bitwise
    assert before == sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in source.rglob("*"))

    one = tmp_path / "one-rank"  # the branch also reshards: 2-rank source, 1-rank branch
    proc = run_train(one, CACHE, [*QAT, f"checkpoint.branch_from={source}"], nproc=1)
    assert proc.returncode == 0, proc.stdout
    after, want = losses(one), losses(straight)
    assert sorted(after) == [3, 4, 5, 6]
    for step in after:
        assert after[step] == pytest.approx(want[step], rel=1e-6, abs=0), step
    assert not (one / "checkpoints" / ".branch").exists()


def _check_export(run_dir: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from slimtrain.modules.plugin_registry import build_plugins
    from slimtrain.modules.transformer import Transformer
    from slimtrain.trainer.export.consolidate import consolidate, load_checkpoint_for_export
    from slimtrain.trainer.export.hf import export_checkpoint

    export_checkpoint(run_dir, out)
    ckpt = load_checkpoint_for_export(run_dir)
    # Our QAT model, as the trainer built it, with the checkpoint's raw weights and LSQ state.
    [plugin] = build_plugins(ckpt.recipe.plugins)
    model = Transformer(ckpt.model_cfg.model_copy(update={"attention": "eager"}))
    plugin.apply(model)
    model.load_state_dict(consolidate(ckpt.path, ckpt.recipe.backend.zero_stage))
    plugin.set_step(6)
    model.eval()
    ids = torch.randint(0, ckpt.model_cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids).logits
        for variant in ("", "packed"):
            hf = AutoModelForCausalLM.from_pretrained(out / variant, dtype=torch.float32, attn_implementation="eager")
            assert float((hf.eval()(input_ids=ids).logits - ours).abs().max()) <= 1e-4, variant
    config = json.loads((out / "packed" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["config_groups"]["group_0"]["weights"]["group_size"] == 32
