"""Output head + cross-entropy in chunks of tokens, so the [tokens, vocab] logits never exist whole.

The plain loss holds the logits in the compute dtype, their fp32 upcast and the saved log-softmax for
the backward pass: tokens x vocab x (w + 8) bytes, e.g. 8192 x 128256 x 10 B = 9.8 GiB for one 8k-token
row of a Llama-3 vocabulary. Here each chunk's head matmul and softmax run under non-reentrant
activation checkpointing: the forward keeps only the chunk's input (a view of the hidden states) and
the backward recomputes that chunk's logits, so at most one chunk's logits are alive at any time.
The price is one more head matmul per token (2 x hidden x vocab FLOPs, a few percent of a step).
The head is called as a module, so ZeRO-3 gathers its weight in its hooks as for any other layer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from slimtrain.trainer.loss.cross_entropy import CrossEntropySum, fp32_cross_entropy_sum

def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                    cross_entropy: CrossEntropySum) -> torch.Tensor:
    return cross_entropy(head(hidden), labels)


def chunked_lm_loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                        cross_entropy: CrossEntropySum = fp32_cross_entropy_sum) -> torch.Tensor:
    """Sum of the token cross-entropies of `head(hidden)` against `labels`, in fp32, computed
    `chunk_tokens` tokens at a time. hidden [..., H] and labels [...] are flattened over tokens;
    `cross_entropy(logits, labels)` sums one chunk's (the trainer passes its compiled one under train.compile)."""
    if chunk_tokens <= 0:
        raise ValueError(f"train.loss_chunk_tokens={chunk_tokens}: chunking needs a positive number of tokens")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, head, h, y, cross_entropy, use_reentrant=False)
        else:  # evaluation: nothing is saved anyway
            total = total + _chunk_loss_sum(head, h, y, cross_entropy)
    return total
