"""How a plugin talks to the other ranks without touching global distributed state (DESIGN.md, seam 3).

The backend hands every hook a `Communicator` that knows its process groups by name; modules/ only
ever calls it. `LocalCommunicator` is the single-process one (tests, export, a one-rank run).
"""

from __future__ import annotations

from typing import Literal, Protocol

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


class LocalCommunicator:
    """One process: every group holds this rank alone, so a reduction leaves the tensor as it is."""

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum", group: str = "data") -> torch.Tensor:
        return tensor

    def size(self, group: str = "data") -> int:
        return 1

    def rank(self, group: str = "data") -> int:
        return 0
