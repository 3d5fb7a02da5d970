"""Expert parallelism on DeepSpeed (`backend.expert_parallel_size`): the experts of every module implementing
`slimtrain.modules.expert_parallel.ExpertParallel` are spread over groups of `ep` consecutive ranks, the rest of
the model stays a data-parallel replica on every rank.

What DeepSpeed 0.19.8 needs to treat our expert weights as its own expert parameters (measured on 2 and 4 gloo
ranks at ZeRO-1/2, fp32 and bf16; deepspeed/runtime/engine.py, zero/stage_1_and_2.py):

- its expert and expert-data groups (`deepspeed.utils.groups._create_expert_and_data_parallel`, named
  `ep_size_{ep}`: expert groups are consecutive ranks, expert-data groups strided), made before the engine;
- a `deepspeed.moe.layer.MoE` instance inside the model: the engine looks for one to set `has_moe_layers`
  (engine.py:2101-2106), without which it broadcasts rank 0's experts to every rank at start and averages
  expert gradients over all ranks. `marker` is such an instance without state or forward: the model's own
  layers do the work, and its state dict, checkpoints and exports are unchanged;
- each expert parameter with `allreduce = False` and `group_name` (deepspeed.moe.utils.is_moe_param), alone in
  optimizer groups with `{"moe": True, "name": group name}` (stage_1_and_2.py:862-886 partitions those over the
  expert-data group). Their gradients are then summed over the expert-data ranks and divided by the whole
  data-parallel size (engine.py `_reduce_expert_gradients`, the ZeRO-2 bucket path alike): the mean over all
  tokens, as for every other parameter. The gradient norm is the global one (stage_1_and_2.py:2648-2705 sums
  every partition's squares over the whole world).

Checkpoints. Only data-parallel rank 0 writes `mp_rank_00_model_states.pt`, whose module holds expert rank 0's
experts only; DeepSpeed's load copies them into every rank's module. The fp32 master partitions (each rank's
ZeRO file) hold every rank's experts, so after a load the modules are refreshed from them (`update_lp_params`).
`deepspeed.checkpoint.ds_to_universal` cannot convert such a checkpoint (it joins every parameter's fragments
over all ranks, twice as many as an expert has), so a resume at another expert-parallel size, world size or
precision goes through `write_universal` here: the same universal layout, expert tensors joined over the
expert ranks to [E, ...] and marked `is_expert_param` / `ep_num_experts`, which DeepSpeed's universal loader
slices for the loading rank (checkpoint/universal_checkpoint.py:259-278). `consolidated_state` reads the same
files into the full fp32 weights for export.

A plugin's transform of the experts (QAT) moves to each rank's share in `shard` (the module's `shard_experts`).
Whatever per-expert state it keeps must stay whole on every rank as dense tensors, as QAT's LSQ steps do: a
buffer split over the expert ranks would be saved from the model-states file only (expert rank 0's share), and
only `expert_parameters` are saved per expert rank, in the fp32 partitions.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from slimtrain.modules.context import Communicator
from slimtrain.modules.expert_parallel import expert_parameter_counts
from slimtrain.trainer.backends.expert_layers import EXPERT_DATA_GROUP, EXPERT_GROUP, shard_expert_layers  # noqa: F401
from slimtrain.trainer.errors import CheckpointError, RecipeError
from slimtrain.trainer.optim import set_engine_group

MARKER = "deepspeed_expert_parallel"  # the marker's name in the model (it has no parameters or buffers)
_RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


@dataclass(frozen=True)
class ExpertGroups:
    """This rank's DeepSpeed expert groups for an expert-parallel size `size`."""

    size: int
    name: str  # DeepSpeed's group name, `ep_size_{size}`
    expert: Any  # the `size` ranks that hold different experts (tokens are exchanged here)
    expert_data: Any  # the ranks holding the same experts as this one (their gradients are reduced here)
    rank: int  # this rank's index in `expert`: it holds that share of every layer's experts


def create_groups(size: int, dist_backend: str) -> ExpertGroups:
    """DeepSpeed's expert and expert-data groups (collective; once per process, before the engine starts)."""
    import deepspeed
    from deepspeed.utils import groups

    deepspeed.init_distributed(dist_backend=dist_backend, dist_init_required=False)
    name = f"ep_size_{size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(size)
    return ExpertGroups(size, name, groups._get_expert_parallel_group(name),
                        groups._get_expert_data_parallel_group(name), groups._get_expert_parallel_rank(name))


def shard(model: nn.Module, comm: Communicator, groups: ExpertGroups) -> None:
    """The backend's parallelisation step (meta model): every expert module keeps this rank's share, a plugin's
    transform of its experts carried over (module docstring)."""
    shard_expert_layers(model, comm, groups.rank, groups.size, "backend.expert_parallel_size")


def mark(model: nn.Module, groups: ExpertGroups) -> None:
    """Tell DeepSpeed which parameters are expert parameters (after materialisation, before the optimizer):
    its attributes, and the optimizer groups of their own they must sit in (`trainer.optim.set_engine_group`)."""
    for p in expert_parameters(model).values():
        p.allreduce, p.group_name = False, groups.name
    set_engine_group(list(expert_parameters(model).values()), {"moe": True, "name": groups.name})


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{qualified name: parameter} of every expert tensor of `model`."""
    params = dict(model.named_parameters())
    return {name: params[name] for name in expert_parameter_counts(model)}


def attach_marker(model: nn.Module, groups: ExpertGroups) -> None:
    """Add the stateless `MoE` instance that makes the engine handle expert parameters (module docstring)."""
    counts = sorted(set(expert_parameter_counts(model).values()))
    model.add_module(MARKER, _marker_class()(counts[-1], groups.size, groups.name))


def check_optimizer_groups(optimizer: torch.optim.Optimizer, model: nn.Module, groups: ExpertGroups) -> None:
    """Every expert parameter in a group `{"moe": True, "name": <group>}` and nothing else there (DeepSpeed would
    assert in the middle of its start; an optimizer not built by `trainer.optim` may miss the split); none
    frozen (a plugin's frozen group)."""
    experts = {id(p): n for n, p in expert_parameters(model).items()}
    seen = set()
    for i, group in enumerate(optimizer.param_groups):
        moe = bool(group.get("moe"))
        for p in group["params"]:
            seen.add(id(p))
            if (id(p) in experts) != moe or (moe and group.get("name") != groups.name):
                what = experts.get(id(p), "a parameter that is not an expert's")
                raise RuntimeError(f"optimizer group {i} ({'moe' if moe else 'dense'}) holds {what}: with expert "
                                   f"parallelism expert weights must sit alone in groups {{moe: True, name: "
                                   f"{groups.name!r}}} (build the optimizer with slimtrain.trainer.optim)")
    frozen = sorted(n for i, n in experts.items() if i not in seen)
    if frozen:
        raise RecipeError(f"{frozen[0]} is frozen (not optimized): frozen experts are not supported with "
                          f"backend.expert_parallel_size={groups.size} (DeepSpeed's checkpoints hold the other expert "
                          "ranks' experts only in the optimizer's partitions); train them or set "
                          "backend.expert_parallel_size=1")


def _marker_class() -> type:
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """Makes a DeepSpeed engine treat the model as having MoE layers; owns nothing and is never called."""

        def __init__(self, num_experts: int, ep_size: int, group_name: str) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: it would build experts and gates of its own
            self.num_experts, self.ep_size, self.expert_group_name = num_experts, ep_size, group_name
            self.num_local_experts = 0  # nothing for DeepSpeed's per-expert checkpoint files to save or load

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups exist already (`create_groups`)

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-parallel marker is not a layer; the model's own MoE layers compute")

    return ExpertParallelMarker


@torch.no_grad()
def gather_experts(tensors: dict[str, torch.Tensor], names: set[str], groups: ExpertGroups) -> dict[str, torch.Tensor]:
    """`tensors` with each of `names` all-gathered over the expert group along dim 0 (collective: every rank of
    the group calls it with the same names, in any order)."""
    out = dict(tensors)
    for name in sorted(names & set(tensors)):
        local = tensors[name].contiguous()
        parts = [torch.empty_like(local) for _ in range(groups.size)]
        dist.all_gather(parts, local, group=groups.expert)
        out[name] = torch.cat(parts)
    return out


def saved_expert_parallel_size(step_dir: Path) -> int:
    """The expert-parallel size a checkpoint was written with (its recipe; 1 when it names none)."""
    import yaml

    recipe = step_dir / "recipe.yaml"
    if not recipe.is_file():
        return 1
    backend = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("backend") or {}
    return int(backend.get("expert_parallel_size") or 1)


# -- reading ZeRO-1/2 files -------------------------------------------------------------------------------------


def _rank_files(ds_dir: Path) -> list[Path]:
    found = {int(m.group(1)): p for p in ds_dir.iterdir() if (m := _RANK_FILE.search(p.name))}
    if not found or sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{ds_dir}: expected ZeRO-1/2 optimizer files for ranks 0..N-1, found ranks "
                              f"{sorted(found)}; the checkpoint is incomplete or not written at ZeRO-1/2")
    return [found[r] for r in range(len(found))]


def _model_states(ds_dir: Path) -> dict[str, Any]:
    files = sorted(ds_dir.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise CheckpointError(f"{ds_dir} holds no mp_rank_00_model_states.pt; the checkpoint is damaged")
    return torch.load(files[0], map_location="cpu", weights_only=False)


def read_zero12(ds_dir: Path, counts: dict[str, int], ep: int, keys: tuple[str, ...] = ("fp32", "exp_avg", "exp_avg_sq")
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """Every optimized parameter of a ZeRO-1/2 checkpoint written with expert-parallel size `ep`, full size:
    ({name: {key: tensor}}, {name: Adam step}, the optimizer's common state from rank 0's file).

    A dense parameter's fragments lie in the flat partitions of all ranks, in rank order. An expert parameter
    (`counts`: name -> experts) of a run with ep > 1 is partitioned over its expert-data group (the ranks
    e, e + ep, ... hold expert rank e's share), so its fragments are joined per expert rank and the shares
    concatenated along dim 0.
    """
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    files = _rank_files(ds_dir)
    world = len(files)
    if world % ep:
        raise CheckpointError(f"{ds_dir}: {world} rank files cannot come from expert-parallel size {ep}")
    shapes = {k: tuple(v) for group in _model_states(ds_dir)["param_shapes"] for k, v in group.items()}
    pieces: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    steps: dict[str, Any] = {}
    common: dict[str, Any] = {}
    for rank, path in enumerate(files):
        sd = torch.load(path, map_location="cpu", weights_only=False)[OPTIMIZER_STATE_DICT]
        if rank == 0:
            common = {k: v for k, v in sd.items()
                      if k not in (BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS)}
        state = sd[BASE_OPTIMIZER_STATE]["state"]
        for g, mapping in enumerate(sd[PARAM_SLICE_MAPPINGS]):
            flat = {"fp32": sd[SINGLE_PARTITION_OF_FP32_GROUPS][g],
                    **{k: state[g][k] for k in keys if k != "fp32" and k in state.get(g, {})}}
            for name, frag in mapping.items():
                by_key = pieces.setdefault(name, {})
                for key, tensor in flat.items():
                    by_key.setdefault(key, {})[rank] = tensor.narrow(0, frag.start, frag.numel).clone()
                if "step" in state.get(g, {}):
                    steps[name] = state[g]["step"]
        del sd
    full = {name: {key: _join(name, by_rank, shapes[name], ep if name in counts else 1, world)
                   for key, by_rank in by_key.items()} for name, by_key in pieces.items()}
    return full, steps, common


def _join(name: str, by_rank: dict[int, torch.Tensor], shape: tuple[int, ...], ep: int, world: int) -> torch.Tensor:
    shares = []
    for e in range(ep):
        flat = torch.cat([by_rank[r] for r in range(e, world, ep) if r in by_rank])
        if flat.numel() != torch.Size(shape).numel():
            raise CheckpointError(f"{name}: the ZeRO fragments of expert rank {e} hold {flat.numel()} values, its "
                                  f"shape {shape} needs {torch.Size(shape).numel()}; the checkpoint's expert-parallel "
                                  f"size is not {ep}")
        shares.append(flat.view(shape))
    return torch.cat(shares) if ep > 1 else shares[0]


def consolidated_state(ds_dir: Path, counts: dict[str, int], ep: int) -> dict[str, torch.Tensor]:
    """The full weights of an expert-parallel ZeRO-1/2 checkpoint, in the module's order: parameters from the
    fp32 master partitions of every rank, buffers from the model states (as saved: integers stay integers)."""
    states, _, _ = read_zero12(ds_dir, counts, ep, keys=("fp32",))
    model = _model_states(ds_dir)
    shared = model.get("shared_params") or {}
    out: dict[str, torch.Tensor] = {}
    for name, saved in model["module"].items():
        if name in states:
            out[name] = states[name]["fp32"].float()
        elif name in shared and shared[name] in states:
            out[name] = states[shared[name]]["fp32"].float()  # a tied weight, optimized under its other name
        elif name in counts:
            raise CheckpointError(f"{ds_dir}: expert tensor {name} has no fp32 partition; its other expert ranks' "
                                  "values are in no file")
        else:  # buffers, frozen parameters
            out[name] = saved.float() if saved.is_floating_point() else saved
    return out


# -- universal conversion ----------------------------------------------------------------------------------------


def write_universal(ds_dir: Path, out: Path, counts: dict[str, int], ep: int, param_groups: list[dict],
                    finish: Callable[[Path], None] | None = None) -> None:
    """Rank 0: DeepSpeed's universal checkpoint of ZeRO-1/2 files written at expert-parallel size `ep` (1 too),
    atomically into `out`: per parameter zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt, expert tensors whole
    ([E, ...], with `is_expert_param` and `ep_num_experts`: the loader takes its rank's share), the optimizer's
    common state with `param_groups` (the loading optimizer's, which the universal load copies onto its groups
    by position), and the model-states file. `finish(tmp)` may add or remove entries (a branch's fresh and
    dropped parameters) before the experts are marked."""
    from deepspeed.checkpoint.constants import CAT_DIM, EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS, PARAM, PARAM_GROUPS

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    states, steps, common = read_zero12(ds_dir, counts, ep)
    zero = tmp / "zero"
    for name, by_key in states.items():
        entry = zero / name
        entry.mkdir(parents=True)
        for key, tensor in by_key.items():
            torch.save({PARAM: tensor, CAT_DIM: 0}, entry / f"{key}.pt")
        if name in steps:
            torch.save(steps[name], entry / "step.pt")
    torch.save({**common, PARAM_GROUPS: param_groups}, zero / "optimizer_state.pt")
    for f in ds_dir.glob("*mp_rank_00_model_states.pt"):
        shutil.copy2(f, tmp / f.name)
    if finish is not None:
        finish(tmp)
    for name, experts in counts.items():
        for f in (zero / name).glob("*.pt") if (zero / name).is_dir() else ():
            if f.name == "step.pt":
                continue
            entry = torch.load(f, weights_only=False)
            if entry[PARAM].shape[0] != experts:
                raise CheckpointError(f"{name}: universal entry {f.name} has {entry[PARAM].shape[0]} experts on dim 0, "
                                      f"the model {experts}")
            torch.save({**entry, EP_IS_EXPERT_PARAM: True, EP_NUM_EXPERTS: experts}, f)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def universal_on_every_rank(root: Path, tag: str, rank: int, barrier: Callable[[], None],
                            convert: Callable[[Path], None]) -> Path:
    """Collective: rank 0 runs `convert(root / tag)` while the others poll for its result on the shared
    filesystem (a conversion can outlast a collective's timeout); a failure on rank 0 stops every rank.
    Returns `root`, the directory to load `tag` from."""
    failed, done = root / "FAILED", root / tag / "zero" / "optimizer_state.pt"
    if rank == 0:  # never reused: the conversion depends on the loading run (its groups, a branch's entries)
        failed.unlink(missing_ok=True)
        shutil.rmtree(root / tag, ignore_errors=True)
    barrier()  # so that no rank reads what an earlier attempt left
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            convert(root / tag)
        except Exception as exc:
            root.mkdir(parents=True, exist_ok=True)
            failed.write_text(f"{type(exc).__name__}: {exc}", encoding="utf-8")
            raise
    else:
        while not done.is_file():
            if failed.is_file():
                raise RuntimeError(f"rank 0 could not convert the checkpoint: {failed.read_text()}")
            time.sleep(1.0)
    barrier()
    return root


def global_shapes(shapes: dict[str, tuple[int, ...]], counts: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """`shapes` with every expert tensor's dim 0 the whole layer's experts (shapes comparable across sizes)."""
    return {n: (counts[n], *s[1:]) if n in counts else s for n, s in shapes.items()}
