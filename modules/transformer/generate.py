"""Greedy decoding without a KV cache: simple and exact, for tests, evals and samples of small models."""

from __future__ import annotations

import torch

from .model import Transformer


@torch.no_grad()
def greedy_generate(
    model: Transformer, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None
) -> torch.Tensor:
    """`input_ids` [B, S] followed by up to `max_new_tokens` argmax tokens (stops early when every row hit eos_id)."""
    ids = input_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        next_id = model(ids).logits[:, -1].argmax(dim=-1)
        if eos_id is not None:
            next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
            done |= next_id == eos_id
        ids = torch.cat([ids, next_id[:, None]], dim=1)
        if eos_id is not None and bool(done.all()):
            break
    return ids
