"""Expert parallelism on the DeepSpeed backend (`backend.expert_parallel_size`), end to end in `slimtrain train`.

On 2 gloo ranks, each holding 2 of 4 experts, with QAT on every Linear and on the experts (int4, LSQ steps set at
the build from the whole experts, fake-quant from step 5): the losses and gradient norms equal those of the same
recipe with every expert on every rank (ZeRO-1 and ZeRO-2, fp32, within float rounding: the tokens meet their
experts in other batches); a run killed after a checkpoint resumes bitwise (the experts' LSQ state included); a
checkpoint resumes at another expert-parallel size (ep 2 -> 1 and 1 -> 2, through the expert-aware universal
conversion) and continues the straight run; a dense run branches into an expert-parallel MoE that starts from its
function (upcycling); the export holds every expert, equal to the export of the run without expert parallelism,
packed per expert, and reloads. The refusals are unit tests on the recipe.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_helpers import records

from slimtrain.modules.context import LocalCommunicator
from slimtrain.modules.expert_parallel import expert_modules, expert_parameter_counts
from slimtrain.modules.moe.layer import MoELayer
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig
from slimtrain.trainer.backends.build import ModelInit, build_model
from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.optim import param_groups, set_engine_group
from slimtrain.trainer.recipe.schema import load_recipe

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny-cpu.yaml"
MOE = ("plugins=[{type: moe, num_experts: 4, top_k: 2, expert_intermediate_size: 32, num_shared_experts: 1, "
       "shared_expert_gate: true, z_loss_weight: 0.001}]")
# QAT of the experts (and of every other Linear) rides along in the shared runs. Its LSQ steps are set at the build
# (calibrate: false; each rank computes its experts' and gathers the others'), so the step-4 checkpoint every resume
# below starts from holds them; fake-quant from step 5. Not calibrated during training: right after an absmax
# calibration each scale group's largest weight lies exactly on the grid's edge, where LSQ's step gradient jumps
# (clipped or not) with a 1-ulp change of the weights, so two runs that differ by float rounding part there: this
# recipe calibrating at step 3, at ZeRO-1 and at ZeRO-2 without expert parallelism, measured 7e-5 apart in gradient
# norm at that step and 4e-4 five steps later, beyond the rounding compared below.
QAT = "{type: qat, weights: {bits: 4, group_size: 16}, estimator: lsq, calibrate: false, start_step: 4}"
# An MTP block rides along too: on this MoE base its MLP is an MoE layer (layer 2), sharded and balanced like the
# model's own, resumed and exported with them.
MTP = "{type: draft, heads: [{kind: mtp, depth: 1}], eval_prompts: 0}"
MOE_QAT = MOE.replace("}]", "}, " + QAT + ", " + MTP + "]")
STEPS, HALF = 8, 4
RUN = [MOE_QAT, f"train.steps={STEPS}", f"checkpoint.every={HALF}", f"eval.every={HALF}", "backend.precision=fp32"]
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_seq_len=32)
CPU = torch.device("cpu")


# -- refusals, before any process starts ---------------------------------------------------------------------


@pytest.mark.parametrize("overrides, expected", [
    (["backend.zero_stage=3"], "backend.expert_parallel_size=2 needs backend.zero_stage 1 or 2, got 3"),
    (["backend.zero_stage=0"], "backend.expert_parallel_size=2 needs backend.zero_stage 1 or 2, got 0"),
    (["backend.expert_parallel_size=3"], "plugins.0.num_experts=4 is not divisible by backend.expert_parallel_size=3"),
    (["plugins=[]"], "backend.expert_parallel_size=2 but the model has no layer with experts"),
    (["backend.raw={zero_optimization: {reduce_scatter: false}}"],
     "backend.raw.zero_optimization.reduce_scatter=false with backend.expert_parallel_size=2"),
    (["backend.raw={zero_optimization: {contiguous_gradients: false}}"],
     "backend.raw.zero_optimization.contiguous_gradients=false with backend.expert_parallel_size=2"),
])
def test_what_expert_parallelism_cannot_do_is_refused_with_the_fix(overrides: list[str], expected: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(str(TINY), [MOE, "backend.expert_parallel_size=2", *overrides])
    assert expected in str(err.value)


def test_qat_of_the_experts_is_accepted_with_expert_parallelism() -> None:
    recipe = load_recipe(str(TINY), [MOE_QAT, "backend.expert_parallel_size=2"])
    assert [p.type for p in recipe.plugins] == ["moe", "qat", "draft"]


def test_a_world_the_expert_groups_do_not_tile_is_refused() -> None:
    recipe = load_recipe(str(TINY), [MOE, "backend.expert_parallel_size=2", "train.global_batch_size=12"])
    assert recipe.check_world(2) == 3
    with pytest.raises(RecipeError, match=r"backend.expert_parallel_size=2 does not divide the world size 3"):
        recipe.check_world(3)


# -- the build: each rank draws the same experts as a build holding all of them -----------------------------


def _moe(**extra) -> PluginStack:
    return PluginStack.from_configs([validate_plugin_config({"type": "moe", "num_experts": 4, "top_k": 2, **extra})])


def _sharded(rank: int, size: int, **extra) -> torch.nn.Module:
    def parallelize(model: torch.nn.Module) -> None:
        for _, module in expert_modules(model):
            module.shard_experts(LocalCommunicator(), "expert", rank, size)

    return build_model(CFG, _moe(**extra), ModelInit(seed=3), CPU, parallelize)


def test_sharded_builds_hold_their_slice_of_the_unsharded_build_bitwise() -> None:
    whole = build_model(CFG, _moe(num_shared_experts=1), ModelInit(seed=3), CPU).state_dict()
    counts = expert_parameter_counts(_sharded(0, 1))
    assert counts == {f"layers.{i}.mlp.experts.{w}": 4 for i in (0, 1) for w in ("gate_up", "down")}
    for rank in (0, 1):
        part = _sharded(rank, 2, num_shared_experts=1).state_dict()
        assert part.keys() == whole.keys()
        for name, value in part.items():
            want = whole[name][2 * rank: 2 * rank + 2] if name in counts else whole[name]
            assert torch.equal(value, want), name


def test_upcycled_experts_are_sliced_from_the_whole_layer() -> None:
    """Each rank keeps its slice of the experts an unsharded build upcycles (noise included)."""
    dense = build_model(CFG, PluginStack(), ModelInit(seed=0), CPU).state_dict()
    source = {k: v for k, v in dense.items() if ".mlp." in k}

    def upcycled(rank: int, size: int) -> dict[str, torch.Tensor]:
        model, stack = _sharded(rank, size, upcycle_noise=0.1), _moe(upcycle_noise=0.1)
        stack.init_weights(model, 5, source=source)
        return model.state_dict()

    whole = upcycled(0, 1)
    for rank in (0, 1):
        part = upcycled(rank, 2)
        for name in ("layers.1.mlp.experts.gate_up", "layers.1.mlp.experts.down"):
            assert torch.equal(part[name], whole[name][2 * rank: 2 * rank + 2]), name


def test_sharded_layers_take_whole_expert_tensors_and_keep_their_share() -> None:
    """A single-process state dict loads into a sharded model (each layer keeps its slice); a state dict of the
    sharded size loads as it is."""
    whole = build_model(CFG, _moe(), ModelInit(seed=3), CPU).state_dict()
    part = _sharded(1, 2)
    part.load_state_dict(whole)
    for name, value in part.state_dict().items():
        assert torch.equal(value, whole[name][2:4] if ".experts." in name else whole[name]), name
    again = _sharded(1, 2)
    again.load_state_dict(part.state_dict())
    assert all(torch.equal(again.state_dict()[k], v) for k, v in part.state_dict().items())


def test_a_hugging_face_moe_imports_into_sharded_layers(tmp_path: Path) -> None:
    """init_from_hf of an MoE directory: each rank's layers keep their slice of the whole experts."""
    from slimtrain.trainer.export.hf import write_hf_dir

    ids = {"bos_id": None, "eos_id": None, "pad_id": None}
    whole = build_model(CFG, _moe(), ModelInit(seed=0), CPU).state_dict()
    moe = write_hf_dir(whole, CFG, tmp_path / "moe", tokenizer_dir=None, ids=ids, plugins=_moe())
    load_recipe(str(TINY), [MOE, "backend.expert_parallel_size=2", f"checkpoint.init_from_hf={moe}"])  # validates

    def parallelize(model: torch.nn.Module) -> None:
        for _, module in expert_modules(model):
            module.shard_experts(LocalCommunicator(), "expert", 1, 2)

    part = build_model(CFG, _moe(), ModelInit(seed=9, init_from_hf=moe), CPU, parallelize).state_dict()
    for name, value in part.items():
        want = whole[name][2:4] if ".experts." in name else whole[name]
        assert torch.equal(value, want), name


def test_a_layer_refuses_a_share_that_does_not_divide_its_experts() -> None:
    layer = MoELayer(validate_plugin_config({"type": "moe", "num_experts": 4, "top_k": 2}), 8, 4)
    with pytest.raises(ValueError, match=r"num_experts=4 is not divisible by the 3 ranks"):
        layer.shard_experts(LocalCommunicator(), "expert", 0, 3)
    layer.shard_experts(LocalCommunicator(), "expert", 1, 2)
    assert layer.experts.gate_up.shape[0] == 2 and layer.expert_slice == slice(2, 4)
    assert set(layer.expert_parameters()) == {"experts.gate_up", "experts.down"}


def test_tagged_parameters_leave_their_optimizer_group_with_its_settings() -> None:
    model = build_model(CFG, _moe(), ModelInit(seed=0), CPU)
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    set_engine_group(experts, {"moe": True, "name": "ep_size_2"})
    groups = param_groups(model, 0.1, lr=1e-3)
    moe = [g for g in groups if g.get("moe")]
    assert len(moe) == 1 and moe[0]["name"] == "ep_size_2" and moe[0]["weight_decay"] == 0.1
    assert {id(p) for p in moe[0]["params"]} == {id(p) for p in experts}
    assert groups.index(moe[0]) == 1  # right after the decaying group it left
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# -- 2 gloo ranks through `slimtrain train` ------------------------------------------------------------------


def _steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "loss" in r}


def _rolled_back(run: Path, copy: Path, step: int) -> Path:
    """A copy of `run` as a run stopped right after its checkpoint `step` leaves it (`latest` names it)."""
    shutil.copytree(run, copy)
    for ckpt in (copy / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    (copy / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    return copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The runs the tests below share (2 ranks, 8 steps, checkpoints and evaluations at 4 and 8):
    ref: ZeRO-2, every expert on every rank; ep2: the same with expert_parallel_size=2; ep2_resumed: ep2 killed
    (SIGKILL) after its step-4 checkpoint and resumed; ep2_to_ep1: ep2's step-4 checkpoint resumed with ep 1;
    ep1_to_ep2: ref's step-4 checkpoint resumed with ep 2 at ZeRO-1."""
    from train_helpers import run_train, run_until_checkpoint_then_kill

    root = tmp_path_factory.mktemp("ep")
    cache = root / "cache"
    out = SimpleNamespace(root=root, cache=cache)
    ep2 = "backend.expert_parallel_size=2"

    def train(name: str, overrides: list[str]) -> None:
        proc = run_train(root / name, cache, [*RUN, *overrides])
        assert proc.returncode == 0, proc.stdout[-3000:]
        setattr(out, name, root / name)
        setattr(out, name + "_stdout", proc.stdout)

    train("ref", [])
    train("ep2", [ep2])
    run_until_checkpoint_then_kill(root / "ep2_resumed", cache, HALF, [*RUN, ep2])
    train("ep2_resumed", [ep2])
    _rolled_back(out.ep2, root / "ep2_to_ep1", HALF)
    train("ep2_to_ep1", [])
    _rolled_back(out.ref, root / "ep1_to_ep2", HALF)
    train("ep1_to_ep2", [ep2, "backend.zero_stage=1"])
    return out


def _close(got: dict[int, dict], want: dict[int, dict], steps, rel: float) -> None:
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=rel, abs=0), (step, key)


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_training_equals_every_expert_on_every_rank(runs) -> None:
    """Losses and DeepSpeed's gradient norms (the global ones) with expert parallelism at ZeRO-2 (ep2) and
    ZeRO-1 (ep1_to_ep2 after its resume) equal the run without it, step by step, fake-quantized or not."""
    ref, ep2 = _steps(runs.ref), _steps(runs.ep2)
    assert sorted(ep2) == list(range(1, STEPS + 1))
    _close(ep2, ref, range(1, STEPS + 1), 1e-5)
    _close(_steps(runs.ep1_to_ep2), ref, range(HALF + 1, STEPS + 1), 1e-5)
    assert ep2[STEPS]["loss"] < ep2[1]["loss"] - 0.2  # it learns
    assert (ep2[HALF]["qat/active"], ep2[HALF + 1]["qat/active"]) == (0.0, 1.0)
    assert "moe/z" in ep2[STEPS] and len(ep2[STEPS]["moe/load/layer0"]) == 4
    evals = [r for r in records(runs.ep2) if "eval_loss" in r]  # evaluation runs the exchange too
    assert [r["eval_loss"] for r in evals] == pytest.approx(
        [r["eval_loss"] for r in records(runs.ref) if "eval_loss" in r], rel=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_run_resumes_bitwise_after_sigkill(runs) -> None:
    assert records(runs.ep2_resumed) == records(runs.ep2)  # every number, evaluations included
    assert "resharding" not in runs.ep2_resumed_stdout  # DeepSpeed's own files, as saved


@pytest.mark.slow
@pytest.mark.distributed
def test_a_checkpoint_resumes_at_another_expert_parallel_size(runs) -> None:
    """ep 2 -> 1 and ep 1 -> 2 (ZeRO-2 -> ZeRO-1 too) through the universal conversion: the resumed steps
    continue the straight run (to rounding; the conversion carries every weight, Adam moment and LSQ step
    exactly)."""
    ref = _steps(runs.ref)
    assert ("written by ZeRO-1/2 fp32 on 2 rank(s) with expert_parallel_size=2, loading into ZeRO-1/2 fp32 on 2 "
            "rank(s) with expert_parallel_size=1") in runs.ep2_to_ep1_stdout
    assert "with expert_parallel_size=1, loading into ZeRO-1/2 fp32 on 2 rank(s) with expert_parallel_size=2" \
        in runs.ep1_to_ep2_stdout
    for run in (runs.ep2_to_ep1, runs.ep1_to_ep2):
        got = _steps(run)
        assert sorted(got) == list(range(1, STEPS + 1))
        _close(got, ref, range(HALF + 1, STEPS + 1), 1e-5)
        assert not (run / "checkpoints" / f"step_{HALF:08d}" / ".reshard").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_the_export_of_an_expert_parallel_run_holds_every_expert(runs, tmp_path: Path) -> None:
    """Consolidation joins every expert rank's fp32 partitions (the model-states file holds expert rank 0's
    experts only, and the experts' LSQ state whole): the consolidated checkpoint equals that of the run without
    expert parallelism. The export writes every expert's fake-quantized weights, packed per expert in the packed
    variant, and transformers reloads it computing the trained model's logits (`--verify`)."""
    from safetensors.torch import load_file

    from slimtrain.modules.qat.export import dequantize_packed, scheme
    from slimtrain.trainer.cli import main
    from slimtrain.trainer.export.consolidate import consolidate

    step = runs.ep2 / "checkpoints" / f"step_{STEPS:08d}"
    weights = consolidate(step, 2)
    want = consolidate(runs.ref / "checkpoints" / f"step_{STEPS:08d}", 2)
    assert weights.keys() == want.keys()
    for name, value in weights.items():
        assert value.shape == want[name].shape, name
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-5, msg=name)
    assert weights["layers.1.mlp.experts.gate_up"].shape == (4, 64, 64)
    assert weights["layers.1.mlp.experts.weight_transform.gate_up_step_base"].shape == (4, 64, 4)
    saved = torch.load(step / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert saved["layers.1.mlp.experts.gate_up"].shape[0] == 2  # why consolidation cannot read the module
    assert saved["layers.1.mlp.experts.weight_transform.gate_up_step_base"].shape[0] == 4  # LSQ state: whole
    assert main(["export", str(step), str(tmp_path / "hf"), "--verify"]) == 0  # exports, and reloads
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    packed = load_file(tmp_path / "hf" / "packed" / "model.safetensors")
    sch = scheme(load_recipe(str(TINY), RUN).plugins[1], ["Linear"])
    for e in range(4):
        prefix = f"model.layers.1.mlp.experts.{e}.gate_proj."
        gate = exported[prefix + "weight"].float()  # fake-quantized: not the trained weights, close to them
        trained = weights["layers.1.mlp.experts.gate_up"][e, :32]
        assert not torch.equal(gate, trained), e
        torch.testing.assert_close(gate, trained, rtol=0, atol=0.05)
        layer = {k.removeprefix(prefix): v for k, v in packed.items() if k.startswith(prefix)}
        assert "weight_packed" in layer and "weight" not in layer, e
        assert torch.equal(dequantize_packed(layer, sch), gate), e


@pytest.mark.slow
@pytest.mark.distributed
def test_a_dense_run_branches_into_an_expert_parallel_moe_that_starts_from_its_function(runs) -> None:
    """A dense 1-rank run's checkpoint, branched into the MoE with ep 2 on 2 ranks: the experts (each rank its
    share) are upcycled from the dense MLPs and start with zero Adam moments (fresh, whole in the universal
    conversion); under dense routing the first step's loss is the dense run's (same global batch)."""
    from train_helpers import losses, run_train

    dense = runs.root / "dense"
    proc = run_train(dense, runs.cache, ["train.steps=4", "checkpoint.every=2", "backend.zero_stage=1"], nproc=1)
    assert proc.returncode == 0, proc.stdout[-3000:]
    moe = "plugins=[{type: moe, num_experts: 4, top_k: 2, dense_training_steps: 3}]"
    run = runs.root / "branched"
    proc = run_train(run, runs.cache, ["train.steps=5", "checkpoint.every=5", "backend.zero_stage=1", moe,
                                       "backend.expert_parallel_size=2",
                                       f"checkpoint.branch_from={dense / 'checkpoints' / 'step_00000002'}"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    got, want = losses(run), losses(dense)
    assert sorted(got) == [3, 4, 5]
    assert got[3] == pytest.approx(want[3], rel=1e-5, abs=0)
    shutil.rmtree(dense)
