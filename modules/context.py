"""How a plugin talks to the other ranks without touching global distributed state (DESIGN.md, seam 3).

The backend hands every hook a `Communicator` that knows its process groups by name; modules/ only
ever calls it. `LocalCommunicator` is the single-process one (tests, export, a one-rank run).
"""

from __future__ import annotations

from typing import Literal, Protocol, Sequence

import torch

ReduceOp = Literal["sum", "max", "min", "mean"]


class Communicator(Protocol):
    """Collectives over a named process group of the backend ("data" is always there)."""

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum", group: str = "data") -> torch.Tensor:
        """Reduce `tensor` in place over the group's ranks and return it."""
        ...

    def size(self, group: str = "data") -> int:
        """Ranks in the group."""
        ...

    def rank(self, group: str = "data") -> int:
        """This process's rank within the group."""
        ...

    def all_to_all(self, tensor: torch.Tensor, output_splits: Sequence[int] | None = None,
                   input_splits: Sequence[int] | None = None, group: str = "expert") -> torch.Tensor:
        """Send `tensor`'s rows to the group's ranks and return the rows received, differentiably.

        Rows `input_splits[0]` go to rank 0, the next `input_splits[1]` to rank 1, ...; the result holds the
        `output_splits[i]` rows from rank i, in rank order (None: equal splits of dim 0 over the ranks). The
        gradient flows back by the reverse exchange, so every rank of the group must run the backward too.
        A new tensor (or `tensor` itself on one rank): callers must not modify it in place.
        """
        ...


class LocalCommunicator:
    """One process: every group holds this rank alone, so a reduction or an exchange leaves the tensor as it is."""

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum", group: str = "data") -> torch.Tensor:
        return tensor

    def size(self, group: str = "data") -> int:
        return 1

    def rank(self, group: str = "data") -> int:
        return 0

    def all_to_all(self, tensor: torch.Tensor, output_splits: Sequence[int] | None = None,
                   input_splits: Sequence[int] | None = None, group: str = "expert") -> torch.Tensor:
        for splits in (output_splits, input_splits):
            if splits is not None and list(splits) != [tensor.shape[0]]:
                raise ValueError(f"one rank exchanges all {tensor.shape[0]} rows with itself, got splits "
                                 f"{list(splits)}")
        return tensor
