"""The seam through which a backend spreads a module's routed experts over ranks (expert parallelism).

The model is single-device code (DESIGN.md, seam 3): a module with experts holds all of them until a backend
decides otherwise. A module that can hold a share of its experts implements `ExpertParallel`:

    num_experts                        the experts of the whole module, over all ranks
    shard_experts(comm, group, r, n)   from now on hold only experts [r*E/n, (r+1)*E/n) and exchange tokens with
                                       the other ranks of `group` through `comm` in every forward (collective:
                                       every rank of the group runs the forward together)
    expert_parameters()                its parameters whose dim 0 indexes experts ({name in the module: parameter}):
                                       [E/n, ...] once sharded, [E, ...] before

A backend calls `shard_experts` after the plugins applied and before the weights are materialised (the model
is on the meta device then, so no memory was ever spent on the other ranks' experts). The module keeps its
parameter names and keeps using the communicator it was given; it never looks at global distributed state.
Initialisation stays the backend-free one: a plugin draws the full [E, ...] tensors and keeps its slice
(`expert_slice`), so that any expert-parallel size starts from the same weights.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from slimtrain.modules.context import Communicator


@runtime_checkable
class ExpertParallel(Protocol):
    """A module whose experts a backend can spread over the ranks of a group (see the module docstring)."""

    @property
    def num_experts(self) -> int:
        """Experts of the whole module (over all ranks of its group)."""
        ...

    def shard_experts(self, comm: Communicator, group: str, rank: int, size: int) -> None:
        """Hold experts [rank*E/size, (rank+1)*E/size) only, exchanging tokens over `comm`'s `group` (of `size`
        ranks, this one `rank`). Raises ValueError naming what prevents it (e.g. E not divisible by size)."""
        ...

    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """{name within the module: parameter} of the tensors whose dim 0 indexes this rank's experts."""
        ...


def expert_modules(model: nn.Module) -> list[tuple[str, ExpertParallel]]:
    """(qualified name, module) of every module of `model` that implements `ExpertParallel`, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertParallel)]


def expert_parameter_counts(model: nn.Module) -> dict[str, int]:
    """{qualified parameter name: experts of its whole module} for every expert tensor of `model` (dim 0 of the
    full tensor is that many experts, whatever share this rank holds)."""
    out: dict[str, int] = {}
    for name, module in expert_modules(model):
        prefix = f"{name}." if name else ""
        out.update({prefix + p: module.num_experts for p in module.expert_parameters()})
    return out
