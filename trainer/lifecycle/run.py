"""Assemble one rank's run from a recipe: data, model, optimizer, backend, loaders."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from slimtrain.data.batch import Batch
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.trainer.backends import Backend, build_backend
from slimtrain.trainer.backends.build import ModelInit
from slimtrain.trainer.lifecycle.branch import check_model_sources
from slimtrain.trainer.recipe.schema import Recipe
from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.optim import build_optimizer, build_scheduler


@dataclass
class RunParts:
    """Everything the loop needs, built for this rank."""

    model_cfg: ModelConfig
    backend: Backend
    train_loader: Any
    make_val_loader: Callable[[], Iterable[Batch]]
    grad_accum: int
    prepared: Any
    plugins: PluginStack = field(default_factory=PluginStack)
    """The recipe's plugins in composition order, applied to the model."""

    @property
    def tokenizer_dir(self) -> Path:
        """Directory of the tokenizer files (copied into every checkpoint)."""
        return Path(self.prepared.tokenizer.tokenizer_dir)

    @property
    def tokenizer_ids(self) -> dict[str, int | None]:
        """Special-token ids that the exported config must carry."""
        tok = self.prepared.tokenizer
        return {"eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id}


def resolve_model_config(recipe: Recipe, vocab_size: int) -> ModelConfig:
    """The model config with the vocabulary taken from the tokenizer when the recipe leaves it null."""
    cfg = recipe.model
    if cfg.vocab_size is None:
        return cfg.model_copy(update={"vocab_size": vocab_size})
    if cfg.vocab_size < vocab_size:
        raise RecipeError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size} tokens; "
            "set model.vocab_size to null (use the tokenizer's) or to at least the tokenizer size"
        )
    return cfg


def prepare_data(recipe: Recipe, rank: int, barrier: Callable[[], None]):
    """Rank 0 tokenizes and writes shards (if missing) while the others wait, then all open them."""
    from slimtrain.data import prepare

    if rank == 0:
        prepared = prepare(recipe.data, progress=True)
        barrier()
        return prepared
    barrier()
    return prepare(recipe.data, progress=False)


def build_parts(recipe: Recipe) -> RunParts:
    """Called on every rank after torch.distributed is initialised. The backend builds the model
    (`slimtrain.trainer.backends.build`); loaders shard by its data-parallel rank."""
    import torch.distributed as dist

    from slimtrain.data import build_loader

    backend = build_backend(recipe.backend.type, cfg=recipe.backend, train=recipe.train, optim=recipe.optim)
    grad_accum = recipe.train.grad_accum(backend.dp_size)
    prepared = prepare_data(recipe, dist.get_rank(), dist.barrier)
    plugins = PluginStack.from_configs(recipe.plugins)
    model_cfg = plugins.configure(resolve_model_config(recipe, prepared.tokenizer.vocab_size))
    check_model_sources(plugins.model_sources(), prepared.tokenizer.hash)
    torch.manual_seed(recipe.run.seed)
    hf = recipe.checkpoint.init_from_hf
    init = ModelInit(seed=recipe.run.seed, init_from_hf=Path(hf) if hf else None,
                     activation_checkpointing=recipe.train.activation_checkpointing, compile=recipe.train.compile,
                     branch_from=_branch_source(recipe, backend),
                     token_counts=lambda: torch.from_numpy(prepared.train.token_counts(model_cfg.vocab_size)))
    model = backend.build_model(model_cfg, plugins, init)
    optimizer = build_optimizer(model, recipe.optim, plugins.param_groups(model))
    scheduler = build_scheduler(optimizer, recipe.optim.schedule, recipe.train.steps)
    backend.setup(model, optimizer, scheduler)
    mb, rank, replicas = recipe.train.micro_batch_size, backend.dp_rank, backend.dp_size
    transforms = plugins.batch_transforms()
    loader = build_loader(prepared, "train", rank=rank, world_size=replicas, micro_batch_size=mb,
                          global_batch_size=recipe.train.global_batch_size, seed=recipe.run.seed, transforms=transforms)

    def make_val_loader() -> Iterable[Batch]:
        return build_loader(prepared, "val", rank=rank, world_size=replicas, micro_batch_size=mb,
                            global_batch_size=mb * replicas, seed=recipe.run.seed, transforms=transforms)

    return RunParts(model_cfg, backend, loader, make_val_loader, grad_accum, prepared, plugins)


def _branch_source(recipe: Recipe, backend: Backend) -> Path | None:
    """The checkpoint this run branches from, when it will (its parameters the model lacks go to the plugins)."""
    from slimtrain.trainer.lifecycle.branch import source_at_build

    ckpt_root = Path(recipe.run.resolved_output_dir) / "checkpoints"
    return source_at_build(recipe, ckpt_root, backend.rank == 0, backend.barrier,
                           lambda flag: backend.all_reduce_sum([float(flag)])[0] > 0)


def threads_per_rank(local_world_size: int) -> int:
    """This machine's usable cores shared between its local ranks (at least 1 each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(local_world_size, 1))


def set_cpu_threads(local_world_size: int) -> None:
    """Give each local CPU rank its share of the cores (torchrun would pin each to 1 thread);
    SLIMTRAIN_THREADS overrides the count."""
    if torch.cuda.is_available():
        return
    torch.set_num_threads(int(os.environ.get("SLIMTRAIN_THREADS") or threads_per_rank(local_world_size)))


def write_run_files(recipe: Recipe, recipe_yaml: str) -> Path:
    """Create the run directory and write the resolved recipe into it."""
    run_dir = Path(recipe.run.resolved_output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
    return run_dir
