"""The `Batch` contract between every loader and the trainer (DESIGN.md, seam 2).

Padding positions carry `doc_ids == -1`, `labels == -100` and `position_ids == 0`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
PAD_DOC_ID = -1


def single_document_rows(doc_ids: torch.Tensor) -> bool:
    """True when every row holds one document and no padding: the document mask is the causal mask."""
    return bool(((doc_ids == doc_ids[:, :1]) & (doc_ids != PAD_DOC_ID)).all())


@dataclass
class Batch:
    """One micro-batch of packed rows.

    input_ids:    [B, S] int64 token ids (padding holds the pad/eos id).
    labels:       [B, S] int64 next-token targets already shifted (labels[:, t] is the token that
                  follows input_ids[:, t]); IGNORE_INDEX on padding and across document boundaries.
    position_ids: [B, S] int64, restarting at 0 at the start of every document (or document piece).
    doc_ids:      [B, S] int64, the index of the document within its row (0, 1, 2, ...), PAD_DOC_ID on padding.
    extras:       named extra fields a plugin declares (e.g. a compressor's context spans).
    single_document_rows: True when every row is one unpadded document, found on the host by `to()`
                  so that the model need not wait for the GPU to learn it; None when not checked.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    single_document_rows: bool | None = None

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on `device`."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        single = self.single_document_rows
        if single is None and self.doc_ids.device.type == "cpu":  # free here, a device sync later
            single = single_document_rows(self.doc_ids)
        return Batch(
            input_ids=move(self.input_ids),
            labels=move(self.labels),
            position_ids=move(self.position_ids),
            doc_ids=move(self.doc_ids),
            extras={k: move(v) for k, v in self.extras.items()},
            single_document_rows=single,
        )

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int((self.doc_ids != PAD_DOC_ID).sum())

    @property
    def num_label_tokens(self) -> int:
        """Tokens that contribute to the loss."""
        return int((self.labels != IGNORE_INDEX).sum())
