"""What every backend with expert parallelism does the same way: spread each expert layer over an "expert" group."""

from __future__ import annotations

from torch import nn

from slimtrain.modules.context import Communicator
from slimtrain.modules.expert_parallel import expert_modules
from slimtrain.trainer.errors import RecipeError

EXPERT_GROUP, EXPERT_DATA_GROUP = "expert", "expert_data"  # their names in a backend's process groups


def shard_expert_layers(model: nn.Module, comm: Communicator, rank: int, size: int, field: str) -> None:
    """The build's parallelisation step (meta model): every `ExpertParallel` module keeps this rank's share of its
    experts (a plugin's transform of them carried over) and exchanges tokens over `comm`'s "expert" group from now
    on. `field` names the recipe setting in errors (the backend's expert-parallel size)."""
    found = expert_modules(model)
    if not found:
        raise RecipeError(f"{field}={size} but the model has no layer with experts to spread over ranks; add the moe "
                          f"plugin or set {field}=1")
    for name, module in found:
        try:
            module.shard_experts(comm, EXPERT_GROUP, rank, size)
        except ValueError as exc:
            raise RecipeError(f"{field}={size}: {name}: {exc}") from None
