"""Pooling and attention of the compressor's encoder, checked against an independent per-span computation."""

from __future__ import annotations

import pytest
import torch
from compressor_helpers import packed, tiny_compressor
from compressor_reference import count_groups, encode_span, encode_tokens, factor_groups

from slimtrain.modules.compressor import Spans
from slimtrain.modules.compressor.pooling import group_ids, pooling_matrix

SPANS = [[5, 9, 2, 33, 41, 8, 17], [3], [60, 61, 62, 63, 1, 2, 4, 6, 11, 13], [22, 23, 24, 25]]


def _encoded(compressor, spans: list[list[int]], row_len: int = 16) -> list[torch.Tensor]:
    """Each span's encoder vectors (before the projector), the spans packed into rows with padding."""
    ids, span_ids = packed(spans, row_len)
    out = compressor.encoder(Spans.from_span_ids(ids, span_ids))
    return [out.states[i, : int(c)] for i, c in enumerate(out.counts)]


def test_groups_are_consecutive_within_a_span() -> None:
    lengths = torch.tensor([1, 5, 8])
    groups, num = group_ids(lengths, 8, factor=3)
    assert num.tolist() == [1, 2, 3]
    assert groups.tolist() == [[0] + [-1] * 7, [0, 0, 0, 1, 1, -1, -1, -1], [0, 0, 0, 1, 1, 1, 2, 2]]
    groups, num = group_ids(lengths, 8, count=3)
    assert num.tolist() == [1, 3, 3]  # a span shorter than the count gives one vector per token
    assert groups.tolist() == [[0] + [-1] * 7, [0, 0, 1, 1, 2, -1, -1, -1], [0, 0, 0, 1, 1, 1, 2, 2]]


def test_pooling_matrix_is_the_block_diagonal_mean() -> None:
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    groups, _ = group_ids(torch.tensor([5, 2]), 5, factor=2)
    pooled = pooling_matrix(groups, 3, x.dtype) @ x
    expected = [[x[0, 0:2].mean(0), x[0, 2:4].mean(0), x[0, 4]], [x[1, 0:2].mean(0)]]
    for row, means in enumerate(expected):
        for j, mean in enumerate(means):
            torch.testing.assert_close(pooled[row, j], mean)
    assert torch.equal(pooled[1, 1:], torch.zeros(2, 3, dtype=torch.float64))  # groups span 1 lacks stay empty


@pytest.mark.parametrize("pooled_layers", [0, 1, 2])
def test_mean_pooling_matches_the_reference(pooled_layers: int) -> None:
    compressor = tiny_compressor(pooling_factor=3, pooled_layers=pooled_layers)
    for span, got in zip(SPANS, _encoded(compressor, SPANS)):
        torch.testing.assert_close(got, encode_span(compressor.encoder, span, factor_groups(len(span), 3)))


def test_vectors_per_span_matches_the_reference() -> None:
    compressor = tiny_compressor(vectors_per_span=3)
    got = _encoded(compressor, SPANS)
    assert [len(v) for v in got] == [3, 1, 3, 3]
    for span, vectors in zip(SPANS, got):
        torch.testing.assert_close(vectors, encode_span(compressor.encoder, span, count_groups(len(span), 3)))


def test_memory_tokens_match_the_reference() -> None:
    compressor = tiny_compressor(pooling="memory", num_memory_tokens=3)
    got = _encoded(compressor, SPANS)
    assert [len(v) for v in got] == [3, 3, 3, 3]
    for span, vectors in zip(SPANS, got):
        torch.testing.assert_close(vectors, encode_span(compressor.encoder, span))


def test_separate_encoder_without_final_norm_matches_the_reference() -> None:
    encoder = {"source": "separate", "hidden_size": 24, "num_layers": 2, "num_heads": 3, "num_kv_heads": 1,
               "intermediate_size": 40, "init_std": 0.1}
    compressor = tiny_compressor(encoder=encoder, pooling_factor=2, final_norm=False)
    assert compressor.encoder.norm is None
    for span, got in zip(SPANS, _encoded(compressor, SPANS)):
        torch.testing.assert_close(got, encode_span(compressor.encoder, span, factor_groups(len(span), 2)))


def test_encode_tokens_matches_the_reference() -> None:
    compressor = tiny_compressor()
    ids, span_ids = packed(SPANS, 16)
    states = compressor.encoder.encode_tokens(Spans.from_span_ids(ids, span_ids))
    for i, span in enumerate(SPANS):
        torch.testing.assert_close(states[i, : len(span)], encode_tokens(compressor.encoder, span))


@pytest.mark.parametrize("pooling", [{"pooling_factor": 3}, {"pooling_factor": 3, "pooled_layers": 2},
                                     {"pooling": "memory", "num_memory_tokens": 2}])
def test_a_span_sees_only_its_own_tokens(pooling: dict) -> None:
    """Other spans of the same row, and the padding, do not reach a span's vectors."""
    compressor = tiny_compressor(**pooling)
    ids, span_ids = packed(SPANS, 16)
    before = compressor(ids, span_ids)
    changed = ids.clone()
    changed[span_ids != 0] = (changed[span_ids != 0] + 5) % 64  # every token but span 0's, padding included
    after = compressor(changed, span_ids)
    first = int(before.counts[0])
    torch.testing.assert_close(after.vectors[:first], before.vectors[:first], rtol=0, atol=0)
    assert not torch.allclose(after.vectors[first:], before.vectors[first:])  # the others did change


def test_attention_is_bidirectional_within_a_span() -> None:
    compressor = tiny_compressor(pooling_factor=2)
    ids, span_ids = packed([SPANS[0]], 8)
    spans = Spans.from_span_ids(ids, span_ids)
    changed = ids.clone()
    changed[0, len(SPANS[0]) - 1] += 1  # the span's last token
    later = Spans.from_span_ids(changed, span_ids)
    tokens, tokens_later = compressor.encoder.encode_tokens(spans), compressor.encoder.encode_tokens(later)
    assert (tokens[0, 0] - tokens_later[0, 0]).abs().max() > 1e-3  # the first position saw the last token
    pooled, pooled_later = compressor.encoder(spans).states, compressor.encoder(later).states
    assert (pooled[0, 0] - pooled_later[0, 0]).abs().max() > 1e-3  # so does the first pooled vector


def test_pooling_factor_one_with_an_identity_projector_gives_the_token_states() -> None:
    compressor = tiny_compressor(pooling_factor=1, pooled_layers=2, projector_bottleneck=32)
    projector = compressor.projectors["main"]
    with torch.no_grad():
        projector.down.weight.copy_(torch.eye(32))
        projector.up.weight.copy_(torch.eye(32))
    ids, span_ids = packed(SPANS, 16)
    spans = Spans.from_span_ids(ids, span_ids)
    out = compressor(ids, span_ids)
    assert out.counts.tolist() == [len(s) for s in SPANS]
    tokens = compressor.encoder.encode_tokens(spans)
    torch.testing.assert_close(out.vectors, tokens[spans.valid], rtol=0, atol=1e-12)
