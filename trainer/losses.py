"""The language-modelling loss the backend backpropagates (plugins add named terms through hooks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtrain.data.batch import IGNORE_INDEX, Batch


def lm_loss(model: nn.Module, batch: Batch, label_norm: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy summed over label tokens, divided by `label_norm` for the backward pass.

    Logits are upcast to fp32 before the softmax, as in every reference trainer, so bf16 runs do not
    lose the loss's low bits.
    """
    out = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids)
    logits = out.logits
    token_loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        batch.labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return token_loss_sum / label_norm, token_loss_sum, {}
