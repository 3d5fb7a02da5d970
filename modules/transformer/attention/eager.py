"""Reference attention: explicit scores, mask and softmax. Slow; every other backend is tested against it."""

from __future__ import annotations

import math

import torch

from slimtrain.core.documents import Documents

from .base import dense_mask, repeat_kv


class EagerAttention:
    """matmul + masked softmax (fp32) + matmul, with the document mask from `doc_ids`."""

    name = "eager"

    def prepare(self, docs: Documents | None, seq_len: int, device: torch.device,
                window: int | None = None) -> torch.Tensor:
        return dense_mask(docs, seq_len, device, window)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        # Every row keeps at least its diagonal (padding attends to itself), so -inf never empties a row.
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return (probs @ v).transpose(1, 2)
