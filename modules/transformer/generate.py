"""Greedy decoding: by recomputation (the plain reference) and with a KV cache (what serving does).

Both give the same tokens; the cached one is the honest baseline for decoding speed, and the one the
speculative decoder (`slimtrain.modules.draft.speculate`) must reproduce token for token.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .model import Transformer


@torch.no_grad()
def greedy_generate(
    model: Transformer, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None
) -> torch.Tensor:
    """`input_ids` [B, S] followed by up to `max_new_tokens` argmax tokens (stops early when every row hit eos_id).

    Recomputes the whole sequence for every token: simple and exact, for tests and samples of small models."""
    ids = input_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        next_id = model(ids).logits[:, -1].argmax(dim=-1)
        ids, done = _append(ids, next_id, done, eos_id)
        if eos_id is not None and bool(done.all()):
            break
    return ids


@torch.no_grad()
def cached_greedy_generate(
    model: Transformer, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None
) -> torch.Tensor:
    """As `greedy_generate`, with a KV cache: one prefill of the prompt, then one token per forward."""
    ids = input_ids
    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1] + max_new_tokens)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    step_input = ids
    for _ in range(max_new_tokens):
        next_id = model(step_input, cache=cache).logits[:, -1].argmax(dim=-1)
        ids, done = _append(ids, next_id, done, eos_id)
        if eos_id is not None and bool(done.all()):
            break
        step_input = ids[:, -1:]
    return ids


def _append(ids: torch.Tensor, next_id: torch.Tensor, done: torch.Tensor,
            eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids` with `next_id` appended (eos once a row is done) and the rows done so far."""
    if eos_id is not None:
        next_id = torch.where(done, torch.full_like(next_id, eos_id), next_id)
        done = done | (next_id == eos_id)
    return torch.cat([ids, next_id[:, None]], dim=1), done
