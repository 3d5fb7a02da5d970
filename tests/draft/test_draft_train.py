"""Draft heads on 2 gloo ranks with DeepSpeed, as a user runs them: joint training resumes bitwise after
SIGKILL with every head kind; a frozen-base branch from a dense checkpoint trains the heads only, and the
trained heads decode losslessly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import records, run_train, run_until_checkpoint_then_kill

from slimtrain.trainer.lifecycle.branch import source_weights

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

HEADS = ("heads: [{kind: mtp, depth: 2, loss_weight_schedule: [[0, 0.3], [15, 0.1]]}, "
         "{kind: medusa, num_heads: 2}, {kind: hydra, num_heads: 2}, {kind: eagle3, steps: 2, draft_vocab_size: 256}]")
JOINT = [f"plugins=[{{type: draft, mode: joint, eval_prompts: 2, eval_rounds: 4, {HEADS}}}]",
         "train.steps=20", "checkpoint.every=10", "eval.every=10"]


def test_joint_heads_resume_bitwise_after_sigkill(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    straight = run_train(tmp_path / "straight", cache, JOINT)
    assert straight.returncode == 0, straight.stdout[-3000:]
    run_until_checkpoint_then_kill(tmp_path / "resumed", cache, 10, JOINT)
    resumed = run_train(tmp_path / "resumed", cache, JOINT)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    want = records(tmp_path / "straight")
    assert want == records(tmp_path / "resumed")
    last_eval = want[-1]
    for key in ("eval/draft/mtp_1", "eval/draft/mtp_2", "eval/draft/medusa/acc2", "eval/draft/hydra/acc1",
                "eval/draft/mtp/tau", "eval/draft/medusa/accept2", "eval/draft/hydra/tau", "eval/draft/eagle3/acc2",
                "eval/draft/eagle3/tau"):
        assert key in last_eval, sorted(last_eval)
    assert 1.0 <= last_eval["eval/draft/mtp/tau"] <= 3.0
    # the evaluation's own lossless check: what it decoded is the model's greedy output (fp32: allow a near tie)
    for kind in ("mtp", "medusa", "hydra", "eagle3"):
        assert last_eval[f"eval/draft/{kind}/greedy_match"] >= 0.98, (kind, last_eval)
    steps = [r for r in want if "loss" in r]
    assert {"draft/mtp_1", "draft/mtp_2", "draft/medusa_1", "draft/hydra_2", "draft/eagle3_2"} <= set(steps[-1])


def test_frozen_base_branch_trains_only_the_heads(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dense = run_train(tmp_path / "dense", cache, ["train.steps=10", "checkpoint.every=10"])
    assert dense.returncode == 0, dense.stdout[-3000:]
    source = tmp_path / "dense" / "checkpoints" / "step_00000010"
    frozen = [f"plugins=[{{type: draft, mode: frozen, targets: self_distill, lr_scale: 4.0, eval_prompts: 1, "
              f"eval_rounds: 4, {HEADS}}}]",
              f"checkpoint.branch_from={source}", "train.steps=20", "checkpoint.every=10", "eval.every=10"]
    branch = run_train(tmp_path / "frozen", cache, frozen)
    assert branch.returncode == 0, branch.stdout[-3000:]
    before = source_weights(source)
    after = source_weights(tmp_path / "frozen" / "checkpoints" / "step_00000020")
    for name, value in before.items():
        assert torch.equal(after[name], value), name  # the base: bitwise unchanged
    heads = {n: t for n, t in after.items() if n.startswith("draft.")}
    assert heads and all(n not in before for n in heads)
    # Medusa's projections started as the dense checkpoint's output head (not the draw it replaced) and moved.
    start = before["lm_head.weight"]
    moved = (heads["draft.medusa.lm_heads.0.weight"] - start).abs().max()
    assert 0 < moved < 0.5 * start.abs().max()
    assert heads["draft.hydra.blocks.1.0.linear.weight"].abs().max() > 0
    # EAGLE-3's draft vocabulary: the corpus's 256 most frequent tokens, its head started from their rows.
    assert int(heads["draft.eagle3.t2d"].sum()) == 256

    model = _decode_losslessly(tmp_path / "frozen", after)
    _exports_decode_the_same(tmp_path / "frozen", tmp_path / "export", model)
    _speculate_command_decodes_text(tmp_path / "export")


def _speculate_command_decodes_text(export: Path) -> None:
    """`slimtrain speculate` on the export: text out, tau, acceptance, speed, and the greedy check passed."""
    import subprocess
    import sys

    for kind, extra in (("eagle3", []), ("hydra", ["--tree", "2,2"])):
        proc = subprocess.run([sys.executable, "-m", "slimtrain.trainer.cli", "speculate", str(export), kind,
                               "--prompt", "def main(argv):", "--max-new-tokens", "16", *extra],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "tokens per forward" in proc.stdout and "output identical to greedy: yes" in proc.stdout


def _exports_decode_the_same(run_dir: Path, out: Path, model) -> None:
    """`slimtrain export` of the trained heads: each variant, reloaded on the plain export's base, drafts and accepts
    exactly what the checkpoint's heads do (fp32 both sides)."""
    from slimtrain.modules.draft.export import load_heads
    from slimtrain.modules.draft.speculate import SpeculativeDecoder
    from slimtrain.modules.transformer import Transformer
    from slimtrain.trainer.export.hf import export_checkpoint
    from slimtrain.trainer.export.importer import import_hf

    export_checkpoint(run_dir, out)
    model = model.float()
    cfg = model.cfg
    base = Transformer(cfg)
    import_hf(base, cfg, out)
    base.eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    for kind in ("mtp", "medusa", "hydra", "eagle3"):
        trained, reloaded = model.draft[kind], load_heads(out / kind, kind, base)
        layers = getattr(trained, "hidden_layers", ())
        want = SpeculativeDecoder(model, trained.drafter(model), trained.positions, None, layers).generate(prompt, 24)
        got = SpeculativeDecoder(base, reloaded.drafter(base), reloaded.positions, None, layers).generate(prompt, 24)
        assert torch.equal(got[0], want[0]) and got[1] == want[1], kind


def _decode_losslessly(run_dir: Path, weights: dict[str, torch.Tensor]):
    from slimtrain.modules.plugin_registry import build_plugins
    from slimtrain.modules.draft.speculate import SpeculativeDecoder
    from slimtrain.modules.transformer import Transformer
    from slimtrain.modules.transformer.generate import greedy_generate
    from slimtrain.trainer.export.consolidate import load_checkpoint_for_export

    ckpt = load_checkpoint_for_export(run_dir)
    [plugin] = build_plugins(ckpt.recipe.plugins)
    model = Transformer(ckpt.model_cfg)
    plugin.apply(model)
    model.load_state_dict(weights, strict=False)
    model = model.double().eval()
    prompt = torch.randint(0, ckpt.model_cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    want = greedy_generate(model, prompt, 24)
    for kind, widths in (("mtp", None), ("medusa", [2, 2]), ("hydra", None), ("eagle3", None)):
        head = model.draft[kind]
        decoder = SpeculativeDecoder(model, head.drafter(model), head.positions, widths,
                                     hidden_layers=getattr(head, "hidden_layers", ()))
        got, stats = decoder.generate(prompt, 24)
        assert torch.equal(got, want), kind
        assert stats.tau >= 1.0
    return model


def test_speculative_evaluation_runs_under_zero3(tmp_path: Path) -> None:
    """ZeRO-3 gathers parameters in every module's forward, on every rank together: the evaluation's fixed number
    of rounds keeps the ranks' forwards in step whatever each accepts."""
    heads = "heads: [{kind: mtp, depth: 2}, {kind: eagle3, steps: 2}, {kind: hydra, num_heads: 2}]"
    proc = run_train(tmp_path / "z3", tmp_path / "cache", [
        f"plugins=[{{type: draft, eval_prompts: 2, eval_rounds: 3, {heads}}}]", "backend.zero_stage=3",
        "train.steps=4", "eval.every=4", "checkpoint.every=4"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    last = records(tmp_path / "z3")[-1]
    assert {"eval/draft/mtp/tau", "eval/draft/eagle3/accept2", "eval/draft/hydra/acc2"} <= set(last)
