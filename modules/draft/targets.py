"""What a draft position learns, on packed rows: targets and inputs shifted within each document.

`labels[t]` is the token after `input_ids[t]` (IGNORE on padding and at document ends). A head drafting
`offset` positions ahead at t learns `labels[t + offset]`, but only when t + offset still lies in t's
document; at the last `offset` positions of a document, and past the row's end, it learns nothing (as
Megatron's packed-sequence-aware MTP rolls labels per document).
"""

from __future__ import annotations

import torch

from slimtrain.core.sentinels import IGNORE_INDEX, PAD_DOC_ID


def shift_left(t: torch.Tensor, offset: int, fill: int | float = 0) -> torch.Tensor:
    """`t` [B, S, ...] moved `offset` positions left along dim 1 (position i holds what i + offset held),
    `fill` in the last `offset` positions."""
    if offset == 0:
        return t
    out = torch.full_like(t, fill)
    if offset < t.shape[1]:
        out[:, : t.shape[1] - offset] = t[:, offset:]
    return out


def same_document_ahead(doc_ids: torch.Tensor, offset: int) -> torch.Tensor:
    """[B, S] bool: position t + offset exists and lies in t's document (never padding)."""
    ahead = shift_left(doc_ids, offset, fill=PAD_DOC_ID)
    return (ahead == doc_ids) & (doc_ids != PAD_DOC_ID)


def shifted_labels(labels: torch.Tensor, doc_ids: torch.Tensor, offset: int) -> torch.Tensor:
    """[B, S] targets of a draft `offset` positions ahead: `labels[t + offset]` within t's document, else IGNORE."""
    ahead = shift_left(labels, offset, fill=IGNORE_INDEX)
    return torch.where(same_document_ahead(doc_ids, offset), ahead, torch.full_like(ahead, IGNORE_INDEX))


def shifted_tokens(input_ids: torch.Tensor, doc_ids: torch.Tensor, offset: int) -> torch.Tensor:
    """[B, S] the token `offset` positions ahead (`input_ids[t + offset]`), 0 where that leaves t's document.

    What MTP module `offset` and Hydra head `offset` embed at t; where it is 0 the position's target is
    IGNORE too, and no later position of the document attends to it (it lies at the document's end)."""
    ahead = shift_left(input_ids, offset)
    return torch.where(same_document_ahead(doc_ids, offset), ahead, torch.zeros_like(ahead))
