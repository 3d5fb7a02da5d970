"""What every attention backend shares: the tensor layout, the GQA head repeat, the causal check.

Layout: q is [B, S, num_heads, head_dim], k and v are [B, S, num_kv_heads, head_dim]; a backend
returns [B, S, num_heads, head_dim]. This is the projections' natural layout (and flash-attn's), so
the model never transposes for a backend that does not need it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from slimtrain.data.batch import PAD_DOC_ID


class AttentionBackend(Protocol):
    """An attention implementation: `prepare` once per forward, then call once per layer."""

    name: str

    def prepare(self, doc_ids: torch.Tensor | None, seq_len: int, device: torch.device) -> Any:
        """The mask structure for this forward (shared by all layers); doc_ids None = plain causal."""
        ...

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        """Causal attention of q over k, v restricted by `mask` (from `prepare`)."""
        ...


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * groups, S, D]; query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def is_plain_causal(doc_ids: torch.Tensor | None) -> bool:
    """True when the document mask equals the causal mask: one document per row, no padding.

    Syncs with the device once per forward; worth it because it unlocks the `is_causal` kernels.
    """
    if doc_ids is None:
        return True
    return bool(((doc_ids == doc_ids[:, :1]) & (doc_ids != PAD_DOC_ID)).all())


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [1, 1, S, S], True where query i may attend key j (j <= i)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]
