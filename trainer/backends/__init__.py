"""Distributed engines behind the Backend protocol (DESIGN.md, seam 5), chosen by the recipe's `backend.type`."""

from __future__ import annotations

from pathlib import Path

from slimtrain.trainer.backends.base import Backend, LossFn, StepResult
from slimtrain.trainer.backends.deepspeed_config import DeepSpeedConfig
from slimtrain.trainer.backends.registry import BACKENDS, BackendEntry, register_backend

__all__ = ["Backend", "LossFn", "StepResult", "BACKENDS", "BackendEntry", "build_backend", "register_backend"]


def build_backend(name: str, **kwargs) -> Backend:
    """Start the registered engine `name` with the recipe's blocks (cfg=, train=, optim=)."""
    return BACKENDS.get(name).start(**kwargs)


def _start_deepspeed(**kwargs) -> Backend:
    # Imported here: `import slimtrain.trainer` never pulls DeepSpeed.
    from slimtrain.trainer.backends.deepspeed import DeepSpeedBackend

    return DeepSpeedBackend(**kwargs)


def _deepspeed_resumable(recipe, checkpoint: Path, world_size: int) -> None:
    from slimtrain.trainer.backends.deepspeed import DS_TAG, ds_config
    from slimtrain.trainer.backends.deepspeed_reshard import check_resumable_into

    # The stage the engine will run (backend.raw may override it), from the same generated ds_config.
    stage = ds_config(recipe.backend, recipe.train, recipe.optim, world_size)["zero_optimization"]["stage"]
    check_resumable_into(checkpoint / DS_TAG, stage, recipe.backend.precision, world_size)


register_backend("deepspeed", BackendEntry(config=DeepSpeedConfig, start=_start_deepspeed,
                                           check_resumable=_deepspeed_resumable))
