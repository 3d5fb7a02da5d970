"""The `Batch` contract between every loader and the trainer (DESIGN.md, seam 2).

Padding positions carry `doc_ids == -1`, `labels == -100` and `position_ids == 0`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimtrain.core.documents import Documents
from slimtrain.core.sentinels import IGNORE_INDEX, PAD_DOC_ID

__all__ = ["IGNORE_INDEX", "PAD_DOC_ID", "Batch"]


@dataclass
class Batch:
    """One micro-batch of packed rows.

    input_ids:    [B, S] int64 token ids (padding holds the pad/eos id).
    labels:       [B, S] int64 next-token targets already shifted (labels[:, t] is the token that
                  follows input_ids[:, t]); IGNORE_INDEX on padding and across document boundaries.
    position_ids: [B, S] int64, restarting at 0 at the start of every document (or document piece).
    doc_ids:      [B, S] int64, the index of the document within its row (0, 1, 2, ...), PAD_DOC_ID on padding.
    extras:       named extra fields a plugin declares (e.g. a compressor's context spans).
    documents:    `doc_ids` with the answers the attention backends need (one document per row? where do
                  documents start?), found on the host by the loader or by `to()` so that the model
                  need not wait for the GPU to learn them; None when not checked.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    doc_ids: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    documents: Documents | None = None

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on `device`, its document layout checked on the host if it was there."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        documents = self._layout()
        unanswered = documents is None or documents.single is None
        if unanswered and self.doc_ids.device.type == "cpu":  # free here, a device sync later
            documents = Documents.checked_on_host(self.doc_ids)
        documents = None if documents is None else documents.to(device)
        return Batch(
            input_ids=move(self.input_ids),
            labels=move(self.labels),
            position_ids=move(self.position_ids),
            doc_ids=move(self.doc_ids) if documents is None else documents.ids,
            extras={k: move(v) for k, v in self.extras.items()},
            documents=documents,
        )

    def _layout(self) -> Documents | None:
        """`documents` while it still describes `doc_ids` (a replaced `doc_ids` makes it stale; an
        in-place edit cannot be seen without reading the tensor, so batches are not edited in place)."""
        return self.documents if self.documents is not None and self.documents.ids is self.doc_ids else None

    @property
    def single_document_rows(self) -> bool | None:
        """True when every row is one unpadded document (None: not checked on the host)."""
        layout = self._layout()
        return None if layout is None else layout.single

    @property
    def attention_documents(self) -> Documents | torch.Tensor | None:
        """What the model's `doc_ids` argument should be: None (plain causal) for rows known to be
        one document each, else the layout with its host answers, else the bare ids."""
        layout = self._layout()
        if layout is None:
            return self.doc_ids
        return None if layout.single else layout

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int((self.doc_ids != PAD_DOC_ID).sum())

    @property
    def num_label_tokens(self) -> int:
        """Tokens that contribute to the loss."""
        return int((self.labels != IGNORE_INDEX).sum())
