"""The seam a backend uses to split each row's sequence over ranks (sequence parallelism, DeepSpeed-Ulysses).

The model stays single-device code: a backend that shards the sequence sets `Transformer.sequence_shard` to an
object with this protocol. The model is then called with whole rows (ids, positions, documents: every rank of the
group reads the same rows) and computes this rank's slice of the sequence; positions and document ids stay
global, so RoPE, document masks and sliding windows are exact across the slice boundaries. Each attention layer
runs through `attention(local)`, which exchanges heads for sequence (the backend's all-to-all) around `local`, the
model's own kernel bound for the whole sequence. The outputs (hidden states, logits) are this rank's slice: the
loss takes the same slice of the labels (`local`) and never builds whole-sequence logits.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch


class SequenceShard(Protocol):
    """This rank's share of the sequence: `size` ranks, this one is `rank`; slices are contiguous and equal."""

    size: int
    rank: int

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice of `tensor` along dim 1 (the sequence of [batch, seq, ...])."""
        ...

    def attention(self, local: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
                  ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """`attend(q, k, v)` over this rank's [batch, seq / size, heads, dim] that computes `local` over the whole
        sequence with heads / size heads per rank."""
        ...


def contiguous_slice(tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Slice `rank` of `size` equal contiguous slices of dim 1; the sequence must divide by `size`."""
    length = tensor.shape[1]
    if length % size:
        raise ValueError(f"a sequence of {length} tokens does not split into {size} equal slices; make data.seq_len "
                         f"a multiple of backend.sequence_parallel={size}")
    step = length // size
    return tensor[:, rank * step:(rank + 1) * step]
