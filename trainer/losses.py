"""The language-modelling loss the backend backpropagates (plugins add named terms through hooks)."""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimtrain.data.batch import IGNORE_INDEX, Batch
from slimtrain.modules.plugin import Plugin
from slimtrain.trainer.chunked_loss import chunked_lm_loss_sum


def lm_loss(model: nn.Module, batch: Batch, label_norm: float, plugins: Sequence[Plugin] = (),
            chunk_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy summed over label tokens, divided by `label_norm` for the backward pass, plus
    every plugin's weighted loss terms (logged unweighted as `<plugin>/<term>`).

    Logits are upcast to fp32 before the softmax, as in every reference trainer, so bf16 runs do not
    lose the loss's low bits. `chunk_tokens` > 0 (train.loss_chunk_tokens): the head and the loss run
    that many tokens at a time and the outputs the plugins see carry no logits.
    """
    chunked = chunk_tokens > 0
    out = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids, with_logits=not chunked)
    if chunked:
        head = getattr(model, "module", model).lm_head  # the DeepSpeed engine wraps the Transformer
        token_loss_sum = chunked_lm_loss_sum(head, out.hidden_states, batch.labels, chunk_tokens)
    else:
        logits = out.logits
        token_loss_sum = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            batch.labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    loss = token_loss_sum / label_norm
    terms: dict[str, torch.Tensor] = {}
    for plugin in plugins:
        for name, term in plugin.losses(out, batch).items():
            loss = loss + term.weight * term.value
            terms[f"{plugin.name}/{name}"] = term.value.detach()
    return loss, token_loss_sum, terms


def make_loss_fn(plugins: Sequence[Plugin], chunk_tokens: int = 0):
    """The LossFn of a run: `lm_loss` itself when no plugin and no chunking is configured."""
    if not plugins and not chunk_tokens:
        return lm_loss
    return partial(lm_loss, plugins=tuple(plugins), chunk_tokens=chunk_tokens)
