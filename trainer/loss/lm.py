"""The language-modelling loss the backend backpropagates, called through the plugins.

The plugins decide what the model is called with (`Plugin.model_inputs`) and add named loss terms
(`Plugin.losses`); this file names no plugin.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from slimtrain.data.batch import Batch
from slimtrain.modules.plugin import PluginContext
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.trainer.loss.chunked import chunked_lm_loss_sum
from slimtrain.trainer.loss.cross_entropy import CrossEntropySum, compiled_cross_entropy_sum, fp32_cross_entropy_sum

NO_PLUGINS = PluginStack()


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside an engine's wrapper (DeepSpeed's engine holds it as `.module`)."""
    return getattr(model, "module", model)


def local_labels(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The labels of the tokens this rank computes: all of them, or its slice of the sequence when the backend
    splits the sequence over ranks (`Transformer.sequence_shard`), whose logits are that slice only."""
    shard = getattr(unwrapped(model), "sequence_shard", None)
    return labels if shard is None else shard.local(labels)


def lm_loss(model: nn.Module, batch: Batch, label_norm: float, plugins: PluginStack = NO_PLUGINS,
            ctx: PluginContext | None = None, chunk_tokens: int = 0,
            cross_entropy: CrossEntropySum = fp32_cross_entropy_sum,
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy summed over label tokens, divided by `label_norm` for the backward pass, plus
    every plugin's weighted loss terms (logged unweighted as `<plugin>/<term>`).

    Logits are upcast to fp32 before the softmax, as in every reference trainer, so bf16 runs do not
    lose the loss's low bits. `chunk_tokens` > 0 (train.loss_chunk_tokens): the head and the loss run
    that many tokens at a time and the outputs the plugins see carry no logits. `cross_entropy` is
    `fp32_cross_entropy_sum`, its compiled twin (train.compile), or an engine's own (a vocabulary-parallel one).
    """
    chunked = chunk_tokens > 0
    if len(plugins) and ctx is None:
        ctx = PluginContext(model=unwrapped(model), device=batch.input_ids.device)
    inputs = plugins.inputs(batch, ctx, with_logits=not chunked)
    out = model(**inputs.model_kwargs())
    labels = local_labels(model, inputs.labels)
    if chunked:
        token_loss_sum = chunked_lm_loss_sum(unwrapped(model).lm_head, out.hidden_states, labels,
                                             chunk_tokens, cross_entropy)
    else:
        token_loss_sum = cross_entropy(out.logits, labels)
    loss = token_loss_sum / label_norm
    terms: dict[str, torch.Tensor] = {}
    for name, term in plugins.losses(out, batch, ctx).items():
        loss = loss + term.weight * term.value
        terms[name] = term.value.detach()
    return loss, token_loss_sum, terms


def make_loss_fn(plugins: PluginStack = NO_PLUGINS, ctx: PluginContext | None = None, chunk_tokens: int = 0,
                 compile: bool = False, cross_entropy: CrossEntropySum | None = None):
    """The LossFn of a run: `lm_loss` itself when no plugin, no chunking and no compilation is configured.

    `cross_entropy`: the engine's own (None: fp32, or its compiled twin under `compile`)."""
    if not isinstance(plugins, PluginStack):
        plugins = PluginStack(plugins)
    if not len(plugins) and not chunk_tokens and not compile and cross_entropy is None:
        return lm_loss
    if cross_entropy is None:
        cross_entropy = compiled_cross_entropy_sum() if compile else fp32_cross_entropy_sum
    return partial(lm_loss, plugins=plugins, ctx=ctx, chunk_tokens=chunk_tokens, cross_entropy=cross_entropy)
