"""The Batch contract helpers: the document mask and cu_seqlens derived from doc_ids, checked by brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimtrain.core.documents import Documents
from slimtrain.core.masks import cu_seqlens, document_causal_mask, segment_lengths
from slimtrain.data.batch import IGNORE_INDEX, PAD_DOC_ID, Batch


def _random_doc_ids(b: int, s: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        lengths = []
        while sum(lengths) < s:
            lengths.append(int(rng.integers(1, s // 2 + 1)))
        used = int(rng.integers(1, s + 1))  # the rest of the row is padding
        ids = np.repeat(np.arange(len(lengths)), lengths)[:used]
        rows.append(np.concatenate([ids, np.full(s - used, PAD_DOC_ID)]))
    return torch.tensor(np.stack(rows), dtype=torch.int64)


def test_mask_equals_brute_force_block_diagonal_causal() -> None:
    doc_ids = _random_doc_ids(4, 23, seed=0)
    mask = document_causal_mask(doc_ids)
    assert mask.shape == (4, 1, 23, 23)
    for b in range(4):
        for i in range(23):
            for j in range(23):
                di, dj = int(doc_ids[b, i]), int(doc_ids[b, j])
                if di == PAD_DOC_ID:
                    expected = i == j  # padding attends only to itself: no empty softmax row
                else:
                    expected = j <= i and di == dj
                assert bool(mask[b, 0, i, j]) == expected, (b, i, j)


def test_cu_seqlens_equals_brute_force_segments() -> None:
    doc_ids = _random_doc_ids(3, 17, seed=1)
    expected = []
    for row in doc_ids.tolist():
        run = 1
        for prev, cur in zip(row, row[1:]):
            if cur == prev:
                run += 1
            else:
                expected.append(run)
                run = 1
        expected.append(run)
    assert segment_lengths(doc_ids).tolist() == expected
    cu, max_len = cu_seqlens(doc_ids)
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == doc_ids.numel()
    assert torch.diff(cu).tolist() == expected and max_len == max(expected)


def test_batch_counts_and_device_move() -> None:
    doc_ids = torch.tensor([[0, 0, 1, PAD_DOC_ID]])
    batch = Batch(
        input_ids=torch.tensor([[5, 6, 7, 0]]), labels=torch.tensor([[6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]),
        position_ids=torch.tensor([[0, 1, 0, 0]]), doc_ids=doc_ids,
    )
    assert batch.num_tokens == 3 and batch.num_label_tokens == 1
    moved = batch.to("cpu")
    assert torch.equal(moved.doc_ids, doc_ids)


def _batch(doc_ids: torch.Tensor) -> Batch:
    ids = torch.zeros_like(doc_ids)
    return Batch(input_ids=ids, labels=ids, position_ids=ids, doc_ids=doc_ids)


def test_to_finds_single_document_rows_on_the_host_and_keeps_the_answer() -> None:
    one_each = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0]])
    two_docs = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    padded = torch.tensor([[0, 0, 0, PAD_DOC_ID], [0, 0, 0, 0]])
    assert _batch(one_each).single_document_rows is None  # not checked until it moves
    assert _batch(one_each).to("cpu").single_document_rows is True
    assert _batch(two_docs).to("cpu").single_document_rows is False
    assert _batch(padded).to("cpu").single_document_rows is False
    on_meta = _batch(one_each).to("meta")  # a device tensor is never read back to find out
    assert on_meta.single_document_rows is True and on_meta.to("meta").single_document_rows is True
    assert _batch(one_each.to("meta")).to("meta").single_document_rows is None


def test_the_loss_runs_single_document_rows_without_a_mask() -> None:
    """lm_loss hands the model doc_ids=None (plain causal, no device sync) for rows checked on the host."""
    from types import SimpleNamespace

    from slimtrain.trainer.loss.lm import lm_loss

    seen = []

    def model(input_ids, position_ids, doc_ids, with_logits, **rest):
        seen.append(doc_ids)
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 5, requires_grad=True))

    for doc_ids in (torch.zeros(2, 4, dtype=torch.int64), torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])):
        batch = _batch(doc_ids).to("cpu")
        lm_loss(model, batch, label_norm=1.0)
    assert seen[0] is None
    assert torch.equal(seen[1].ids, torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])) and seen[1].single is False
    assert seen[1].varlen[0].tolist() == [0, 2, 4, 8] and seen[1].varlen[1] == 4


def test_to_finds_the_varlen_boundaries_on_the_host() -> None:
    """Packed rows reach the device with cu_seqlens and their max length already known: on a meta
    device (where any read of a value fails, as a GPU would have to sync) they equal the host's."""
    for seed in range(5):
        doc_ids = _random_doc_ids(3, 24, seed)
        moved = _batch(doc_ids).to("meta")
        docs = moved.documents
        assert docs.ids is moved.doc_ids and docs.ids.device.type == "meta"
        cu, max_len = cu_seqlens(doc_ids)
        assert docs.varlen[0].device.type == "meta" and docs.varlen[1] == max_len
        assert docs.varlen_args()[0] is docs.varlen[0] and moved.attention_documents is docs
        again = moved.to("meta").documents  # the answers travel with the batch
        assert again.varlen[1] == max_len and again.single is False
    unchecked = _batch(torch.tensor([[0, 0, 1, 1]]).to("meta")).to("meta")
    assert unchecked.documents is None and unchecked.attention_documents is unchecked.doc_ids
    single = _batch(torch.zeros(2, 4, dtype=torch.int64)).to("meta")
    assert single.documents.varlen is None and single.attention_documents is None


def test_a_stale_or_unanswered_layout_is_never_trusted() -> None:
    """A batch whose doc_ids were replaced after its layout was found hands the model the new ids (the
    old answers would let attention cross documents); a layout without answers is checked as it moves;
    asking the host to check ids that already left it is refused with the fix."""
    batch = _batch(torch.zeros(2, 4, dtype=torch.int64)).to("cpu")
    assert batch.attention_documents is None
    batch.doc_ids = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    assert batch.single_document_rows is None and batch.attention_documents is batch.doc_ids
    moved = batch.to("meta")
    assert moved.documents.single is False and moved.documents.varlen[1] == 4
    bare = _batch(torch.tensor([[0, 0, 1, 1]]))
    bare.documents = Documents(bare.doc_ids)  # ids without answers
    assert bare.to("meta").documents.single is False
    with pytest.raises(ValueError, match="needs CPU doc_ids, got them on meta"):
        Documents.checked_on_host(moved.doc_ids)
