"""`checkpoint.branch_from` on the megatron backend: another run's megatron checkpoint under this run's recipe.

What the source holds carries over as in a resume (weights, optimizer moments and step, the schedule position), at
this run's layout (dist_checkpointing reshards it); a parameter the recipe adds (a plugin's) keeps its built value
and starts with zero moments; source parameters a plugin consumed at the build (the dense MLP the MoE plugin
upcycled into experts) are left unread. Learning rates and the optimizer's settings follow this recipe. The source
is only read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from slimtrain.modules.expert_parallel import expert_parameter_counts
from slimtrain.modules.transformer.sharding import shard_of
from slimtrain.trainer.backends.deepspeed_branch import fresh_parameters
from slimtrain.trainer.backends.megatron import checkpoint
from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.lifecycle.branch import FIELD


def saved_shapes(step_dir: Path) -> dict[str, tuple[int, ...]]:
    """{model name: whole shape} of every tensor a megatron checkpoint holds (read from its metadata alone)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if checkpoint.read_layout(step_dir) is None:
        raise RecipeError(f"{FIELD}={str(step_dir)!r} was not written by the megatron backend; branch from a "
                          "megatron run's checkpoint, or start from an export of it (checkpoint.init_from_hf)")
    stored = FileSystemReader(str(step_dir / checkpoint.MEGATRON_DIR)).read_metadata().state_dict_metadata
    prefix = checkpoint.MODEL_PREFIX
    return {k[len(prefix):]: tuple(m.size) for k, m in stored.items()
            if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}


def whole_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: whole shape} of `model`'s parameters on this rank, as a checkpoint names them: tensor-parallel slices
    and expert shares at their whole size, a tied head under the embedding's name."""
    experts = expert_parameter_counts(model)
    out = {}
    for name, param in model.named_parameters():
        shard = shard_of(param)
        shape = tuple(shard.full_shape) if shard is not None else tuple(param.shape)
        if name in experts:
            shape = (experts[name], *shape[1:])
        if name == checkpoint.TIED_HEAD and model.cfg.tie_embeddings:
            name = checkpoint.TIED_EMBEDDING
        out[name] = shape
    return out


def branch(backend: Any, directory: Path) -> list[str]:
    """Collective: load `directory` into this run's model and optimizer, keeping what the recipe adds fresh. Returns
    the fresh parameters' names (each rank: its stage's)."""
    layout = checkpoint.read_layout(directory) or {}
    if layout.get("expert_parallel", 1) != backend.cfg.expert_parallel:
        raise RecipeError(f"backend.expert_parallel={backend.cfg.expert_parallel}, but {FIELD}={str(directory)!r} was "
                          f"written at expert_parallel={layout.get('expert_parallel', 1)}: megatron chains a second "
                          "optimizer for split experts, whose state a branch cannot take from one optimizer's; branch "
                          f"at backend.expert_parallel={layout.get('expert_parallel', 1)}")
    model = backend.model
    buffers = {n for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)} - dict(model.named_parameters()).keys()
    stored = saved_shapes(directory)
    saved = {k: v for k, v in stored.items() if k not in buffers}
    consumed = backend.consumed_from(directory)
    stage = whole_shapes(model)
    current = dict(stage)
    if backend.pp > 1:  # a rank holds its stage's parameters: the model's are every stage's
        stages: list = [None] * backend.pp
        dist.all_gather_object(stages, stage, group=backend.process_groups["pipeline"])
        current = {k: v for held in stages for k, v in held.items()}
    fresh = [n for n in fresh_parameters(saved, current, directory, consumed) if n in stage]
    # A buffer the recipe adds (a plugin's state, e.g. the MoE router's bias) keeps its built value too.
    checkpoint.load(backend, directory, fresh=frozenset(fresh) | (buffers - stored.keys()))
    return fresh
