"""The MoE plugin on the megatron backend through `slimtrain train` on 2 gloo ranks (megatron-core on CPU through the
test-only shim), against the DeepSpeed backend on one rank: expert parallelism 2 (each rank holds 2 of 4 experts;
megatron's expert groups, DDP expert buffers and chained optimizer) and tensor parallelism 2 (the MoE layers whole on
both ranks) give the same losses and gradient norms step by step, with clipping active; the expert-parallel run
resumes bitwise from its checkpoint (megatron's dist_checkpointing, each expert rank writing its share) and exports the same Hugging Face model, and the backend's
`full_state_dict` joins the expert shares; what megatron or this backend cannot do is refused before launch, naming
the field."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("megatron.core")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "trainer"))
from train_helpers import TINY, grad_norms, losses, records, run_train  # noqa: E402

from slimtrain.trainer.errors import RecipeError  # noqa: E402
from slimtrain.trainer.recipe.schema import load_recipe  # noqa: E402

MOE = ("plugins=[{type: moe, num_experts: 4, top_k: 2, expert_intermediate_size: 32, num_shared_experts: 1, "
       "shared_expert_gate: true, z_loss_weight: 0.001}]")
# Gradient norms here are 0.68-0.92: a clip at 0.5 scales every step, so the losses also check that the experts'
# optimizer clips with the total norm (experts counted once over the ranks that split them).
STEPS = [MOE, "train.steps=6", "checkpoint.every=3", "eval.every=3", "optim.grad_clip=0.5"]
EP2 = "backend={type: megatron, expert_parallel: 2, precision: fp32}"
TP2 = "backend={type: megatron, tensor_parallel: 2, precision: fp32}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """ds: DeepSpeed on 1 rank; ep2 and tp2: megatron on 2 ranks; ep2_resumed: ep2 rolled back to its step-3
    checkpoint and resumed."""
    root = tmp_path_factory.mktemp("megatron-moe")
    cache = root / "cache"
    out = SimpleNamespace(root=root)

    def train(name: str, overrides: list[str], nproc: int = 2) -> None:
        proc = run_train(root / name, cache, [*STEPS, *overrides], nproc=nproc)
        assert proc.returncode == 0, proc.stdout[-4000:]
        setattr(out, name, root / name)
        setattr(out, name + "_stdout", proc.stdout)

    train("ds", [], nproc=1)
    with pytest.MonkeyPatch.context() as mp:  # the megatron ranks load the CPU shim (a sitecustomize)
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HERE / "sitecustomize"),
                                                 *filter(None, [os.environ.get("PYTHONPATH")])]))
        train("ep2", [EP2])
        train("tp2", [TP2])
        shutil.copytree(out.ep2, root / "ep2_resumed")
        shutil.rmtree(root / "ep2_resumed" / "checkpoints" / "step_00000006")
        (root / "ep2_resumed" / "checkpoints" / "latest").write_text("step_00000003")
        train("ep2_resumed", [EP2])
    return out


def _close(got: dict[int, float], want: dict[int, float], tol: float) -> None:
    assert got.keys() == want.keys() == set(range(1, 7))
    assert max(abs(got[s] - want[s]) for s in got) <= tol, (got, want)


@pytest.mark.slow
@pytest.mark.distributed
def test_moe_on_megatron_trains_like_deepspeed_on_one_rank(runs) -> None:
    """Expert parallelism 2 and tensor parallelism 2: the DeepSpeed run's losses and gradient norms (megatron's
    chained-optimizer norm: dense and expert parts, each expert counted once) within fp32 noise."""
    for run in (runs.ep2, runs.tp2):
        _close(losses(run), losses(runs.ds), 1e-5)
        _close(grad_norms(run), grad_norms(runs.ds), 1e-5)
    last = {r["step"]: r for r in records(runs.ep2) if "loss" in r}[6]
    assert "moe/z" in last and len(last["moe/load/layer0"]) == 4  # the plugin's terms and metrics are reported
    evals = [r["eval_loss"] for r in records(runs.tp2) if "eval_loss" in r]  # one replica: the same batches
    assert evals == pytest.approx([r["eval_loss"] for r in records(runs.ds) if "eval_loss" in r], rel=1e-5, abs=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_checkpoint_holds_shares_and_resumes_bitwise(runs) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    step = runs.ep2 / "checkpoints" / "step_00000006" / "megatron"
    assert json.loads((step / "layout.json").read_text())["expert_parallel"] == 2
    stored = FileSystemReader(str(step)).read_metadata().state_dict_metadata
    experts, router = stored["model.layers.1.mlp.experts.gate_up"], stored["model.layers.1.mlp.router.weight"]
    assert tuple(experts.size) == (4, 64, 64)  # the whole tensor, written as each expert rank's 2 experts
    assert sorted(tuple(c.offsets) for c in experts.chunks) == [(0, 0, 0), (2, 0, 0)]
    assert tuple(router.size) == (4, 64) and len(router.chunks) == 1  # replicated: written once
    assert "resumed" in runs.ep2_resumed_stdout
    assert records(runs.ep2_resumed) == records(runs.ep2)  # every number, evaluations included


@pytest.mark.slow
@pytest.mark.distributed
def test_expert_parallel_export_equals_deepspeeds(runs, tmp_path: Path) -> None:
    """`slimtrain export` joins each expert tensor's shares over the expert ranks: the Hugging Face model equals the
    DeepSpeed run's, and transformers reloads it computing the trained model's logits (--verify)."""
    from safetensors.torch import load_file

    from slimtrain.trainer.cli import main

    exported = {}
    for name in ("ds", "ep2"):
        assert main(["export", str(getattr(runs, name)), str(tmp_path / name), "--verify"]) == 0
        exported[name] = load_file(tmp_path / name / "model.safetensors")
    assert exported["ep2"].keys() == exported["ds"].keys()
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in exported["ep2"]
    assert max(float((exported["ep2"][k] - exported["ds"][k]).abs().max()) for k in exported["ds"]) <= 1e-5


# -- refusals, before launch -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ([MOE, "backend={type: megatron, expert_parallel: 3}"],
     "plugins.0.num_experts=4 is not divisible by backend.expert_parallel=3"),
    (["backend={type: megatron, expert_parallel: 2}"],
     "backend.expert_parallel=2 but the model has no layer with experts to spread over ranks"),
    ([MOE, "backend={type: megatron, pipeline_parallel: 2}"], "the moe plugin with backend.pipeline_parallel=2"),
    ([MOE, "backend={type: megatron, tensor_parallel: 2, sequence_parallel: true}"],
     "the moe plugin with backend.sequence_parallel=true"),
    ([MOE, "backend={type: megatron}", "plugins=[{type: moe, num_experts: 4}, {type: draft, heads: [{kind: medusa}]}]"],
     "plugins ['draft'] on the megatron backend are not built yet"),
])
def test_what_the_megatron_moe_cannot_do_is_refused_naming_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=__import__("re").escape(message)):
        load_recipe(TINY, overrides)


def test_expert_parallel_must_divide_the_data_parallel_size() -> None:
    recipe = load_recipe(TINY, [MOE, "backend={type: megatron, tensor_parallel: 2, expert_parallel: 2}"])
    assert recipe.backend.data_parallel_size(4) == 2
    with pytest.raises(RecipeError, match=r"backend.expert_parallel=2 does not divide the data-parallel size 1 "
                                          r"\(world size 2 / tensor_parallel x pipeline_parallel = 2\)"):
        recipe.check_world(2)
    with pytest.raises(RecipeError, match="backend.expert_parallel=2 does not divide the data-parallel size 3"):
        load_recipe(TINY, [MOE, "backend={type: megatron, expert_parallel: 2}",
                           "train.global_batch_size=12"]).check_world(3)


def test_a_checkpoint_resumes_only_at_its_expert_parallel_size(tmp_path: Path) -> None:
    from slimtrain.trainer.backends import BACKENDS

    layout = {"format": "dist_checkpointing", "tensor_parallel": 1, "pipeline_parallel": 1, "expert_parallel": 2,
              "world_size": 2, "distributed_optimizer": False, "precision": "fp32"}
    (tmp_path / "megatron").mkdir()
    (tmp_path / "megatron" / "layout.json").write_text(json.dumps(layout))
    check = BACKENDS.get("megatron").check_resumable
    check(load_recipe(TINY, [MOE, EP2]), tmp_path, 2)
    check(load_recipe(TINY, [MOE, "backend={type: megatron, tensor_parallel: 2, expert_parallel: 2, "
                                  "precision: fp32}"]), tmp_path, 4)  # another tensor-parallel size reshards
    with pytest.raises(RecipeError, match="backend.expert_parallel=1, but .* was written with expert_parallel=2"):
        check(load_recipe(TINY, [MOE, "backend={type: megatron, precision: fp32}"]), tmp_path, 2)


def test_expert_shards_describe_each_ranks_share_of_the_whole_experts() -> None:
    """What checkpoint code reads to describe the expert-sharded parameters: dim 0, expert rank, size, whole shape."""
    from slimtrain.modules.context import LocalCommunicator
    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.modules.transformer.sharding import Shard
    from slimtrain.trainer.backends.build import ModelInit, build_model
    from slimtrain.trainer.backends.megatron.experts import expert_shards, mark, shard

    recipe = load_recipe(TINY, [MOE, EP2, "model.vocab_size=512"])
    model = build_model(recipe.model, PluginStack.from_configs(recipe.plugins), ModelInit(seed=0), torch.device("cpu"),
                        lambda m: shard(m, LocalCommunicator(), 1, 2))
    mark(model)
    shards = expert_shards(model, 1, 2)
    assert shards == {f"layers.{i}.mlp.experts.{w}": Shard(0, 1, 2, (4, *s))
                      for i in (0, 1) for w, s in (("gate_up", (64, 64)), ("down", (64, 32)))}
    params = dict(model.named_parameters())
    assert all(params[n].shape[0] == 2 and params[n].allreduce is False for n in shards)
    assert not any(hasattr(p, "allreduce") for n, p in params.items() if n not in shards)  # DDP's dense buffers
    assert expert_shards(model, 0, 1) == {}


@pytest.mark.slow
@pytest.mark.distributed
def test_full_state_dict_joins_the_expert_shares() -> None:
    """The backend's `full_state_dict` at expert_parallel 2 equals the single-process build bitwise (each rank drew
    the whole experts from the seed and kept its half; the shares are gathered over the expert group)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           str(HERE / "ep_state.py")], cwd=HERE.parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"equal": True, "held": 2, "shard": [0, 0, 2, [4, 64, 64]]}
