"""The language-modelling loss the backend backpropagates (plugins add named terms through hooks)."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

from slimtrain.data.batch import Batch
from slimtrain.modules.plugin import Plugin
from slimtrain.trainer.chunked_loss import chunked_lm_loss_sum
from slimtrain.trainer.cross_entropy import CrossEntropySum, compiled_cross_entropy_sum, fp32_cross_entropy_sum


def lm_loss(model: nn.Module, batch: Batch, label_norm: float, plugins: Sequence[Plugin] = (),
            chunk_tokens: int = 0, cross_entropy: CrossEntropySum = fp32_cross_entropy_sum,
            ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy summed over label tokens, divided by `label_norm` for the backward pass, plus
    every plugin's weighted loss terms (logged unweighted as `<plugin>/<term>`).

    Logits are upcast to fp32 before the softmax, as in every reference trainer, so bf16 runs do not
    lose the loss's low bits. `chunk_tokens` > 0 (train.loss_chunk_tokens): the head and the loss run
    that many tokens at a time and the outputs the plugins see carry no logits. `cross_entropy` is
    `fp32_cross_entropy_sum` or its compiled twin (train.compile).
    """
    chunked = chunk_tokens > 0
    # The layout found on the host when the batch moved: no mask for rows of one document each, and
    # the varlen boundaries ready for packed rows, so the forward never waits on the device to learn them.
    out = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.attention_documents,
                with_logits=not chunked)
    if chunked:
        head = getattr(model, "module", model).lm_head  # the DeepSpeed engine wraps the Transformer
        token_loss_sum = chunked_lm_loss_sum(head, out.hidden_states, batch.labels, chunk_tokens, cross_entropy)
    else:
        token_loss_sum = cross_entropy(out.logits, batch.labels)
    loss = token_loss_sum / label_norm
    terms: dict[str, torch.Tensor] = {}
    for plugin in plugins:
        for name, term in plugin.losses(out, batch).items():
            loss = loss + term.weight * term.value
            terms[f"{plugin.name}/{name}"] = term.value.detach()
    return loss, token_loss_sum, terms


def make_loss_fn(plugins: Sequence[Plugin], chunk_tokens: int = 0, compile: bool = False):
    """The LossFn of a run: `lm_loss` itself when no plugin, no chunking and no compilation is configured."""
    if not plugins and not chunk_tokens and not compile:
        return lm_loss
    cross_entropy = compiled_cross_entropy_sum() if compile else fp32_cross_entropy_sum
    return partial(lm_loss, plugins=tuple(plugins), chunk_tokens=chunk_tokens, cross_entropy=cross_entropy)
