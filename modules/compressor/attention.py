"""Bidirectional attention within a span, for the encoder.

The model's attention backends are causal by contract (`AttentionBackend.__call__`: "causal attention ...
restricted by mask"), and their fast paths (is_causal kernels, varlen, flex document masks) are causal too. The
encoder needs the opposite: every token of a span sees every token of the span, and pooled queries (fewer than
the keys) see the whole span. With spans laid one per row (`Spans`), that is SDPA with a key-padding mask, for
any number of queries; it runs on CPU and GPU. Kept here rather than as a new backend: no decoder forward uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimtrain.modules.transformer.attention.base import repeat_kv


class SpanAttention:
    """`attend(q, k, v)` over keys restricted to each span's tokens; callable where a block takes `attend`.

    key_valid [N, L_k] bool: the keys each row's queries may read (a span's tokens, memory tokens included).
    Every query row reads them, padding queries too: their outputs are finite and never read, and no row is
    empty (an all-masked softmax row would be NaN), since a span has at least one token.
    """

    name = "span"

    def __init__(self, key_valid: torch.Tensor) -> None:
        self.mask = key_valid[:, None, None, :]  # [N, 1 (heads), 1 (queries), L_k]: broadcast over both

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, L_q, heads, D], k and v [N, L_k, kv_heads, D] -> [N, L_q, heads, D]; L_q may differ from L_k."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        groups = q.shape[1] // k.shape[1]
        # An explicit mask sends SDPA to the memory-efficient or math kernel; neither takes GQA in every torch we
        # support, so repeat the kv heads (as the sdpa backend does).
        out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=self.mask)
        return out.transpose(1, 2)
