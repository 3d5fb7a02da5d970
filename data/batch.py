"""The `Batch` contract between every loader and the trainer (DESIGN.md, seam 2).

Padding positions carry `doc_ids == -1`, `labels == -100` and `position_ids == 0`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
PAD_DOC_ID = -1


@dataclass
class Batch:
    """One micro-batch of packed rows.

    input_ids:    [B, S] int64 token ids (padding holds the pad/eos id).
    labels:       [B, S] int64 next-token targets already shifted (labels[:, t] is the token that
                  follows input_ids[:, t]); IGNORE_INDEX on padding and across document boundaries.
    position_ids: [B, S] int64, restarting at 0 at the start of every document (or document piece).
    doc_ids:      [B, S] int64, the index of the document within its row (0, 1, 2, ...), PAD_DOC_ID on padding.
    extras:       named extra fields a plugin declares (e.g. a compressor's context spans).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on `device`."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            input_ids=move(self.input_ids),
            labels=move(self.labels),
            position_ids=move(self.position_ids),
            doc_ids=move(self.doc_ids),
            extras={k: move(v) for k, v in self.extras.items()},
        )

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int((self.doc_ids != PAD_DOC_ID).sum())

    @property
    def num_label_tokens(self) -> int:
        """Tokens that contribute to the loss."""
        return int((self.labels != IGNORE_INDEX).sum())
