"""Trainer-side composition of plugins: build them for a recipe, dry-run them, reduce metrics, run export hooks.

Nothing here knows a plugin by name: every call goes through the hooks of `slimtrain.modules.plugin`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from slimtrain.modules.plugin import ExportContext, Plugin, PluginConfig
from slimtrain.modules.plugins import build_plugins
from slimtrain.modules.transformer.config import ModelConfig

DRY_RUN_VOCAB = 256  # the tokenizer's size is unknown at validation; no plugin check depends on it


def configure_model(plugins: list[Plugin], model_cfg: ModelConfig) -> ModelConfig:
    """The model config after every plugin's `configure`, in composition order."""
    for plugin in plugins:
        model_cfg = plugin.configure(model_cfg)
    return model_cfg


def apply_plugins(plugins: list[Plugin], model: nn.Module) -> None:
    """Every plugin's `apply`, in composition order."""
    for plugin in plugins:
        plugin.apply(model)


def model_skeleton(model_cfg: ModelConfig, plugins: list[Plugin]) -> nn.Module:
    """The model with every plugin applied, on the meta device (structure and shapes, no memory)."""
    from slimtrain.modules.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    apply_plugins(plugins, model)
    return model


def check_plugins(configs: list[PluginConfig], model_cfg: ModelConfig, loss_chunk_tokens: int = 0) -> None:
    """Dry-run configure + apply on a meta model so that bad patterns or shapes fail at validation;
    with `loss_chunk_tokens`, also that every plugin works without whole logits.

    Raises ValueError naming `plugins.<i> (<type>)`, for the recipe loader to report.
    """
    plugins = build_plugins(configs)
    index = {id(cfg): i for i, cfg in enumerate(configs)}
    if model_cfg.vocab_size is None:
        model_cfg = model_cfg.model_copy(update={"vocab_size": DRY_RUN_VOCAB})
    current = None
    try:
        for current in plugins:
            model_cfg = current.configure(model_cfg)
        from slimtrain.modules.transformer import Transformer

        with torch.device("meta"):
            model = Transformer(model_cfg)
        for current in plugins:
            current.apply(model)
            if loss_chunk_tokens:
                _check_chunkable(current, model, loss_chunk_tokens)
    except ValueError as exc:
        where = f"plugins.{index[id(current.cfg)]} ({current.name})" if current is not None else "plugins"
        raise ValueError(f"{where}: {exc}") from None


def _check_chunkable(plugin: Plugin, model: nn.Module, chunk: int) -> None:
    if plugin.needs_logits:
        raise ValueError(f"its losses read the whole logits, which train.loss_chunk_tokens={chunk} never builds; "
                         "set train.loss_chunk_tokens=0")
    if getattr(model.lm_head, "mixes_tokens", False):  # a head whose output for a token depends on the others
        raise ValueError(f"lm_head now shares one input scale across tokens, so train.loss_chunk_tokens={chunk} "
                         "would give every chunk its own scale; exclude lm_head from the plugin, quantize its "
                         "inputs per token or per group, or set train.loss_chunk_tokens=0")


def reduce_metrics(plugins: list[Plugin], all_reduce_sum: Callable[[list[float]], list[float]],
                   world_size: int) -> dict[str, float]:
    """Every plugin's metrics, averaged over ranks (one collective; same keys on every rank)."""
    values: dict[str, float] = {}
    for plugin in plugins:
        values.update(plugin.metrics())
    if not values:
        return {}
    keys = sorted(values)
    summed = all_reduce_sum([float(values[k]) for k in keys])
    return {k: v / world_size for k, v in zip(keys, summed)}


def run_export_hooks(configs: list[PluginConfig], model_cfg: ModelConfig, state: dict[str, torch.Tensor],
                     step: int) -> ExportContext:
    """Let every plugin of a checkpoint's recipe rewrite the state and add config keys/variants."""
    plugins = build_plugins(configs)
    ctx = ExportContext(state=dict(state), model_cfg=model_cfg, model=model_skeleton(model_cfg, plugins), step=step)
    for plugin in plugins:
        plugin.export(ctx)
    return ctx


def describe(plugins: list[Plugin]) -> list[dict[str, Any]]:
    """Name and order of each plugin, for logs."""
    return [{"name": p.name, "order": p.order} for p in plugins]
