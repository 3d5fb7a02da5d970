"""torch.nn.functional.scaled_dot_product_attention with the document mask (CPU and GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimtrain.data.masks import document_causal_mask

from .base import is_plain_causal, repeat_kv

# `enable_gqa` arrived in torch 2.5. Only the unmasked causal path uses it: with an explicit mask
# SDPA picks the memory-efficient kernel, which (in the versions we support) does not take GQA and
# would silently fall back to the slow math kernel; repeating kv heads keeps the fast kernel.
_SDPA_HAS_GQA = torch.__version__ >= "2.5"


class SdpaAttention:
    """SDPA; `is_causal=True` (no mask tensor) when every row is one unpadded document."""

    name = "sdpa"

    def prepare(self, doc_ids: torch.Tensor | None, seq_len: int, device: torch.device) -> torch.Tensor | None:
        return None if is_plain_causal(doc_ids) else document_causal_mask(doc_ids)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        groups = q.shape[1] // k.shape[1]
        if mask is None and _SDPA_HAS_GQA:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
        elif mask is None:
            out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask)
        return out.transpose(1, 2)
