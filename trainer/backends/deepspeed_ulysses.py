"""Sequence parallelism on the DeepSpeed backend: DeepSpeed-Ulysses (`deepspeed.sequence.layer.DistributedAttention`).

Groups of `backend.sequence_parallel` consecutive ranks split every row's sequence between them; DeepSpeed's own
`parallel_state_sp` makes the sequence-parallel groups (and the sequence+data-parallel group its engine reduces
gradients over), and its `DistributedAttention` exchanges heads for sequence around each attention layer (one
all-to-all before, one after): a rank holds 1/N of the tokens everywhere except inside attention, where it holds
1/N of the heads over the whole sequence, so communication per rank stays constant as the sequence and the ranks
grow together. Every rank of a group reads the same rows (the loader shards by data-parallel rank); the model sees
whole rows and computes its slice (`slimtrain.modules.transformer.sequence_shard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from slimtrain.modules.transformer.sequence_shard import contiguous_slice

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class UlyssesShard:
    """This rank's slice of the sequence in its sequence-parallel `group` of `size` ranks (`SequenceShard`)."""

    group: Any
    rank: int
    size: int

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous 1/size of dim 1."""
        return contiguous_slice(tensor, self.rank, self.size)

    def attention(self, local: Attend) -> Attend:
        """`local` (bound for the whole sequence) behind DeepSpeed's all-to-all: [B, S/N, H, D] in and out, the
        kernel running on [B, S, H/N, D]."""
        from deepspeed.sequence.layer import DistributedAttention

        # [batch, seq, heads, dim]: scatter the heads (2), gather the sequence (1); batch first (0).
        exchange = DistributedAttention(local, self.group, scatter_idx=2, gather_idx=1)
        return lambda q, k, v: exchange(q, k, v, 0)


def create_sequence_groups(size: int) -> UlyssesShard:
    """DeepSpeed's sequence-parallel groups of `size` consecutive ranks, and this rank's shard."""
    import deepspeed.comm as ds_dist
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    ds_dist.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False, verbose=False)
    parallel_state_sp.initialize_sequence_parallel(size)
    group = parallel_state_sp.get_sequence_parallel_group()
    return UlyssesShard(group, dist.get_rank(group=group), size)


def sequence_mpu() -> Any:
    """The `mpu` DeepSpeed's engine reads the sequence-parallel groups from."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    return parallel_state_sp
