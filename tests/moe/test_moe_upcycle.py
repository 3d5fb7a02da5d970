"""Upcycling: an MoE started from a dense checkpoint (`checkpoint.branch_from`, `checkpoint.init_from_hf`) gets
every expert from the dense MLP it replaces, through the build's `WeightInit.source` seam; and "dense training,
sparse inference" (`moe.dense_training_steps`).

The strong check: with no noise and top-k weights summing to 1, the upcycled MoE computes the dense model's
function, so its logits equal the dense model's, and a branched run's first loss equals the dense run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtrain.modules.hf_adapters import ADAPTERS, get_adapter, register_adapter
from slimtrain.modules.moe.layer import MoELayer
from slimtrain.modules.plugin import Plugin, PluginConfig, PluginContext, WeightInit
from slimtrain.modules.plugin_registry import register_plugin, validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig
from slimtrain.trainer.backends.build import ModelInit, build, build_model
from slimtrain.trainer.backends.deepspeed_branch import fresh_parameters
from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.export.hf import write_hf_dir

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_seq_len=32,
                  attention="sdpa")
IDS = {"bos_id": None, "eos_id": None, "pad_id": None}
CPU = torch.device("cpu")
DROP = "upcycle-test-drop"


def _stack(**moe) -> PluginStack:
    return PluginStack.from_configs([validate_plugin_config({"type": "moe", **moe})])


def _dense(seed: int = 0) -> nn.Module:
    return build_model(CFG, PluginStack(), ModelInit(seed=seed), CPU)


def _upcycled(dense: nn.Module, **moe):
    """The MoE model as a branch from `dense` builds it: the dense model's other weights, and every plugin's
    init_weights offered the dense tensors the MoE model lacks. Returns (model, stack, consumed, source)."""
    stack = _stack(**moe)
    model = build_model(CFG, stack, ModelInit(seed=1), CPU)
    model.load_state_dict(dense.state_dict(), strict=False)
    held = model.state_dict()
    source = {k: v for k, v in dense.state_dict().items() if k not in held}
    consumed = stack.init_weights(model, 1, source=source)
    return model, stack, consumed, source


def _mlp(dense: nn.Module, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mlp = dense.layers[i].mlp
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoELayer)]


def _ids(tokens: int = 16, rows: int = 2) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(3))


def _swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ gate_up.T).split(down.shape[-1], dim=-1)
    return (F.silu(gate) * up) @ down.T


# -- the experts start as the dense MLP --------------------------------------------------------------------------

def test_every_expert_and_the_shared_expert_start_as_the_dense_mlp() -> None:
    dense = _dense()
    model, _, consumed, source = _upcycled(dense, num_experts=4, top_k=2, num_shared_experts=1)
    assert consumed == set(source) == {f"layers.{i}.mlp.{p}.weight" for i in range(2)
                                       for p in ("gate_proj", "up_proj", "down_proj")}
    for i, moe in enumerate(_moe_layers(model)):
        gate, up, down = _mlp(dense, i)
        for e in range(4):
            assert torch.equal(moe.experts.gate_up[e], torch.cat([gate, up]))
            assert torch.equal(moe.experts.down[e], down)
        assert torch.equal(moe.shared.gate_proj.weight, gate) and torch.equal(moe.shared.up_proj.weight, up)
        assert torch.equal(moe.shared.down_proj.weight, down)
        # The router starts from init (random, small), as in a model trained from scratch.
        assert 0.5 * CFG.init_std < float(moe.router.weight.std()) < 1.5 * CFG.init_std


def test_noise_makes_the_copies_diverge_by_its_relative_size_reproducibly() -> None:
    dense = _dense()
    model, *_ = _upcycled(dense, num_experts=4, top_k=2, upcycle_noise=0.05)
    again, *_ = _upcycled(dense, num_experts=4, top_k=2, upcycle_noise=0.05)
    for i, (moe, twin) in enumerate(zip(_moe_layers(model), _moe_layers(again))):
        assert torch.equal(moe.experts.gate_up, twin.experts.gate_up)  # drawn from the plugin's seeded stream
        gate, up, down = _mlp(dense, i)
        copy = torch.cat([gate, up])
        for e in range(4):
            relative = (moe.experts.gate_up[e] - copy).pow(2).mean().sqrt() / copy.pow(2).mean().sqrt()
            assert 0.04 < float(relative) < 0.06
            relative = (moe.experts.down[e] - down).pow(2).mean().sqrt() / down.pow(2).mean().sqrt()
            assert 0.04 < float(relative) < 0.06
        assert not torch.equal(moe.experts.gate_up[0], moe.experts.gate_up[1])


def test_fine_grained_experts_take_equal_slices_of_the_dense_mlp() -> None:
    dense = _dense()
    # I_dense 64, experts 16 wide: 4 slices; expert e takes slice e mod 4. Two shared experts: 32 wide, slice 0.
    model, _, consumed, source = _upcycled(dense, num_experts=8, top_k=2, expert_intermediate_size=16,
                                           num_shared_experts=2, shared_expert_gate=True)
    assert consumed == set(source)
    x = torch.randn(5, CFG.hidden_size)
    for i, moe in enumerate(_moe_layers(model)):
        gate, up, down = _mlp(dense, i)
        for e in range(8):
            rows = slice((e % 4) * 16, (e % 4 + 1) * 16)
            assert torch.equal(moe.experts.gate_up[e], torch.cat([gate[rows], up[rows]]))
            assert torch.equal(moe.experts.down[e], down[:, rows])
        assert torch.equal(moe.shared.gate_proj.weight, gate[:32]) and torch.equal(moe.shared.down_proj.weight, down[:, :32])
        # Together, the four slices are the dense MLP.
        summed = sum(_swiglu(x, moe.experts.gate_up[e], moe.experts.down[e]) for e in range(4))
        torch.testing.assert_close(summed, dense.layers[i].mlp(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("moe", [
    {"router": "softmax", "top_k": 2},
    {"router": "softmax", "top_k": 1},
    {"router": "sigmoid", "top_k": 2, "n_group": 2, "topk_group": 1},
], ids=["softmax-top2", "softmax-top1", "sigmoid-grouped"])
def test_without_noise_the_upcycled_moe_computes_the_dense_model(moe: dict) -> None:
    dense = _dense()
    model, *_ = _upcycled(dense, num_experts=4, **moe)
    ids = _ids()
    with torch.no_grad():
        want = dense(ids).logits
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
        for layer in _moe_layers(model):
            layer.dense_routing = True  # every expert, weights summing to 1: the same function
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
        noisy, *_ = _upcycled(dense, num_experts=4, upcycle_noise=0.1, **moe)
        assert (noisy(ids).logits - want).abs().max() > 1e-3  # the check can fail


def test_a_dense_hugging_face_directory_upcycles_through_init_from_hf(tmp_path: Path) -> None:
    dense = _dense()
    out = write_hf_dir(dense.state_dict(), CFG, tmp_path / "dense", tokenizer_dir=None, ids=IDS)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    built = build(CFG, _stack(num_experts=4, top_k=2), ModelInit(seed=5, init_from_hf=out), CPU)
    assert built.consumed == {f"layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    with torch.no_grad():
        torch.testing.assert_close(built.model(_ids()).logits, dense(_ids()).logits, rtol=0, atol=1e-5)
    # Options no Hugging Face class computes (softmax with ungated shared experts) still start from a dense directory.
    model = build_model(CFG, _stack(num_experts=4, top_k=2, num_shared_experts=1), ModelInit(seed=5, init_from_hf=out),
                        CPU)
    gate, up, _ = _mlp(dense, 1)
    assert torch.equal(model.layers[1].mlp.experts.gate_up[3], torch.cat([gate, up]))


# -- dense training, sparse inference ----------------------------------------------------------------------------

@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_dense_training_steps_send_every_token_through_every_expert_then_top_k(router: str) -> None:
    dense = _dense()
    model, stack, *_ = _upcycled(dense, num_experts=4, top_k=1, upcycle_noise=0.1, dense_training_steps=2,
                                 router=router, aux_loss_weight=0.0)
    ids = _ids(tokens=2, rows=1)  # two tokens at top-1: at most two of four experts are chosen
    for step, dense_phase in ((1, True), (2, True), (3, False), (2, True)):  # a function of the step (resume)
        stack.on_step_start(PluginContext(model=model, step=step))
        model.zero_grad()
        out = model(ids)
        out.logits.square().mean().backward()
        for layer, chosen in zip(_moe_layers(model), out.aux["moe/experts"]):
            assert chosen.shape == (2, 1)  # the losses and metrics still see the top-k choices
            has_grad = layer.experts.gate_up.grad.flatten(1).abs().sum(1) > 0
            if dense_phase:
                assert has_grad.all()
            else:
                assert has_grad.tolist() == [e in chosen.flatten().tolist() for e in range(4)] and not has_grad.all()


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_dense_routing_weights_every_expert_by_the_whole_distribution(router: str) -> None:
    model, stack, *_ = _upcycled(_dense(), num_experts=4, top_k=1, upcycle_noise=0.1, router=router,
                                 dense_training_steps=1, routed_scaling_factor=1.5)
    stack.on_step_start(PluginContext(model=model, step=1))
    layer = _moe_layers(model)[0]
    x = torch.randn(6, CFG.hidden_size)
    with torch.no_grad():
        scores = layer.route(F.linear(x, layer.router.weight)).scores
        weights = scores / scores.sum(-1, keepdim=True) * 1.5
        want = sum(weights[:, e:e + 1] * _swiglu(x, layer.experts.gate_up[e], layer.experts.down[e]) for e in range(4))
        torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-6)


# -- errors ------------------------------------------------------------------------------------------------------

def test_an_expert_width_that_does_not_divide_the_dense_mlp_is_refused() -> None:
    with pytest.raises(ValueError, match=r"moe.expert_intermediate_size=24 cannot be upcycled from a dense MLP of "
                                         r"intermediate size 64.*set moe.expert_intermediate_size to a divisor such as "
                                         r"64, 32, 16, 8"):
        _upcycled(_dense(), num_experts=4, top_k=2, expert_intermediate_size=24)
    with pytest.raises(ValueError, match=r"moe.num_shared_experts=3 x expert width 16 = 48 cannot be upcycled .* set "
                                         r"moe.num_shared_experts to one of \[1, 2, 4\]"):
        _upcycled(_dense(), num_experts=4, top_k=2, expert_intermediate_size=16, num_shared_experts=3)


def test_a_partial_dense_mlp_and_an_unknown_consume_are_refused() -> None:
    dense = _dense()
    stack = _stack(num_experts=4, top_k=2)
    model = build_model(CFG, stack, ModelInit(seed=1), CPU)
    with pytest.raises(ValueError, match=r"holds \['layers.0.mlp.gate_proj.weight'\] but not .*needs all three"):
        stack.init_weights(model, 1, source={"layers.0.mlp.gate_proj.weight": _mlp(dense, 0)[0]})
    with pytest.raises(KeyError, match="not a source tensor"):
        WeightInit(generator=torch.Generator(), source={"a": torch.zeros(1)}).consume("b")


class DropConfig(PluginConfig):
    """Test plugin: replaces layer 0's MLP by a gain of its own and takes nothing from the source."""

    type: Literal["upcycle-test-drop"] = Field(description="Plugin name.")


class Gain(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.empty(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


if "upcycle-test-arch" not in ADAPTERS:  # an architecture of its own, so that a dense directory is "another" one
    from dataclasses import replace

    register_adapter("upcycle-test-arch", replace(get_adapter("llama"), hf_architecture="UpcycleTestForCausalLM"))


@register_plugin(DROP, DropConfig)
class DropPlugin(Plugin):
    def apply(self, model: nn.Module) -> None:
        model.layers[0].mlp = Gain(model.cfg.hidden_size)

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        model.layers[0].mlp.gain.fill_(1.0)

    def hf_architecture(self, model_cfg: ModelConfig) -> str:
        return "upcycle-test-arch"


def test_source_tensors_no_plugin_consumes_are_refused(tmp_path: Path) -> None:
    out = write_hf_dir(_dense().state_dict(), CFG, tmp_path / "dense", tokenizer_dir=None, ids=IDS)
    drop = PluginStack.from_configs([DropConfig(type=DROP)])
    with pytest.raises(RecipeError, match=r"checkpoint.init_from_hf=.* holds tensors this model lacks and no plugin "
                                          r"takes: layers.0.mlp.down_proj.weight, layers.0.mlp.gate_proj.weight, "
                                          r"layers.0.mlp.up_proj.weight"):
        build_model(CFG, drop, ModelInit(seed=0, init_from_hf=out), CPU)
    saved = {"a.weight": (4, 4), "mlp.weight": (4, 4), "other.weight": (2,)}
    current = {"a.weight": (4, 4), "experts": (2, 4, 4)}
    assert fresh_parameters(saved, current, Path("src"), frozenset({"mlp.weight", "other.weight"})) == ["experts"]
    with pytest.raises(RecipeError, match=r"holds parameters this model lacks: other.weight; a branch keeps every"):
        fresh_parameters(saved, current, Path("src"), frozenset({"mlp.weight"}))


def test_the_build_reads_a_branch_source_unless_the_run_resumes_its_own(tmp_path: Path) -> None:
    from slimtrain.trainer.lifecycle.branch import source_at_build
    from slimtrain.trainer.lifecycle.checkpoint import save_checkpoint
    from test_checkpoint_files import FakeBackend

    def saved(root: Path, step: int) -> Path:
        return save_checkpoint(root, step, FakeBackend(), {"step": step}, "model: {}\n", keep=5)

    source = saved(tmp_path / "source" / "checkpoints", 2)
    recipe = SimpleNamespace(checkpoint=SimpleNamespace(branch_from=str(tmp_path / "source"), resume="auto"))
    root = tmp_path / "branch" / "checkpoints"
    at_build = lambda: source_at_build(recipe, root, True, lambda: None, any_rank=bool)  # noqa: E731
    assert at_build() == source.resolve()
    newer = saved(tmp_path / "source" / "checkpoints", 4)
    assert at_build() == source.resolve()  # pinned, as the loop pins it
    recipe.checkpoint.resume = "never"  # a fresh start resolves it anew
    assert at_build() == newer.resolve()
    recipe.checkpoint.resume = "auto"
    saved(root, 6)  # the branch has a checkpoint of its own: it resumes, nothing to read
    assert at_build() is None
    recipe.checkpoint.branch_from = None
    assert at_build() is None


# -- end to end: `slimtrain train` -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A 1-rank dense run of the tiny recipe at ZeRO-1 (ZeRO-0 cannot branch into new parameters), 4 steps."""
    from train_helpers import run_train

    root = tmp_path_factory.mktemp("upcycle")
    run = root / "dense"
    proc = run_train(run, root / "cache", ["train.steps=4", "checkpoint.every=2", "backend.zero_stage=1"], nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return SimpleNamespace(run=run, cache=root / "cache", step2=run / "checkpoints" / "step_00000002")


@pytest.mark.slow
def test_an_moe_recipe_branched_from_a_dense_run_starts_from_its_function(dense_run, tmp_path: Path) -> None:
    from slimtrain.trainer.backends.deepspeed_branch import saved_param_shapes
    from train_helpers import losses, run_train

    before = {p: p.stat().st_mtime_ns for p in dense_run.run.rglob("*")}
    moe = "plugins=[{type: moe, num_experts: 4, top_k: 2, dense_training_steps: 3}]"
    run = tmp_path / "moe"
    proc = run_train(run, dense_run.cache, ["train.steps=6", "checkpoint.every=2", "backend.zero_stage=1", moe,
                                            f"checkpoint.branch_from={dense_run.step2}"], nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "branched" in proc.stdout and "the data position carries over" in proc.stdout
    got, want = losses(run), losses(dense_run.run)
    assert sorted(got) == [3, 4, 5, 6]
    # Step 3 (dense routing) sees the batch the dense run's step 3 saw, through the same function.
    assert got[3] == pytest.approx(want[3], rel=1e-5, abs=0)
    assert got[6] < got[3] - 0.05  # and it trains on, top-k from step 4
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("moe/aux" in r for r in records if "loss" in r)
    shapes = saved_param_shapes(run / "checkpoints" / "step_00000004" / "ds")
    assert shapes["layers.0.mlp.experts.gate_up"] == (4, 352, 64) and "layers.0.mlp.gate_proj.weight" not in shapes
    assert before == {p: p.stat().st_mtime_ns for p in dense_run.run.rglob("*")}  # the source is only read


@pytest.mark.slow
def test_the_build_upcycles_from_a_branch_source_and_refuses_what_none_consumes(dense_run) -> None:
    from slimtrain.trainer.export.consolidate import checkpoint_recipe, consolidate

    _, model_cfg, _ = checkpoint_recipe(dense_run.step2)
    weights = consolidate(dense_run.step2, 1)
    built = build(model_cfg, _stack(num_experts=4, top_k=2), ModelInit(seed=0, branch_from=dense_run.step2), CPU)
    assert len(built.consumed) == 3 * model_cfg.num_layers
    gate_up = built.model.layers[1].mlp.experts.gate_up
    assert torch.equal(gate_up[2], torch.cat([weights["layers.1.mlp.gate_proj.weight"],
                                              weights["layers.1.mlp.up_proj.weight"]]))
    drop = PluginStack.from_configs([DropConfig(type=DROP)])
    with pytest.raises(RecipeError, match=r"checkpoint.branch_from=.* holds parameters this model lacks: "
                                          r"layers.0.mlp.down_proj.weight, .*a branch keeps every parameter"):
        build(model_cfg, drop, ModelInit(seed=0, branch_from=dense_run.step2), CPU)
