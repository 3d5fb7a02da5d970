"""Shifted targets on packed rows never cross a document or padding (brute force on hand-made rows)."""

from __future__ import annotations

import torch

from slimtrain.core.sentinels import IGNORE_INDEX, PAD_DOC_ID
from slimtrain.modules.draft.targets import shifted_labels, shifted_tokens


def _packed_rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows: documents of 5, 1, 4 tokens then 2 padding; and 3, 9 (the second cut at the row's end)."""
    doc_ids = torch.tensor([[0] * 5 + [1] + [2] * 4 + [PAD_DOC_ID] * 2, [0] * 3 + [1] * 9])
    input_ids = torch.arange(24).view(2, 12) + 100
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for b in range(2):
        for t in range(11):
            if doc_ids[b, t] != PAD_DOC_ID and doc_ids[b, t + 1] == doc_ids[b, t]:
                labels[b, t] = input_ids[b, t + 1]
    labels[1, 11] = 999  # the piece continues in the next row: the packer keeps the token after it
    return input_ids, labels, doc_ids


def test_shifted_labels_stay_in_their_document() -> None:
    input_ids, labels, doc_ids = _packed_rows()
    for offset in range(0, 6):
        got = shifted_labels(labels, doc_ids, offset)
        for b in range(2):
            for t in range(12):
                u = t + offset
                same = u < 12 and doc_ids[b, t] != PAD_DOC_ID and doc_ids[b, u] == doc_ids[b, t]
                want = int(labels[b, u]) if same else IGNORE_INDEX
                assert int(got[b, t]) == want, (offset, b, t)
                if want != IGNORE_INDEX and want != 999:  # the target is the token offset + 1 ahead, same document
                    assert want == int(input_ids[b, t + offset + 1]) and doc_ids[b, t + offset + 1] == doc_ids[b, t]


def test_shifted_tokens_zero_outside_the_document() -> None:
    input_ids, _, doc_ids = _packed_rows()
    got = shifted_tokens(input_ids, doc_ids, 2)
    assert got[0].tolist() == [102, 103, 104, 0, 0, 0, 108, 109, 0, 0, 0, 0]
    assert got[1].tolist() == [114, 0, 0, 117, 118, 119, 120, 121, 122, 123, 0, 0]
