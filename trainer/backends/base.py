"""The Backend protocol: what the loop needs from a distributed engine, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import torch
from torch import nn

from slimtrain.data.batch import Batch
from slimtrain.modules.context import Communicator
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.trainer.loss.cross_entropy import CrossEntropySum

if TYPE_CHECKING:
    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.trainer.backends.build import ModelInit

# (model, batch, label_norm) -> (loss to backpropagate, sum of the token losses as a float tensor,
# named extra terms for logging). label_norm turns sums into the mean over the global step.
LossFn = Callable[[nn.Module, Batch, float], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepResult:
    """What one optimizer step produced, reduced over all ranks."""

    loss: float
    """Mean token loss over the global batch."""
    tokens: int
    """Real tokens processed over all ranks."""
    grad_norm: float | None
    """Global gradient norm before clipping (None when the engine does not report it)."""
    lr: float
    """Learning rate used for this step."""
    applied: bool
    """False when the step was skipped (non-finite loss or gradients)."""
    extras: dict[str, float]
    """Named loss terms (e.g. plugin losses), averaged over the step."""


class Backend(Protocol):
    """A distributed engine. Parameter names in `full_state_dict` are the model's own, backend-free.

    The backend owns the build (`build_model`, in the order of `slimtrain.trainer.backends.build`), says
    which ranks hold replicas of the data (`dp_rank`, `dp_size`: loaders shard by them and gradient
    accumulation is computed from them), and hands plugins its process groups through `comm`.
    """

    rank: int
    world_size: int
    device: torch.device
    comm: Communicator
    """Collectives over the named groups below, for plugins (`PluginContext.comm`)."""
    process_groups: Mapping[str, Any]
    """Named process groups: "data" always (the data-parallel replicas); with expert parallelism "expert" (the
    ranks that split a layer's experts between them: tokens are exchanged there) and "expert_data" (the ranks
    holding the same experts as this one: their gradients are reduced there); "sequence", ... where the engine
    has them."""
    cross_entropy: CrossEntropySum | None
    """The engine's own loss over logits (a vocabulary-parallel cross-entropy over sharded logits); None
    takes the trainer's fp32 one (compiled under train.compile)."""

    @property
    def dp_rank(self) -> int: ...

    @property
    def dp_size(self) -> int: ...

    @property
    def module(self) -> nn.Module:
        """The model inside the engine (after `setup`)."""
        ...

    def build_model(self, model_cfg: ModelConfig, plugins: "PluginStack", init: "ModelInit") -> nn.Module:
        """This rank's model: meta build, plugins applied, parallelised, materialised and initialised."""
        ...

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None: ...

    def train_step(self, micro_batches: list[Batch], loss_fn: LossFn) -> StepResult: ...

    def eval_step(self, batch: Batch, loss_fn: LossFn) -> tuple[float, int, dict[str, float]]:
        """(sum of token losses, label tokens, plugin loss terms) of one micro-batch on this rank."""
        ...

    def all_reduce_sum(self, values: list[float]) -> list[float]: ...

    def barrier(self) -> None: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...

    def branch(self, directory: Path, scratch: Path) -> list[str]:
        """Load another run's checkpoint into this run's model and recipe: what it holds carries over, the
        model's other parameters start fresh (their names are returned), learning rates follow the recipe.
        `scratch` is this run's to use for derived files."""
        ...

    def full_state_dict(self) -> dict[str, torch.Tensor]: ...
