"""The one order in which every backend builds a run's model (DESIGN.md, seam 5).

plugins configure -> the model is built on the meta device -> plugins apply -> the backend parallelises
-> the weights are materialised on the device and initialised (or imported), then the plugins
initialise what they added -> activation checkpointing and compilation. The optimizer comes after
(`slimtrain.trainer.optim`), over the parameters the backend left on this rank.

The tensors of the starting checkpoint (`checkpoint.init_from_hf`'s, or `checkpoint.branch_from`'s
parameters) that the model lacks are offered to the plugins (`WeightInit.source`): a plugin may build its
own parameters from them (the MoE plugin upcycles a dense MLP into experts). One that no plugin consumes
is refused, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.trainer.errors import RecipeError


@dataclass(frozen=True)
class ModelInit:
    """How the weights start and how the blocks run, from the recipe."""

    seed: int
    """Seed of the weights (and of the plugins' own initialisation)."""
    init_from_hf: Path | None = None
    """A Hugging Face directory to import the weights from (checkpoint.init_from_hf)."""
    activation_checkpointing: bool = False
    compile: bool = False
    branch_from: Path | None = None
    """The step directory this run branches from (checkpoint.branch_from, pinned), when it starts from it
    rather than resuming its own checkpoint: its parameters the model lacks go to the plugins (`source`)."""
    token_counts: Callable[[], torch.Tensor] | None = None
    """Token frequencies of the training corpus, int64 [vocab], computed when a plugin asks (`WeightInit.token_counts`)."""


@dataclass(frozen=True)
class BuiltModel:
    """A built model, and the starting checkpoint's tensors (absent from the model) its plugins consumed."""

    model: nn.Module
    consumed: frozenset[str] = frozenset()


def build_model(model_cfg: ModelConfig, plugins: PluginStack, init: ModelInit, device: torch.device,
                parallelize: Callable[[nn.Module], None] = lambda model: None) -> nn.Module:
    """The model of this rank, with every plugin applied, its weights initialised on `device` (see `build`)."""
    return build(model_cfg, plugins, init, device, parallelize).model


def build(model_cfg: ModelConfig, plugins: PluginStack, init: ModelInit, device: torch.device,
          parallelize: Callable[[nn.Module], None] = lambda model: None) -> BuiltModel:
    """The model of this rank, with every plugin applied, its weights initialised on `device`; and the source
    tensors the plugins consumed (a branch drops them from the source's state instead of refusing them).

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
    imported, source = _starting_tensors(model, model_cfg, plugins, init)
    # After the import: a plugin's state may derive from the weights.
    consumed = plugins.init_weights(model, init.seed, imported, source, _branch_values(init), init.token_counts)
    _check_consumed(source, consumed, init)
    _check_initialised(model, added)
    model.set_activation_checkpointing(init.activation_checkpointing)
    if init.compile:
        model.compile_blocks()  # after the plugins' swaps, so the compiled graphs contain them
    return BuiltModel(model, consumed)


def _starting_tensors(model: nn.Module, model_cfg: ModelConfig, plugins: PluginStack,
                      init: ModelInit) -> tuple[frozenset[str], Mapping[str, torch.Tensor]]:
    """(the model's tensors an import filled, the starting checkpoint's tensors the model lacks)."""
    if init.init_from_hf is not None:
        from slimtrain.trainer.export.importer import import_hf

        done = import_hf(model, model_cfg, init.init_from_hf, plugins)
        return done.filled, done.unused
    if init.branch_from is not None:
        from slimtrain.trainer.lifecycle.branch import lacking_parameters

        return frozenset(), lacking_parameters(init.branch_from, set(model.state_dict()))
    return frozenset(), {}


def _branch_values(init: ModelInit) -> Callable[[str], torch.Tensor | None] | None:
    """`WeightInit.starting` for a branch: the source's value of one of the model's own tensors, its weights
    read (once, through the source backend's offline reader) only if a plugin asks."""
    if init.branch_from is None:
        return None
    from slimtrain.trainer.lifecycle.branch import source_weights

    cached: dict[str, torch.Tensor] = {}

    def starting(name: str) -> torch.Tensor | None:
        if not cached:
            cached.update(source_weights(init.branch_from))
        return cached.get(name)

    return starting


def _check_consumed(source: Mapping[str, torch.Tensor], consumed: frozenset[str], init: ModelInit) -> None:
    left = sorted(set(source) - consumed)
    if not left:
        return
    shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
    if init.init_from_hf is not None:
        raise RecipeError(f"checkpoint.init_from_hf={str(init.init_from_hf)!r} holds tensors this model lacks and no "
                          f"plugin takes: {shown} — the directory does not fit the recipe's model with its plugins "
                          "applied")
    raise RecipeError(f"checkpoint.branch_from={str(init.branch_from)!r} holds parameters this model lacks: {shown}; a "
                      "branch keeps every parameter of its source (same model block; plugins may add parameters, or "
                      "initialise theirs from a source parameter they take over, as upcycling does; no plugin of this "
                      "recipe takes these)")


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
