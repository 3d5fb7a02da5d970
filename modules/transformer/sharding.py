"""How a tensor-parallel backend tells the model that a parameter holds a slice of a larger tensor.

A backend that shards a projection or the embedding over ranks marks each sharded parameter with
`mark_shard(param, Shard(dim, rank, size, full_shape))`. The model then stays correct without knowing the backend:
`init_weights` draws the whole tensor from the seed and keeps this rank's slice (so a sharded model starts with
the single-device model's weights, bitwise), and an import slices a whole checkpoint tensor the same way
(`shard_of`). Slices are contiguous and equal along `dim`, the layout megatron-core's column- and row-parallel
layers and its vocabulary-parallel embedding use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ATTRIBUTE = "slimtrain_shard"


@dataclass(frozen=True)
class Shard:
    """Slice `rank` of `size` equal slices along `dim` of a tensor of `full_shape`."""

    dim: int
    rank: int
    size: int
    full_shape: tuple[int, ...]
    view: tuple[int, ...] | None = None
    """Slices taken along `dim` of the whole tensor seen as this shape (same elements, in order), each kept
    flat: a 1-D tensor that lays out a matrix (QAT's step gains, one per [row, group] of a weight whose columns
    are split). None: slices of the tensor itself."""

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of `full` (which must have `full_shape`)."""
        if tuple(full.shape) != self.full_shape:
            raise ValueError(f"a tensor of shape {tuple(full.shape)} cannot be sliced for a parameter that holds "
                             f"slice {self.rank} of {self.size} of a {self.full_shape} tensor")
        if self.view is None:
            return full.chunk(self.size, dim=self.dim)[self.rank]
        return full.reshape(self.view).chunk(self.size, dim=self.dim)[self.rank].reshape(-1)

    def join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The whole tensor from every rank's slice, in rank order (what `take` undoes)."""
        if self.view is None:
            return torch.cat(parts, dim=self.dim)
        local = list(self.view)
        local[self.dim] //= self.size
        return torch.cat([p.reshape(local) for p in parts], dim=self.dim).reshape(self.full_shape)


def mark_shard(param: torch.Tensor, shard: Shard) -> None:
    """Record that `param` holds `shard` of its whole tensor."""
    setattr(param, _ATTRIBUTE, shard)


def shard_of(param: torch.Tensor) -> Shard | None:
    """The slice `param` holds, None for a whole tensor."""
    return getattr(param, _ATTRIBUTE, None)
