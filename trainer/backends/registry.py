"""The engines a recipe's `backend: {type: ...}` can name: each with its config class and how to start it.

A new engine is a registration (`register_backend`), not an edit to the recipe schema or the command
line. The engine module itself is imported only when a run starts it, so validating a recipe never
imports DeepSpeed or megatron-core.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel

from slimtrain.core.registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from slimtrain.trainer.backends.base import Backend
    from slimtrain.trainer.recipe.schema import Recipe


def _no_check(recipe: "Recipe", checkpoint: Path, world_size: int) -> None:
    return None


@dataclass(frozen=True)
class BackendEntry:
    """One engine.

    config: its recipe block (a pydantic model with `type: Literal["name"]`, a `check_recipe(recipe)`
        method for what it refuses elsewhere in the recipe, and `data_parallel_size(world_size)`).
    start: (cfg=, train=, optim=) -> Backend, importing the engine when called.
    check_resumable: (recipe, checkpoint step dir, world size) -> None, raising RecipeError when this
        engine cannot load that checkpoint into that world (checked before any process starts).
    The rest as documented on each field.
    """

    config: type[BaseModel]
    start: Callable[..., "Backend"]
    check_resumable: Callable[["Recipe", Path, int], None] = _no_check
    prepare_process: Callable[[], None] = lambda: None
    """Called in each rank's process before torch.distributed starts (the engine's environment, its logging)."""
    read_weights: Callable[[Path, "Recipe", Any], dict] | None = None
    """(step dir, recipe, model config) -> the checkpoint's full fp32 weights, read offline (for export)."""
    memory: Callable[["Recipe", int, float], str] | None = None
    """(recipe, world size, GB per GPU) -> the per-GPU memory estimate `slimtrain validate --world-size` prints."""


BACKENDS: Registry[BackendEntry] = Registry("backend")


def register_backend(name: str, entry: BackendEntry) -> BackendEntry:
    """Register an engine under `name` (its config's `type:` must be `Literal[name]`)."""
    BACKENDS.register(name)(entry)
    return entry


def validate_backend_config(value: Any) -> BaseModel:
    """A recipe's `backend:` block -> the config class of the engine its `type:` names (default deepspeed)."""
    import slimtrain.trainer.backends  # noqa: F401  (registers the built-in engines)
    from slimtrain.modules.plugin_registry import check_unknown_keys

    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"backend is a mapping with a `type:` key (one of {BACKENDS.names()}); got {value!r}")
    name = str(value.get("type", "deepspeed"))
    try:
        config_cls = BACKENDS.get(name).config
    except UnknownNameError as exc:
        raise ValueError(str(exc)) from None
    check_unknown_keys(config_cls, value, "backend.")
    return config_cls.model_validate(value)
