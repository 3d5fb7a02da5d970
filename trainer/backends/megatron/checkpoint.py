"""Checkpoints of the megatron backend through megatron-core's `dist_checkpointing` (torch_dist format).

Every tensor is saved under its model's own name (`model.layers.0.attn.q_proj.weight`) as a `ShardedTensor`: the
slice this rank holds and where it sits in the whole tensor (its tensor-parallel `Shard`), so that a checkpoint
written at one layout loads at another: tensor, pipeline and data-parallel sizes may all change between save and
resume. The optimizer state follows the same keys (megatron's `optimizer.sharded_state_dict`); the distributed
optimizer's in its `fully_reshardable` form, the one megatron-core reshards over every dimension.

`layout.json` records the layout a checkpoint was written at; `read_weights` reads the whole fp32 weights back
without megatron-core or a process group (torch's own distributed-checkpoint reader), for `slimtrain export`.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slimtrain.modules.transformer.sharding import Shard, shard_of

MEGATRON_DIR = "megatron"  # sub-directory of a checkpoint step directory that holds this backend's files
LAYOUT = "layout.json"
MODEL_PREFIX = "model."
# A checkpoint key: a model tensor (`model.<name>`) or an optimizer's state of it (`optimizer.state.<kind>.model.<name>`),
# prefixed `chained_<i>.` when megatron chains optimizers (the experts' own, with expert parallelism).
KEY = re.compile(r"^(?:chained_\d+\.)?(?:optimizer\.state\.(?P<kind>\w+)\.)?model\.(?P<name>.+)$")
MASTERS = ("fp32_param", "param")  # the kinds holding fp32 masters of bf16 weights (plain; distributed optimizer)
DISTOPT_SHARDING = "fully_reshardable"
TIED_HEAD, TIED_EMBEDDING = "lm_head.weight", "embed.weight"


def model_sharded_state(model: nn.Module, tp_rank: int, dp_rank: int, experts: dict[str, Shard] | None = None,
                        expert_data_rank: int = 0, tp_group: Any = None) -> dict[str, Any]:
    """{name: ShardedTensor} of `model`'s parameters and persistent buffers on this rank: a tensor-parallel slice at
    its offset in the whole tensor (one copy per data-parallel replica), a whole tensor once per replica, an expert
    parameter's share (`experts`: expert parallelism) at its experts' offset, once per expert-data replica. The
    tensors are the model's own (megatron's optimizer finds its state by them; a load writes into them).

    A head tied to the embedding is saved under the embedding's name, once: at one stage it is the same tensor, and
    with pipeline stages the last stage's copy is a replica of the first's, so any layout finds it under one key."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out: dict[str, Any] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        # megatron's layers keep an `_extra_state` entry of their own; a tied tensor appears under both names
        if not isinstance(tensor, torch.Tensor) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        copy = 0
        if name == TIED_HEAD and model.cfg.tie_embeddings:
            name, copy = TIED_EMBEDDING, int(model.embed is None)
        shard = shard_of(tensor)
        key = MODEL_PREFIX + name
        if name in (experts or {}):  # the MoE layer is whole on every tensor-parallel rank
            share = experts[name]
            out[name] = ShardedTensor.from_rank_offsets(key, tensor, (share.dim, share.rank, share.size),
                                                        replica_id=(copy, tp_rank, expert_data_rank))
        elif shard is not None and shard.view is not None:
            out[name] = _whole_factory(key, tensor, shard, tp_group, replica_id=(copy, tp_rank, dp_rank))
        elif shard is None:
            out[name] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=(copy, tp_rank, dp_rank))
        else:
            out[name] = ShardedTensor.from_rank_offsets(key, tensor, (shard.dim, shard.rank, shard.size),
                                                        replica_id=(copy, 0, dp_rank))
    return out


def _whole_factory(key: str, tensor: torch.Tensor, shard: Shard, group: Any, replica_id: tuple) -> Any:
    """A slice taken along a dim of the whole tensor seen as another shape (`Shard.view`: QAT's 1-D step gains laying
    out [rows, groups]) is no block of the tensor: it is saved whole (joined over the tensor-parallel group; these
    tensors are small), and a load keeps this rank's slice of it. Through megatron's ShardedTensorFactory, whose data
    stays the parameter, so the optimizer finds its state by it (and saves that state the same way)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def build(key: str, data: torch.Tensor, replica_id: tuple, flattened_range: Any) -> Any:
        parts = [torch.empty_like(data) for _ in range(shard.size)]
        dist.all_gather(parts, data.detach().contiguous(), group=group)
        return ShardedTensor.from_rank_offsets(key, shard.join(parts), replica_id=replica_id)

    return ShardedTensorFactory(key, tensor, build, shard.take, replica_id)


def _sharded_state(backend: Any, loading: bool) -> dict[str, Any]:
    model_sd = model_sharded_state(backend.model, backend.tp_rank, backend.dp_rank, backend.expert_shards(),
                                   backend.ps.get_expert_data_parallel_rank(), backend.process_groups["tensor"])
    metadata = {"distrib_optim_sharding_type": DISTOPT_SHARDING}
    if loading:
        _allocate_optimizer_state(backend.optimizer)
    optimizer_sd = backend.optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=metadata)
    # Plain values are megatron's "common" state: written once (rank 0), read by every rank.
    return {"model": model_sd, "optimizer": optimizer_sd, "scheduler": backend.scheduler.state_dict(),
            "steps_done": backend.steps_done}


def _allocate_optimizer_state(optimizer: Any) -> None:
    """The distributed optimizer describes its state from the state it holds: a fresh one (a resume) must allocate
    it first. megatron-core's own way is a step on zero gradients; the loaded values then replace all of it."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values"):
            if not inner.optimizer.state:
                # At learning rate 0 the zero-gradient step leaves the master weights as they are: a branch's fresh
                # parameters keep their built values.
                groups = inner.optimizer.param_groups
                lrs = [g["lr"] for g in groups]
                for g in groups:
                    g["lr"] = 0.0
                inner._init_optimizer_states_with_dummy_values()
                for g, lr in zip(groups, lrs):
                    g["lr"] = lr
            _keep_adam_step(inner)


def _keep_adam_step(inner: Any) -> None:
    """megatron-core (0.16) with torch's Adam, as without apex or Transformer Engine: its reshardable loaders skip
    Adam's per-parameter `step` (restored from the param groups already), then copy every key of the parameter's
    state, `step` included, and fail on the missing key. Hand them back the step the state already holds."""
    if getattr(inner, "_slimtrain_keeps_step", False) or inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return
    set_states = inner._set_main_param_and_optimizer_states

    def with_step(model_param: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
        group, order = inner.model_param_group_index_map[model_param]
        held = inner.optimizer.state[inner.optimizer.param_groups[group]["params"][order]]
        if "step" in held and "step" not in tensors:
            tensors = {**tensors, "step": held["step"]}
        set_states(model_param, tensors)

    inner._set_main_param_and_optimizer_states = with_step
    inner._slimtrain_keeps_step = True


def _own_adam_steps(optimizer: Any) -> None:
    """megatron-core's distributed optimizer, with torch's Adam, restores `step` as ONE tensor shared by every
    parameter's state; torch's Adam increments each parameter's step in place, so the shared one would advance once
    per parameter per step. Give each parameter its own copy (the value is the same)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = getattr(inner, "optimizer", None)
        for state in getattr(torch_optimizer, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def save(backend: Any, directory: Path) -> None:
    """Collective: every rank writes its slices of the model and optimizer into `directory/megatron`; rank 0 the
    layout."""
    from megatron.core import dist_checkpointing

    out = directory / MEGATRON_DIR
    out.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the directory exists before any rank writes (dist_checkpointing checks it)
    dist_checkpointing.save(_sharded_state(backend, loading=False), str(out))
    if backend.rank == 0:
        (out / LAYOUT).write_text(json.dumps(layout_of(backend), indent=1))


def layout_of(backend: Any) -> dict[str, Any]:
    """The layout a checkpoint is written at (what a resume compares with its own)."""
    return {"format": "dist_checkpointing", "tensor_parallel": backend.cfg.tensor_parallel,
            "pipeline_parallel": backend.pp, "data_parallel": backend.dp_size, "world_size": backend.world_size,
            "expert_parallel": backend.cfg.expert_parallel, "distributed_optimizer": backend.cfg.distributed_optimizer,
            "precision": backend.cfg.precision}


def load(backend: Any, directory: Path, fresh: frozenset[str] = frozenset()) -> None:
    """Collective: restore what `save` wrote, at this run's layout (megatron-core reshards it). `fresh` (a branch):
    parameters the checkpoint lacks, which keep their built values and start with zero moments. The recipe's
    learning rates, betas and eps apply from here on (unchanged ones give the same values: an exact resume stays
    exact)."""
    from megatron.core import dist_checkpointing

    state = _sharded_state(backend, loading=True)
    recipe_lrs = list(backend.scheduler.base_lrs)
    # A fresh parameter's tensors (its weight; its moments and master in the optimizer's keys) are not read: they
    # keep what the build and the optimizer's initialisation gave them, put back into what the load returns.
    converted = _lists_as_dicts(state) if fresh else []
    kept = _take_fresh(state, set(fresh))
    own = backend.model.state_dict(keep_vars=True)
    with torch.no_grad():  # the loaded values are written into the parameters themselves
        loaded = dist_checkpointing.load(state, str(directory / MEGATRON_DIR))
        for path, key, tensor in kept:
            _put(loaded, path, _fresh_value(key, tensor, own))
        _dicts_as_lists(loaded, converted)
        _copy_into(backend.model, loaded["model"])
    backend.optimizer.load_state_dict(loaded["optimizer"])
    _own_adam_steps(backend.optimizer)
    backend.scheduler.load_state_dict(loaded["scheduler"])
    _apply_recipe(backend, recipe_lrs)
    backend.steps_done = loaded["steps_done"]


def _fresh_value(key: str, tensor: torch.Tensor, own: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a fresh tensor starts as: the model's own value for its weight and for the optimizer's fp32 master of
    it, zeros for its moments (the optimizer's buffers for a load are not filled with anything)."""
    match = KEY.match(key)
    if match["kind"] is None:
        return tensor
    if match["kind"] in MASTERS:
        return own[match["name"]].detach().to(tensor.dtype).reshape(tensor.shape).clone()
    return torch.zeros_like(tensor)


def _take_fresh(tree: Any, names: set[str], path: tuple = ()) -> list[tuple[tuple, str, torch.Tensor]]:
    """Remove from the nested sharded state `tree` (dicts only: see `_lists_as_dicts`) every tensor of a parameter
    named in `names` (a fresh parameter's weight, moments or master); returns (where it was, its key, its tensor)."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    taken: list[tuple[tuple, str, torch.Tensor]] = []
    if not names or not isinstance(tree, dict):
        return taken
    for key, value in list(tree.items()):
        if isinstance(value, ShardedBase) and (match := KEY.match(value.key)) and match["name"] in names:
            taken.append(((*path, key), value.key, value.data))
            del tree[key]
        else:
            taken += _take_fresh(value, names, (*path, key))
    return taken


def _lists_as_dicts(tree: Any, path: tuple = ()) -> list[tuple]:
    """In place: every list of `tree` holding sharded tensors becomes a dict by index, so that an entry can leave it
    without shifting the others (the bf16 optimizer keeps its fp32 masters in lists of lists). Returns the paths
    converted, outermost first, for `_dicts_as_lists`."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    def sharded(x: Any) -> bool:
        items = x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()
        return isinstance(x, ShardedBase) or any(sharded(v) for v in items)

    converted: list[tuple] = []
    if isinstance(tree, dict):
        for key, value in list(tree.items()):
            if isinstance(value, list) and sharded(value):
                tree[key] = dict(enumerate(value))
                converted.append((*path, key))
            converted += _lists_as_dicts(tree[key], (*path, key))
    return converted


def _dicts_as_lists(tree: Any, converted: list[tuple]) -> None:
    """Undo `_lists_as_dicts` on what the load returned (innermost first)."""
    for path in reversed(converted):
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        held = parent[path[-1]]
        parent[path[-1]] = [held[i] for i in sorted(held)]


def _put(tree: Any, path: tuple, value: torch.Tensor) -> None:
    for key in path[:-1]:  # a dict left empty by `_take_fresh` does not come back from the load
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _apply_recipe(backend: Any, base_lrs: list[float]) -> None:
    """After a load, which restored the checkpoint's settings: this recipe's learning rates at the schedule position
    reached, and its betas and eps (weight decay and the learning rate are written before every step anyway)."""
    sched, o = backend.scheduler, backend.optim_cfg
    sched.base_lrs = list(base_lrs)
    sched._last_lr = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group in backend.optimizer.param_groups:
        group.update(betas=tuple(o.betas), eps=o.eps)


def _copy_into(model: nn.Module, loaded: dict[str, torch.Tensor]) -> None:
    own = model.state_dict(keep_vars=True)
    if model.cfg.tie_embeddings and model.embed is None:  # the last stage's copy of a tied embedding
        own[TIED_EMBEDDING] = own[TIED_HEAD]
    for name, tensor in loaded.items():
        if own[name] is not tensor:
            own[name].copy_(tensor)


def read_layout(step_dir: Path) -> dict[str, Any] | None:
    """The layout a checkpoint was written at, or None when the megatron backend did not write it."""
    path = step_dir / MEGATRON_DIR / LAYOUT
    return json.loads(path.read_text()) if path.is_file() else None


def check_resumable(recipe: Any, checkpoint: Path) -> None:
    """Before launch: refuse a checkpoint this run cannot load. Any tensor / pipeline / data-parallel layout loads
    (megatron-core reshards it); the optimizer's kind and the precision must stay, as each keeps its fp32 masters and
    moments under keys of its own, and so must the expert-parallel size (megatron chains a second optimizer for the
    experts' shares when they are split, whose state does not map onto one optimizer's)."""
    from slimtrain.trainer.errors import RecipeError

    saved = read_layout(checkpoint)
    if saved is None:
        raise RecipeError(f"{checkpoint} was not written by the megatron backend (no {MEGATRON_DIR}/{LAYOUT}); resume "
                          "it with the backend that wrote it")
    if saved.get("format") != "dist_checkpointing":
        raise RecipeError(f"{checkpoint} holds per-rank files of an earlier megatron backend, which this version "
                          "does not read; export it with the version that wrote it and continue from the export "
                          "(checkpoint.init_from_hf)")
    for field in ("distributed_optimizer", "precision", "expert_parallel"):
        then, now = saved.get(field), getattr(recipe.backend, field)
        if then is not None and then != now:
            raise RecipeError(f"backend.{field}={now}, but {checkpoint} was written with {field}={then}: megatron's "
                              f"optimizer state does not convert between them; resume with backend.{field}={then}")


def read_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 weights of a megatron checkpoint in the model's names, read offline (no process group, no
    megatron-core): every tensor under `model.`, the optimizer's fp32 master in place of a bf16 weight."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(step_dir / MEGATRON_DIR))
    stored = reader.read_metadata().state_dict_metadata
    wanted = {k: (m, match) for k, m in stored.items() if isinstance(m, TensorStorageMetadata)
              and (match := KEY.match(k)) and match["kind"] in (None, *MASTERS)}
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, (m, _) in wanted.items()}
    with warnings.catch_warnings():  # "no process group: loading in a single process", which is the intent
        warnings.simplefilter("ignore", UserWarning)
        load(state, storage_reader=reader, no_dist=True)
    out = {match["name"]: state[k] for k, (_, match) in wanted.items() if match["kind"] is None}
    out.update({match["name"]: state[k] for k, (_, match) in wanted.items() if match["kind"] is not None})
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}
