"""The three example plugins composed in one recipe, trained as a user trains: `slimtrain train` on
2 gloo ranks with DeepSpeed, found through the `slimtrain.plugins` entry points. One straight run and
one killed right after its step-10 checkpoint and resumed: every logged number agrees bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import run_train, run_until_checkpoint_then_kill

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PLUGINS = ("plugins=[{type: splice, context: 8, jitter: 4}, {type: probe, layer: 0}, "
           "{type: router}]")
OVERRIDES = [PLUGINS, "eval.every=10", "train.steps=20", "checkpoint.every=10", "logging.plot=true"]
VOLATILE = {"time_s", "tokens_per_s", "mfu", "eval_s"}


def _records(run_dir: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        kind = "eval" if "eval_loss" in rec else "train"
        out[(kind, rec["step"])] = {k: v for k, v in rec.items() if k not in VOLATILE}
    return out


def straight_and_resumed(root: Path, overrides: list[str], kill_at: int, env: dict[str, str]) -> dict[str, Path]:
    """One straight run, and one killed (SIGKILL) right after its `kill_at` checkpoint then resumed."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PYTHONPATH", env["PYTHONPATH"])  # the runs find the example plugins through their entry points
    cache = root / "cache"
    try:
        straight = run_train(root / "straight", cache, overrides)
        assert straight.returncode == 0, straight.stdout[-3000:]
        run_until_checkpoint_then_kill(root / "resumed", cache, kill_at, overrides)
        resumed = run_train(root / "resumed", cache, overrides)
        assert resumed.returncode == 0, resumed.stdout[-3000:]
        assert "resumed from" in resumed.stdout
    finally:
        mp.undo()
    return {"straight": root / "straight", "resumed": root / "resumed"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, entry_point_env) -> dict[str, Path]:
    return straight_and_resumed(tmp_path_factory.mktemp("composed"), OVERRIDES, 10, entry_point_env)


def test_composed_plugins_resume_bitwise_after_sigkill(runs) -> None:
    straight, resumed = _records(runs["straight"]), _records(runs["resumed"])
    assert set(straight) == set(resumed) and len(straight) == 22
    for key in sorted(straight):
        assert straight[key] == resumed[key], key


def test_every_seam_shows_in_the_metrics(runs) -> None:
    records = _records(runs["straight"])
    train = records[("train", 20)]
    assert {"router/balance", "probe/ce", "router/expert0_share"} <= set(train)
    assert 0 < train["router/expert0_share"] < 1  # the load counter was all-reduced and kept
    # A vector metric (one value per layer) is averaged over ranks element by element and kept as a list.
    shares = train["router/layer_share"]
    assert isinstance(shares, list) and len(shares) == 2 and train["router/expert0_share"] == pytest.approx(sum(shares) / 2)
    assert (runs["straight"] / "router_share.png").stat().st_size > 0  # the plugin's end-of-run plot
    evaluation = records[("eval", 20)]
    # The plugins' loss terms on held-out data, and the probe's own evaluation.
    assert {"eval/router/balance", "eval/probe/ce", "eval/probe/accuracy"} <= set(evaluation)
    assert 0 <= evaluation["eval/probe/accuracy"] <= 1
    assert records[("eval", 10)]["eval_loss"] > evaluation["eval_loss"]


def test_the_composed_model_exports_through_the_plugins_adapters(runs, tmp_path, entry_point_env,
                                                                 example_plugins) -> None:
    """`slimtrain export --verify` writes a Mixtral (the router's architecture) with the probe head and the
    encoder under their own names; transformers' logits match the trained model; init_from_hf reads it back."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.trainer.backends.build import ModelInit, build_model
    from slimtrain.trainer.export.consolidate import load_checkpoint_for_export

    out = tmp_path / "hf"
    env = {**os.environ, **entry_point_env}
    done = subprocess.run([sys.executable, "-m", "slimtrain.trainer.cli", "export", str(runs["straight"]), str(out),
                           "--verify"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "(ok)" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 2
    assert config["num_experts_per_tok"] == 1
    assert config["probe_layer"] == 0 and config["splice_context_tokens"] == 8
    tensors = load_file(str(out / "model.safetensors"))
    assert "probe_head.weight" in tensors and "splice_encoder.0.weight" in tensors
    assert "model.layers.1.block_sparse_moe.experts.1.w2.weight" in tensors

    ckpt = load_checkpoint_for_export(runs["straight"])
    plugins = PluginStack.from_configs(ckpt.recipe.plugins)
    counts = plugins.counts(ckpt.model_cfg, ckpt.recipe.data.seq_len)
    card = (out / "README.md").read_text()
    assert counts.total_params > counts.active_params  # top-1 of 2 experts: one runs per token
    assert f"| parameters | {counts.total_params:,} |" in card
    assert f"| active parameters per token | {counts.active_params:,} |" in card
    model = build_model(ckpt.model_cfg, plugins, ModelInit(seed=123, init_from_hf=out), torch.device("cpu"))
    for name, value in model.named_parameters():
        assert torch.equal(value, ckpt.trained_state[name]), name


ZERO3 = ["plugins=[{type: splice, context: 8, jitter: 4}, {type: probe, freeze_base: true}]", "backend.zero_stage=3",
         "backend.precision=bf16", "train.steps=8", "checkpoint.every=4", "eval.every=4"]


def test_a_frozen_base_at_zero3_in_bf16_resumes_bitwise_and_stays_frozen(tmp_path, entry_point_env,
                                                                         example_plugins) -> None:
    """ZeRO-3 partitions every parameter and gathers the encoder the splice calls outside the model's
    forward; bf16 casts the module; the frozen decoder holds no optimizer state and must not move."""
    import torch

    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.trainer.backends.build import ModelInit, build_model
    from slimtrain.trainer.export.consolidate import load_checkpoint_for_export

    both = straight_and_resumed(tmp_path, ZERO3, 4, entry_point_env)
    assert _records(both["straight"]) == _records(both["resumed"])
    ckpt = load_checkpoint_for_export(both["straight"])
    start = build_model(ckpt.model_cfg, PluginStack.from_configs(ckpt.recipe.plugins), ModelInit(seed=0),
                        torch.device("cpu")).state_dict()
    for name, value in ckpt.trained_state.items():
        frozen = name.split(".")[0] in ("embed", "layers", "norm", "lm_head")
        # A frozen parameter has no fp32 master in bf16 training: it keeps its bf16 value, never updated.
        assert torch.equal(value, start[name].bfloat16().float()) == frozen, name
