"""The one order in which every backend builds a run's model (DESIGN.md, seam 5).

plugins configure -> the model is built on the meta device -> plugins apply -> the backend parallelises
-> the weights are materialised on the device and initialised (or imported), then the plugins
initialise what they added -> activation checkpointing and compilation. The optimizer comes after
(`slimtrain.trainer.optim`), over the parameters the backend left on this rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig, Transformer


@dataclass(frozen=True)
class ModelInit:
    """How the weights start and how the blocks run, from the recipe."""

    seed: int
    """Seed of the weights (and of the plugins' own initialisation)."""
    init_from_hf: Path | None = None
    """A Hugging Face directory to import the weights from (checkpoint.init_from_hf)."""
    activation_checkpointing: bool = False
    compile: bool = False


def build_model(model_cfg: ModelConfig, plugins: PluginStack, init: ModelInit, device: torch.device,
                parallelize: Callable[[nn.Module], None] = lambda model: None) -> nn.Module:
    """The model of this rank, with every plugin applied, its weights initialised on `device`.

    Built on the meta device first, so that a backend can shard it before any memory is spent, and so
    that every parameter is initialised from the seed in module order whatever the plugins added.
    """
    with torch.device("meta"):
        model = Transformer(model_cfg)
    plugins.apply(model)
    parallelize(model)
    model.to_empty(device=device)
    model.init_weights(seed=init.seed)
    imported: frozenset[str] = frozenset()
    if init.init_from_hf is not None:
        from slimtrain.trainer.export.importer import load_hf_into

        imported = load_hf_into(model, model_cfg, init.init_from_hf, plugins)
    plugins.init_weights(model, init.seed, imported)  # after the import: a plugin's state may derive from the weights
    model.set_activation_checkpointing(init.activation_checkpointing)
    if init.compile:
        model.compile_blocks()  # after the plugins' swaps, so the compiled graphs contain them
    return model
