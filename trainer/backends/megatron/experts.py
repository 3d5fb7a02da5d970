"""Expert parallelism on the megatron backend (`backend.expert_parallel`): our MoE layers (any module implementing
`slimtrain.modules.expert_parallel.ExpertParallel`) on megatron-core's expert groups, DDP and optimizer.

- Groups: `initialize_model_parallel(expert_model_parallel_size=N, expert_tensor_parallel_size=tensor_parallel)`.
  With the expert-tensor size equal to the tensor size, an expert group holds ranks of the same tensor-parallel rank
  and different data-parallel ranks (consecutive ones), so the ranks exchanging tokens hold different tokens; the
  ranks of a tensor-parallel group (which compute the same MoE layer on the same tokens: its input is replicated
  there) run the same exchange in parallel groups of their own. Plugins get them as `process_groups["expert"]` and
  `["expert_data"]` (the ranks holding the same experts), and the MoE layer exchanges tokens through the backend's
  communicator over "expert": megatron's own token dispatchers are not used.
- Sharding: the build's parallelisation step calls `shard_experts` on the meta model, so each rank draws (or
  imports) its share of the whole experts.
- DDP: a parameter with `allreduce = False` is an expert parameter to megatron's DDP: its gradient goes to a buffer
  of its own, summed over the expert-data group and scaled by 1/data-parallel size before (like every other
  gradient, `average_in_collective` off), which with the backend's loss normalised by the global label count gives
  the mean over all tokens: the single-process gradient.
- Optimizer: `get_megatron_optimizer` builds a second optimizer for them (sharded over the expert-data group with
  the distributed optimizer) and chains it; the gradient norm adds the expert optimizer's, reduced over the
  expert-tensor-pipeline group (tp-ep-pp, which spans the expert ranks), to the dense one, so each expert counts
  once; our expert parameters carry no tensor-parallel mark, so a tensor-parallel replica counts once too; clipping
  uses that total norm on both.
- State: each rank saves its own share (backend.save); `expert_shards` says which parameters are shares of what,
  for the export (joined along dim 0 over the expert group) and for checkpoint code that must describe them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slimtrain.modules.context import Communicator
from slimtrain.modules.expert_parallel import expert_parameter_counts
from slimtrain.modules.transformer.sharding import Shard
from slimtrain.trainer.backends.expert_layers import EXPERT_DATA_GROUP, EXPERT_GROUP, shard_expert_layers



def process_groups(ps: Any) -> dict[str, Any]:
    """megatron's expert and expert-data-parallel groups under the names plugins know (`ps`: parallel_state)."""
    return {EXPERT_GROUP: ps.get_expert_model_parallel_group(), EXPERT_DATA_GROUP: ps.get_expert_data_parallel_group()}


def shard(model: nn.Module, comm: Communicator, rank: int, size: int) -> None:
    """The build's parallelisation step (meta model): every expert module keeps this rank's share of its experts
    and exchanges tokens over the communicator's "expert" group from now on."""
    shard_expert_layers(model, comm, rank, size, "backend.expert_parallel")


def mark(model: nn.Module) -> None:
    """Make megatron's DDP and optimizer treat the expert shares as expert parameters (after materialisation, which
    replaces the meta parameters, and before DDP)."""
    params = dict(model.named_parameters())
    for name in expert_parameter_counts(model):
        params[name].allreduce = False


def expert_shards(model: nn.Module, rank: int, size: int) -> dict[str, Shard]:
    """{parameter name: the share it holds} for every expert parameter of `model` split over `size` expert ranks
    (this one `rank`): slice `rank` of `size` along dim 0 of a [num_experts, ...] tensor. Empty when `size` is 1."""
    if size == 1:
        return {}
    params = dict(model.named_parameters())
    return {name: Shard(0, rank, size, (experts, *params[name].shape[1:]))
            for name, experts in expert_parameter_counts(model).items()}


@torch.no_grad()
def gather(share: torch.Tensor, shard: Shard, group: Any) -> torch.Tensor:
    """The whole tensor of which `share` is `shard`: every rank's share of the expert `group` all-gathered and joined
    along the shard's dim (collective: every rank of the group calls it for the same tensors in the same order)."""
    local = share.contiguous()
    parts = [torch.empty_like(local) for _ in range(shard.size)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=shard.dim)
