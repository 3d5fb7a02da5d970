"""Distributed engines behind the Backend protocol (DESIGN.md, seam 5), chosen by the recipe's `backend.type`."""

from __future__ import annotations

from pathlib import Path

from slimtrain.trainer.backends.base import Backend, LossFn, StepResult
from slimtrain.trainer.backends.deepspeed_config import DeepSpeedConfig
from slimtrain.trainer.backends.megatron.config import MegatronConfig
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


def _deepspeed_process() -> None:
    # DeepSpeed picks its accelerator at import time; on a machine without CUDA it must be told "cpu".
    import logging
    import os
    import warnings

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Keep the console for our progress: DeepSpeed's info/warning chatter and torch's deprecation
    # notices about calls made inside DeepSpeed are not actionable for a user.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.ERROR)


def _deepspeed_weights(step_dir: Path, recipe, model_cfg) -> dict:
    from slimtrain.trainer.export.consolidate import consolidate

    return consolidate(step_dir, recipe.backend.zero_stage, recipe=recipe, model_cfg=model_cfg)


def _deepspeed_memory(recipe, world_size: int, gpu_gb: float) -> str:
    from slimtrain.trainer.env.memory import estimate, format_estimate, resolve_vocab_size

    return format_estimate(estimate(recipe, world_size, resolve_vocab_size(recipe)), recipe, world_size, gpu_gb)


register_backend("deepspeed", BackendEntry(config=DeepSpeedConfig, start=_start_deepspeed,
                                           check_resumable=_deepspeed_resumable, prepare_process=_deepspeed_process,
                                           read_weights=_deepspeed_weights, memory=_deepspeed_memory))


def _start_megatron(**kwargs) -> Backend:
    from slimtrain.trainer.backends.megatron.backend import MegatronBackend

    return MegatronBackend(**kwargs)


def _megatron_resumable(recipe, checkpoint: Path, world_size: int) -> None:
    import json

    from slimtrain.trainer.backends.megatron.backend import LAYOUT, MEGATRON_DIR
    from slimtrain.trainer.errors import RecipeError

    layout_file = checkpoint / MEGATRON_DIR / LAYOUT
    if not layout_file.is_file():
        raise RecipeError(f"{checkpoint} was not written by the megatron backend (no {MEGATRON_DIR}/{LAYOUT}); resume "
                          "it with the backend that wrote it")
    saved = json.loads(layout_file.read_text())
    now = {"tensor_parallel": recipe.backend.tensor_parallel, "pipeline_parallel": recipe.backend.pipeline_parallel,
           "expert_parallel": recipe.backend.expert_parallel, "world_size": world_size}
    then = {k: saved.get(k, 1) for k in now}
    if then != now:
        raise RecipeError(f"{checkpoint} was written at {then} and this run uses {now}: the megatron backend resumes "
                          "at the same layout so far; launch that layout")


def _megatron_process() -> None:
    import warnings

    # megatron-core warns at import that Transformer Engine and apex are missing: expected on CPU, not actionable.
    warnings.filterwarnings("ignore", module=r"megatron\.core")


def _megatron_weights(step_dir: Path, recipe, model_cfg) -> dict:
    from slimtrain.trainer.backends.megatron.backend import read_weights

    return read_weights(step_dir)


def _megatron_memory(recipe, world_size: int, gpu_gb: float) -> str:
    from slimtrain.trainer.backends.megatron.memory import estimate_text

    return estimate_text(recipe, world_size, gpu_gb)


register_backend("megatron", BackendEntry(config=MegatronConfig, start=_start_megatron,
                                          check_resumable=_megatron_resumable, prepare_process=_megatron_process,
                                          read_weights=_megatron_weights, memory=_megatron_memory))
