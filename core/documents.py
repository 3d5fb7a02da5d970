"""A micro-batch's document layout, with what the host learned of it before the batch moved.

On a GPU every question asked of a device tensor (`bool(...)`, `int(...)`, `nonzero`) waits for the
queue to drain. The attention backends ask two: is every row one whole document (then plain causal
kernels serve), and where do the documents start (`cu_seqlens` for the varlen kernels). `Batch.to`
answers both on the host, where they cost microseconds, and hands the answers down with the ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtrain.core.masks import cu_seqlens, single_document_rows


@dataclass(frozen=True, eq=False)  # tensors have no truth value to compare by
class Documents:
    """`ids` [B, S] (doc_ids, PAD_DOC_ID on padding) and, when known, the answers derived from them.

    single: every row is one unpadded document (None: not checked).
    varlen: (cu_seqlens int32 [n+1] on `ids`' device, max_seqlen), or None when not computed.
    """

    ids: torch.Tensor
    single: bool | None = None
    varlen: tuple[torch.Tensor, int] | None = None

    @classmethod
    def checked_on_host(cls, ids: torch.Tensor) -> "Documents":
        """Both answers for `ids` (a CPU tensor): the varlen boundaries only where rows are packed."""
        if ids.device.type != "cpu":
            raise ValueError(
                f"Documents.checked_on_host needs CPU doc_ids, got them on {ids.device}; check them before "
                "moving the batch (Batch.to does), or pass Documents(ids) to let the backend ask the device"
            )
        single = single_document_rows(ids)
        return cls(ids, single, None if single else cu_seqlens(ids))

    def to(self, device: torch.device | str) -> "Documents":
        """The same layout on `device` (the answers travel; nothing is recomputed)."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        varlen = None if self.varlen is None else (move(self.varlen[0]), self.varlen[1])
        return Documents(move(self.ids), self.single, varlen)

    def single_rows(self) -> bool:
        """True when the document mask is the causal mask; asks the device only when not known."""
        return self.single if self.single is not None else single_document_rows(self.ids)

    def varlen_args(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens, max_seqlen) for varlen kernels; computed on `ids`' device only when not known."""
        return self.varlen if self.varlen is not None else cu_seqlens(self.ids)


def as_documents(doc_ids: torch.Tensor | Documents | None) -> Documents | None:
    """A model's `doc_ids` argument as `Documents` (a bare tensor carries no host answers)."""
    return doc_ids if doc_ids is None or isinstance(doc_ids, Documents) else Documents(doc_ids)
