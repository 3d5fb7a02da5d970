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

    Built on the meta device first, so that a backend can shard it before any memory is spent. The dense
    model's parameters (wherever a plugin moved them: wrapped, or into experts) are drawn from the seed in
    the dense build's order, so they are bitwise the dense build's; what plugins added is theirs to
    initialise, and a tensor they leave uninitialised is an error naming it.
    """
    with torch.device("meta"):
        model = Transformer(model_cfg)
    dense_params = list(model.parameters())  # held: an id of a parameter a plugin dropped could be reused
    plugins.apply(model)
    dense_ids = {id(p) for p in dense_params}
    dense = frozenset(n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in dense_ids)
    del dense_params
    parallelize(model)
    model.to_empty(device=device)
    model.init_weights(seed=init.seed, only=dense)
    added = _poison(model, dense)  # NaN until a plugin initialises them
    imported: frozenset[str] = frozenset()
    if init.init_from_hf is not None:
        from slimtrain.trainer.export.importer import load_hf_into

        imported = load_hf_into(model, model_cfg, init.init_from_hf, plugins)
    plugins.init_weights(model, init.seed, imported)  # after the import: a plugin's state may derive from the weights
    _check_initialised(model, added)
    model.set_activation_checkpointing(init.activation_checkpointing)
    if init.compile:
        model.compile_blocks()  # after the plugins' swaps, so the compiled graphs contain them
    return model


@torch.no_grad()
def _poison(model: nn.Module, dense: frozenset[str]) -> list[str]:
    """Fill the float tensors plugins added with NaN (to_empty left them holding whatever memory held)."""
    added = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name not in dense and tensor.is_floating_point():
            tensor.fill_(float("nan"))
            added.append(name)
    return added


def _check_initialised(model: nn.Module, added: list[str]) -> None:
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    left = [n for n in added if bool(torch.isnan(tensors[n]).any())]
    if left:
        raise ValueError(f"{len(left)} tensor(s) a plugin added were not initialised: {left[:5]}; the plugin that "
                         "adds them must set them in its init_weights (see docs/plugins.md, build order)")
