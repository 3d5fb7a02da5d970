"""The compressor around the pooling: span layout, initialisation from the decoder, projector and task vectors,
splicing into the decoder, gradients."""

from __future__ import annotations

import pytest
import torch
from compressor_helpers import packed, tiny_compressor, tiny_decoder

from slimtrain.modules.compressor import CONT, NO_TASK, REC, CompressorModelConfig, ContextCompressor, Spans
from slimtrain.modules.transformer import Splice


def test_spans_from_span_ids_follow_runs_rows_and_padding() -> None:
    ids = torch.arange(20).view(2, 10)
    span_ids = torch.tensor([[4, 4, 4, -1, 4, 4, 9, 9, 9, 9],
                             [9, 9, -1, -1, -1, 0, 0, 0, 0, -1]])
    spans = Spans.from_span_ids(ids, span_ids)
    # the same id twice in a row (split by padding) is two spans; a span never runs into the next row
    assert spans.lengths.tolist() == [3, 2, 4, 2, 4]
    assert spans.rows.tolist() == [0, 0, 0, 1, 1]
    assert spans.starts.tolist() == [0, 4, 6, 0, 5]
    assert spans.tokens[2].tolist() == [6, 7, 8, 9]
    assert spans.tokens[3].tolist() == [10, 11, 0, 0]  # zeros after a span's tokens
    assert Spans.from_lists([[1, 2], [3]]).tokens.tolist() == [[1, 2], [3, 0]]


def test_spans_reject_a_batch_without_spans() -> None:
    with pytest.raises(ValueError, match="no span"):
        Spans.from_span_ids(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -1))


def test_truncated_encoder_copies_the_decoders_first_layers() -> None:
    decoder = tiny_decoder(seed=3)
    compressor = tiny_compressor(decoder=decoder, encoder={"source": "truncate", "layers": 2})
    encoder = compressor.encoder
    assert len(encoder.layers) == 2
    assert torch.equal(encoder.embed.weight, decoder.embed.weight)
    for mine, theirs in zip(encoder.layers, decoder.layers):
        ours, reference = mine.state_dict(), theirs.state_dict()
        assert ours.keys() == reference.keys()
        for name in ours:
            assert torch.equal(ours[name], reference[name]), name
    # copies, not shared: training the encoder leaves the (frozen or jointly trained) decoder's weights alone
    assert encoder.embed.weight.data_ptr() != decoder.embed.weight.data_ptr()
    with torch.no_grad():
        encoder.layers[0].attn.q_proj.weight.add_(1.0)
    assert not torch.equal(encoder.layers[0].attn.q_proj.weight, decoder.layers[0].attn.q_proj.weight)


def test_fresh_truncated_encoder_is_drawn_not_copied() -> None:
    decoder = tiny_decoder(seed=3)
    fresh = tiny_compressor(decoder=decoder, encoder={"source": "truncate", "layers": 2, "init": "fresh"}, seed=5)
    again = tiny_compressor(decoder=decoder, encoder={"source": "truncate", "layers": 2, "init": "fresh"}, seed=5)
    assert not torch.equal(fresh.encoder.embed.weight, decoder.embed.weight)
    assert torch.equal(fresh.encoder.layers[1].mlp.up_proj.weight, again.encoder.layers[1].mlp.up_proj.weight)


def test_a_truncation_deeper_than_the_decoder_fails_at_build() -> None:
    cfg = CompressorModelConfig(encoder={"source": "truncate", "layers": 4})
    with pytest.raises(ValueError, match=r"encoder.layers=4 exceeds the decoder's model.num_layers=3"):
        ContextCompressor.from_decoder(cfg, tiny_decoder())


def test_no_layer_encoder_with_factor_one_gives_the_decoders_token_embeddings() -> None:
    """The control the plugin's test builds on: PF 1, identity projector, no layers, no norm = the decoder's input."""
    decoder = tiny_decoder()
    compressor = tiny_compressor(decoder=decoder, encoder={"source": "truncate", "layers": 0}, pooled_layers=0,
                                 pooling_factor=1, final_norm=False, projector_bottleneck=32)
    with torch.no_grad():
        for linear in (compressor.projectors["main"].down, compressor.projectors["main"].up):
            linear.weight.copy_(torch.eye(32))
    ids, span_ids = packed([[1, 2, 3], [4, 5]], 6)
    out = compressor(ids, span_ids)
    torch.testing.assert_close(out.vectors, decoder.embed(ids[span_ids >= 0]), rtol=0, atol=0)


def test_projector_is_two_bias_free_linears_without_activation() -> None:
    projector = tiny_compressor(projector_bottleneck=8).projectors["main"]
    assert projector.down.bias is None and projector.up.bias is None
    assert tuple(projector.down.weight.shape) == (8, 32) and tuple(projector.up.weight.shape) == (32, 8)
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(projector(x), x @ (projector.up.weight @ projector.down.weight).T)
    # the task embeddings start at ones in encoder space and pass through the same projector
    assert torch.equal(projector.task_embeds(), torch.ones(2, 32, dtype=torch.float64))
    torch.testing.assert_close(projector.special("cont"), projector(torch.ones(32, dtype=torch.float64)))


def test_task_vectors_follow_each_span() -> None:
    compressor = tiny_compressor(pooling_factor=3)
    projector = compressor.projectors["main"]
    with torch.no_grad():
        projector.rec_embed.normal_()
        projector.cont_embed.normal_()
    ids, span_ids = packed([[1, 2, 3, 4], [5, 6]], 8)
    plain = compressor(ids, span_ids)
    assert plain.counts.tolist() == [2, 1]
    rec = compressor(ids, span_ids, task="rec")
    assert rec.counts.tolist() == [3, 2]
    torch.testing.assert_close(rec.vectors[[0, 1, 3]], plain.vectors)
    for slot in (2, 4):
        torch.testing.assert_close(rec.vectors[slot], projector.special("rec"))
    mixed = compressor(ids, span_ids, task=torch.tensor([NO_TASK, CONT]))
    assert mixed.counts.tolist() == [2, 2]
    torch.testing.assert_close(mixed.vectors[3], projector.special("cont"))
    assert (REC, CONT) == (0, 1)
    with pytest.raises(ValueError, match="one per span"):
        compressor(ids, span_ids, task=torch.tensor([REC]))


def test_several_decoders_get_their_own_projectors() -> None:
    decoder = tiny_decoder()
    cfg = CompressorModelConfig(encoder={"source": "truncate", "layers": 1}, pooling_factor=2)
    compressor = ContextCompressor.from_decoder(cfg, decoder, decoders={"small": 32, "wide": 48})
    ids, span_ids = packed([[1, 2, 3]], 4)
    assert compressor(ids, span_ids, decoder="wide").vectors.shape == (2, 48)
    assert compressor(ids, span_ids, decoder="small").vectors.shape == (2, 32)
    with pytest.raises(ValueError, match=r"no projector for decoder 'main'"):
        compressor(ids, span_ids)


def test_vectors_splice_into_the_decoder_and_gradients_reach_every_part() -> None:
    decoder = tiny_decoder()
    compressor = tiny_compressor(decoder=decoder, pooling_factor=2).train()
    ctx, ctx_spans = packed([[1, 2, 3], [4, 5, 6, 7]], 8)
    out = compressor(ctx, ctx_spans, task="cont")
    assert out.counts.tolist() == [3, 3]
    # decoder rows: the span's vectors, then three text tokens
    ids = torch.tensor([[0, 0, 0, 9, 10, 11], [0, 0, 0, 12, 13, 14]])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :3] = True
    logits = decoder(ids, splice=out.splice(mask)).logits
    logits.sum().backward()
    encoder, projector = compressor.encoder, compressor.projectors["main"]
    for name, param in [("embed", encoder.embed.weight), ("layer 0", encoder.layers[0].attn.k_proj.weight),
                        ("pooled layer", encoder.layers[1].attn.q_proj.weight), ("down", projector.down.weight),
                        ("cont", projector.cont_embed)]:
        assert param.grad is not None and bool(param.grad.abs().sum() > 0) and param.grad.isfinite().all(), name
    assert projector.rec_embed.grad is None or not projector.rec_embed.grad.any()
    with pytest.raises(ValueError, match="5 slots for 6"):
        mask[0, 2] = False
        out.splice(mask)
    assert isinstance(out.splice(torch.ones(2, 3, dtype=torch.bool), check=False), Splice)


def test_activation_checkpointing_gives_the_same_vectors_and_gradients() -> None:
    ids, span_ids = packed([[1, 2, 3, 4, 5], [6, 7]], 8)
    results = []
    for recompute in (False, True):
        compressor = tiny_compressor(pooling_factor=2, pooled_layers=2).train()
        for block in compressor.encoder.layers:
            block.recompute = recompute
        vectors = compressor(ids, span_ids).vectors
        vectors.square().sum().backward()
        results.append((vectors.detach(), compressor.encoder.layers[1].attn.q_proj.weight.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_a_span_longer_than_the_encoder_takes_fails_with_the_limit() -> None:
    compressor = tiny_compressor(pooling="memory", num_memory_tokens=4)
    ids = torch.ones(1, 62, dtype=torch.long)
    with pytest.raises(ValueError, match=r"66 positions with 4 memory tokens exceeds the encoder's max_seq_len=64"):
        compressor(ids, torch.zeros_like(ids))
