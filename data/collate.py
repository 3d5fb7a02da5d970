"""Build a `Batch` from plan rows: gather the pieces' tokens and derive labels, positions, doc ids."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from slimtrain.core.documents import Documents
from slimtrain.core.transforms import REPLACEABLE, BatchTransform
from slimtrain.data.batch import IGNORE_INDEX, PAD_DOC_ID, Batch
from slimtrain.data.dataset import TokenDataset
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
    mask_cross_doc: bool = True, transforms: Sequence[BatchTransform] = (), keys: Sequence[int | None] = (),
) -> Batch:
    """One Batch with a row per entry of `rows`: (plan, row index in it), or None for an all-padding row.

    Rows may come from different plans (a global step can straddle two epochs). `transforms` then add
    their fields (see slimtrain.core.transforms); `keys` are the rows' indices in the global stream.
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
    extras = apply_transforms(transforms, tensors, list(keys) or [None] * len(rows))
    # The layout the attention backends need, found here (in the loader's prefetch thread) rather than
    # by `Batch.to` on the training thread: 0.1-0.2 ms per packed micro-batch of 2 x 4096 tokens.
    return Batch(**tensors, extras=extras, documents=Documents.checked_on_host(tensors["doc_ids"]))


def apply_transforms(transforms: Sequence[BatchTransform], tensors: dict[str, torch.Tensor],
                     keys: list[int | None]) -> dict[str, torch.Tensor]:
    """Run the transforms in order: `labels` they return replaces `tensors["labels"]` (in place of the
    dict entry), any other field becomes an extra. Returns the extras."""
    extras: dict[str, torch.Tensor] = {}
    rows = tensors["input_ids"].shape[0]
    for transform in transforms:
        produced = transform({**tensors, **extras}, keys)
        for name, value in produced.items():
            if name in tensors and name not in REPLACEABLE:
                raise ValueError(f"batch transform {transform.name!r} returned {name!r}, a batch field it may not "
                                 f"replace (only {sorted(REPLACEABLE)}); give its field another name")
            if not torch.is_tensor(value) or value.shape[:1] != (rows,):
                raise ValueError(f"batch transform {transform.name!r} returned {name!r} that is not a tensor of "
                                 f"{rows} rows ([batch, ...])")
            if name in REPLACEABLE:
                if value.shape != tensors[name].shape:
                    raise ValueError(f"batch transform {transform.name!r} returned {name} of shape "
                                     f"{tuple(value.shape)}; it must keep {tuple(tensors[name].shape)}")
                tensors[name] = value
            else:
                extras[name] = value
    return extras
