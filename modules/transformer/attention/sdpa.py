"""torch.nn.functional.scaled_dot_product_attention with the document mask (CPU and GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimtrain.core.documents import Documents

from .base import causal_attention, dense_mask, is_plain_causal, repeat_kv


class SdpaAttention:
    """SDPA; `is_causal=True` (no mask tensor) when every row is one unpadded document."""

    name = "sdpa"

    def prepare(self, docs: Documents | None, seq_len: int, device: torch.device,
                window: int | None = None) -> torch.Tensor | None:
        if window is None and is_plain_causal(docs):
            return None
        return dense_mask(None if is_plain_causal(docs) else docs, seq_len, device, window)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if mask is None:
            return causal_attention(q, k, v)
        # With a mask SDPA picks the memory-efficient kernel, which (in the versions we support)
        # does not take GQA and would fall back to the slow math kernel: repeat the kv heads.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        groups = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask)
        return out.transpose(1, 2)
