"""`Shard`: a tensor-parallel slice taken from a whole tensor and joined back (what init, import and export do)."""

from __future__ import annotations

import torch

from slimtrain.modules.transformer.sharding import Shard


def test_slices_join_back_into_the_whole_tensor() -> None:
    whole = torch.arange(24.0).reshape(4, 6)
    shards = [Shard(1, rank, 2, (4, 6)) for rank in range(2)]
    parts = [s.take(whole) for s in shards]
    assert torch.equal(parts[1], whole[:, 3:]) and torch.equal(shards[0].join(parts), whole)


def test_a_flat_tensor_laid_out_as_a_matrix_is_split_along_the_matrix_columns() -> None:
    """QAT's step gains of a row-parallel weight: one per [row, group], stored flat; each rank holds its columns."""
    matrix = torch.arange(24.0).reshape(4, 6)
    shards = [Shard(1, rank, 2, (24,), view=(4, 6)) for rank in range(2)]
    parts = [s.take(matrix.reshape(-1)) for s in shards]
    assert torch.equal(parts[0], matrix[:, :3].reshape(-1)) and torch.equal(parts[1], matrix[:, 3:].reshape(-1))
    assert torch.equal(shards[1].join(parts), matrix.reshape(-1))
