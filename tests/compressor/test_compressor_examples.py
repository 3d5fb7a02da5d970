"""The compressor's examples, cut on the data side: never across documents, deterministic per row key, the
decoder row re-laid with as many vector slots as the compressor gives, labels and the gap metrics' targets where
the docstring of modules/compressor/examples.py puts them."""

from __future__ import annotations

import pytest
import torch

from slimtrain.core.sentinels import IGNORE_INDEX
from slimtrain.modules.compressor.examples import CompressorExamples, vectors_per_context
from slimtrain.modules.compressor.projector import CONT, REC

S = 96


def rows(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two packed rows: three documents (one split by padding at the end), one long document."""
    ids = torch.randint(0, 1000, (2, S), generator=torch.Generator().manual_seed(seed))
    docs = torch.tensor([[0] * 40 + [1] * 5 + [2] * 45 + [-1] * 6, [0] * S])
    labels = torch.where(docs[:, 1:] == docs[:, :-1], ids[:, 1:], IGNORE_INDEX)
    labels = torch.cat([labels, torch.full((2, 1), IGNORE_INDEX)], 1)
    pos = torch.zeros_like(ids)
    return {"input_ids": ids, "labels": labels, "doc_ids": docs, "position_ids": pos}


def transform(**changes) -> CompressorExamples:
    args = dict(context_tokens=16, continuation_tokens=12, min_context_tokens=4, reconstruction_fraction=0.3,
                factor=4, count=None, memory=None)
    return CompressorExamples(**{**args, **changes})


def examples(out: dict[str, torch.Tensor], row: int) -> list[int]:
    return sorted(set(out["ctx_span"][row].tolist()) - {-1})


def test_examples_never_cross_a_document_and_fill_the_row_in_order() -> None:
    fields = rows()
    out = transform()(fields, [5, 6])
    docs = fields["doc_ids"]
    for row in range(2):
        for e in examples(out, row):
            context = out["ctx_span"][row] == e
            # the context and (for a continuation) its targets all sit in one document
            assert len(set(docs[row][context].tolist())) == 1 and docs[row][context][0] >= 0
            decoder = out["dec_doc"][row] == e
            assert decoder.nonzero().flatten().diff().eq(1).all()  # one contiguous run in the decoder row
            assert out["dec_pos"][row][decoder].tolist() == list(range(int(decoder.sum())))
    assert examples(out, 0) and not (out["ctx_span"][0][40:45] >= 0).any()  # the 5-token document gives none


def test_the_decoder_row_holds_vector_slots_then_targets_with_shifted_labels() -> None:
    fields = rows(1)
    t = transform()
    out = t(fields, [0, 1])
    ids = fields["input_ids"]
    for row in range(2):
        for e in examples(out, row):
            context = (out["ctx_span"][row] == e).nonzero().flatten()
            slots = (out["dec_vec"][row] & (out["dec_doc"][row] == e)).nonzero().flatten()
            assert len(slots) == vectors_per_context(len(context), 4, None, None) + 1 == t.slots(len(context))
            where = (out["dec_doc"][row] == e).nonzero().flatten()
            target = out["dec_ids"][row][where[len(slots):]]
            rec = int(out["ctx_task"][row][context[0]]) == REC
            end = int(context[-1]) + 1
            want = ids[row][context] if rec else ids[row][end:end + len(target)]
            assert torch.equal(target[: len(want)], want[: len(target)])
            labels = out["labels"][row][where]
            assert torch.equal(labels[len(slots) - 1:-1], target)  # the task slot predicts the first target
            assert labels[: len(slots) - 1].eq(IGNORE_INDEX).all() and labels[-1] == IGNORE_INDEX
            assert int(out["ctx_task"][row][context[0]]) in (REC, CONT)


def test_gap_targets_are_the_same_tokens_in_both_layouts() -> None:
    fields = rows(2)
    out = transform(reconstruction_fraction=0.0)(fields, [3, 4])
    dec_targets = out["labels"][out["gap_dec"]]
    full_targets = torch.roll(fields["input_ids"], -1, dims=1)[out["gap_full"]]
    assert len(dec_targets) > 0 and torch.equal(dec_targets, full_targets)
    assert not out["rec_dec"].any()


def test_a_row_key_fixes_its_examples_whatever_the_batch() -> None:
    fields = rows(3)
    t = transform(reconstruction_fraction=0.5)
    both = t(fields, [10, 11])
    alone = t({k: v[1:] for k, v in fields.items()}, [11])
    for name, value in alone.items():
        assert torch.equal(value[0], both[name][1]), name
    other = t(fields, [12, 11])  # another key draws other reconstruction choices (seeded by the key)
    assert torch.equal(other["labels"][1], both["labels"][1])
    padding_row = t(fields, [None, 11])
    assert (padding_row["ctx_span"][0] == -1).all() and padding_row["labels"][0].eq(IGNORE_INDEX).all()


@pytest.mark.parametrize("changes,slots", [({"factor": None, "count": 3}, 4), ({"factor": None, "memory": 5}, 6)])
def test_fixed_counts_reserve_their_slots(changes, slots) -> None:
    out = transform(**changes)(rows(), [0, 1])
    for row in range(2):
        for e in examples(out, row):
            assert int((out["dec_vec"][row] & (out["dec_doc"][row] == e)).sum()) == slots


def test_the_decoder_row_never_spills() -> None:
    t = transform(factor=1, context_tokens=16, continuation_tokens=4)  # PF 1: more slots than context tokens
    out = t(rows(), [0, 1])
    assert out["dec_doc"].shape == (2, S)
    for row in range(2):
        last = (out["dec_doc"][row] >= 0).nonzero().flatten()
        assert int(last[-1]) < S


def test_an_uncompressed_prefix_comes_from_the_document_before_the_span() -> None:
    fields = rows(4)
    out = transform(prefix_tokens=6, reconstruction_fraction=0.0)(fields, [7, 8])
    ids = fields["input_ids"]
    with_prefix = 0
    for row in range(2):
        for e in examples(out, row):
            context = (out["ctx_span"][row] == e).nonzero().flatten()
            where = (out["dec_doc"][row] == e).nonzero().flatten()
            first_slot = int((out["dec_vec"][row] & (out["dec_doc"][row] == e)).nonzero()[0])
            p = first_slot - int(where[0])
            assert 0 <= p <= 6
            start = int(context[0])
            assert torch.equal(out["dec_ids"][row][where[:p]], ids[row][start - p:start])  # the tokens before it
            assert out["labels"][row][where[:p]].eq(IGNORE_INDEX).all()  # read, never a target
            with_prefix += p > 0
    assert with_prefix > 0
    # the three layouts measure the same continuation tokens
    targets = [out["labels"][out["gap_dec"]], torch.roll(out["none_ids"], -1, 1)[out["gap_none"]],
               torch.roll(fields["input_ids"], -1, 1)[out["gap_full"]]]
    assert len(targets[0]) > 0 and all(torch.equal(targets[0], t) for t in targets[1:])


def test_no_prefix_draws_the_examples_it_drew_before() -> None:
    fields = rows(5)
    plain = transform()(fields, [1, 2])
    zero = transform(prefix_tokens=0)(fields, [1, 2])
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
