"""Attention structure derived from `doc_ids`: document masks and varlen `cu_seqlens`.

Boundaries come from `doc_ids`, never from EOS tokens (a document may contain the EOS id, and a
document piece cut by the packer has none).
"""

from __future__ import annotations

import torch

from slimtrain.core.sentinels import PAD_DOC_ID


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, S, S]; True where query i may attend key j.

    i attends j iff j <= i and both lie in the same document. A padding position attends only to
    itself, so that no softmax row is empty (an all-masked row gives NaN in SDPA).
    """
    s = doc_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    real = (doc_ids != PAD_DOC_ID)[:, :, None]
    eye = torch.eye(s, dtype=torch.bool, device=doc_ids.device)
    mask = (same_doc & causal & real) | (~real & eye)
    return mask[:, None, :, :]


def window_band(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Boolean [1, 1, S, S]: True where key j lies in query i's sliding window, j > i - window (transformers' rule:
    a token sees itself and the window - 1 tokens before it). AND it with a causal or document mask."""
    i = torch.arange(seq_len, device=device)
    return (i[None, :] > i[:, None] - window)[None, None]


def single_document_rows(doc_ids: torch.Tensor) -> bool:
    """True when every row holds one document and no padding: the document mask is the causal mask."""
    return bool(((doc_ids == doc_ids[:, :1]) & (doc_ids != PAD_DOC_ID)).all())


def segment_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """Lengths of the consecutive runs of equal doc id over the flattened [B*S] batch.

    Runs never cross a row boundary; every padding run counts as a segment of its own so that
    varlen kernels see exactly B*S tokens.
    """
    b, s = doc_ids.shape
    flat = doc_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # every row starts a new segment
    idx = torch.nonzero(starts).flatten()
    ends = torch.cat([idx[1:], idx.new_tensor([b * s])])
    return ends - idx


def cu_seqlens(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [n+1], max_seqlen) for flash-attention varlen over the flattened batch."""
    lengths = segment_lengths(doc_ids)
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=doc_ids.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu, int(lengths.max())
