"""Context spans laid out one per row: the encoder's input layout.

The batch gives context spans the way it gives documents: `span_ids` [B, S] beside the token ids, a span being a
run of equal non-negative ids within a row (-1 = no span). The encoder attends within a span only and pools
within a span only, so it works on the spans re-laid one per row, [num_spans, longest span], padded at the end:
attention then needs only a key-padding mask, positions are `arange`, and a span's groups are slices of its row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from slimtrain.core.sentinels import PAD_DOC_ID


@dataclass
class Spans:
    """Context spans, one per row.

    tokens [N, L]: span i's token ids in tokens[i, :lengths[i]], 0 after (never attended to, never read).
    lengths [N]: tokens per span (>= 1).
    rows [N]: the batch row each span came from (spans are in row-major order: by row, then by start).
    starts [N]: the span's first position in its row.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    rows: torch.Tensor
    starts: torch.Tensor

    @property
    def count(self) -> int:
        return self.tokens.shape[0]

    @property
    def valid(self) -> torch.Tensor:
        """[N, L] bool: True on a span's tokens, False on the padding after them."""
        return torch.arange(self.tokens.shape[1], device=self.tokens.device) < self.lengths[:, None]

    @classmethod
    def from_span_ids(cls, input_ids: torch.Tensor, span_ids: torch.Tensor) -> "Spans":
        """The spans of `input_ids` [B, S] marked by `span_ids` [B, S] (-1: outside every span).

        A span is a maximal run of one id in a row, as a document is in doc_ids; two runs of the same id are two
        spans. Reads the layout once from the device (the longest span sizes the tensors).
        """
        if input_ids.dim() != 2 or span_ids.shape != input_ids.shape:
            raise ValueError(f"input_ids and span_ids must both be [batch, seq]; got {tuple(input_ids.shape)} and "
                             f"{tuple(span_ids.shape)}")
        b, s = span_ids.shape
        flat = span_ids.reshape(-1)
        inside = flat != PAD_DOC_ID
        if bool((flat < PAD_DOC_ID).any()):
            raise ValueError(f"span_ids hold {int(flat.min())}; use ids >= 0 for spans and {PAD_DOC_ID} elsewhere")
        begins = torch.ones_like(inside)
        begins[1:] = flat[1:] != flat[:-1]
        begins[::s] = True  # a span never continues into the next row
        first = torch.nonzero(begins & inside).flatten()
        if first.numel() == 0:
            raise ValueError("span_ids mark no span (every id is -1): there is no context to compress")
        # A run ends where the next run (of any id, padding included) begins: a row's start begins one too.
        every = torch.nonzero(begins).flatten()
        ends_all = torch.cat([every[1:], every.new_tensor([b * s])])
        lengths = ends_all[torch.searchsorted(every, first)] - first
        width = int(lengths.max())
        offsets = torch.arange(width, device=flat.device)
        gather = (first[:, None] + offsets).clamp(max=b * s - 1)
        valid = offsets < lengths[:, None]
        tokens = torch.where(valid, input_ids.reshape(-1)[gather], 0)
        return cls(tokens=tokens, lengths=lengths, rows=first // s, starts=first % s)

    @classmethod
    def from_lists(cls, spans: Sequence[Sequence[int] | torch.Tensor],
                   device: torch.device | str | None = None) -> "Spans":
        """Spans from token-id lists (serving, tests): span i is `spans[i]`, each its own row."""
        if not spans or any(len(span) == 0 for span in spans):
            raise ValueError("give at least one span, each of at least one token")
        lengths = torch.tensor([len(span) for span in spans], dtype=torch.long, device=device)
        tokens = torch.zeros(len(spans), int(lengths.max()), dtype=torch.long, device=device)
        for i, span in enumerate(spans):
            tokens[i, : len(span)] = torch.as_tensor(span, dtype=torch.long, device=device)
        rows = torch.arange(len(spans), device=device)
        return cls(tokens=tokens, lengths=lengths, rows=rows, starts=torch.zeros_like(rows))
