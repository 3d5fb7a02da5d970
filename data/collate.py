"""Build a `Batch` from plan rows: gather the pieces' tokens and derive labels, positions, doc ids."""

from __future__ import annotations

import numpy as np
import torch

from slimtrain.data.batch import IGNORE_INDEX, PAD_DOC_ID, Batch
from slimtrain.data.dataset import TokenDataset
from slimtrain.data.documents import Documents
from slimtrain.data.packing import PackPlan


def _fill_row(
    out: dict[str, np.ndarray], b: int, dataset: TokenDataset, plan: PackPlan, row: int, mask_cross_doc: bool
) -> None:
    pos = 0
    lo, hi = int(plan.row_ptr[row]), int(plan.row_ptr[row + 1])
    for i, p in enumerate(range(lo, hi)):
        doc, start, length = int(plan.doc[p]), int(plan.start[p]), int(plan.length[p])
        tokens = dataset.document(doc)
        # One token beyond the piece when the document continues: its label is known even if the
        # next token sits in another row.
        piece = tokens[start : start + length + 1]
        end = pos + length
        out["input_ids"][b, pos:end] = piece[:length]
        out["labels"][b, pos : end - 1] = piece[1:length]
        if len(piece) > length:
            out["labels"][b, end - 1] = piece[length]
        elif not mask_cross_doc and p + 1 < hi:  # the naive objective: predict the next document's first token
            nxt = int(plan.doc[p + 1])
            out["labels"][b, end - 1] = dataset.document(nxt)[int(plan.start[p + 1])]
        out["position_ids"][b, pos:end] = np.arange(length)
        out["doc_ids"][b, pos:end] = i
        pos = end


def build_batch(
    dataset: TokenDataset, rows: list[tuple[PackPlan, int] | None], seq_len: int, pad_id: int,
    mask_cross_doc: bool = True,
) -> Batch:
    """One Batch with a row per entry of `rows`: (plan, row index in it), or None for an all-padding row.

    Rows may come from different plans (a global step can straddle two epochs).
    """
    shape = (len(rows), seq_len)
    out = {
        "input_ids": np.full(shape, pad_id, dtype=np.int64),
        "labels": np.full(shape, IGNORE_INDEX, dtype=np.int64),
        "position_ids": np.zeros(shape, dtype=np.int64),
        "doc_ids": np.full(shape, PAD_DOC_ID, dtype=np.int64),
    }
    for b, entry in enumerate(rows):
        if entry is not None:
            _fill_row(out, b, dataset, entry[0], entry[1], mask_cross_doc)
    tensors = {k: torch.from_numpy(v) for k, v in out.items()}
    # The layout the attention backends need, found here (in the loader's prefetch thread) rather than
    # by `Batch.to` on the training thread: 0.1-0.2 ms per packed micro-batch of 2 x 4096 tokens.
    return Batch(**tensors, documents=Documents.checked_on_host(tensors["doc_ids"]))
