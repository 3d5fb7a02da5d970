"""The compressor plugin in one process: PF 1 with an identity projector reproduces the decoder's own loss on the
full context (gap closed = 1), the encoder starts from the decoder's layers (a branch's values when branching),
parameter groups, the loss reaches the encoder and not a frozen decoder, and the recipe refusals."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from slimtrain.core.sentinels import IGNORE_INDEX
from slimtrain.data.batch import Batch
from slimtrain.modules.plugin import PluginContext
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.trainer.loss.lm import lm_loss

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                  max_seq_len=128, init_std=0.1)
BLOCK = {"type": "compressor", "encoder": {"source": "truncate", "layers": 2}, "pooling_factor": 4,
         "context_tokens": 16, "continuation_tokens": 16, "reconstruction_fraction": 0.3}


def build(starting=None, **changes) -> tuple[PluginStack, Transformer]:
    stack = PluginStack.from_configs([validate_plugin_config({**BLOCK, **changes})])
    model = Transformer(stack.configure(CFG))
    model.init_weights(0)
    stack.apply(model)
    stack.init_weights(model, seed=0, starting=starting)
    return stack, model.double()


def batch(stack: PluginStack, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (2, 96), generator=g)
    docs = torch.tensor([[0] * 50 + [1] * 40 + [-1] * 6, [0] * 96])
    labels = torch.where(docs[:, 1:] == docs[:, :-1], ids[:, 1:], IGNORE_INDEX)
    labels = torch.cat([labels, torch.full((2, 1), IGNORE_INDEX)], 1)
    pos = torch.stack([torch.cat([torch.arange(50), torch.arange(40), torch.zeros(6, dtype=torch.long)]),
                       torch.arange(96)])
    fields = {"input_ids": ids, "labels": labels, "doc_ids": docs, "position_ids": pos}
    for transform in stack.batch_transforms():
        fields = {**fields, **transform(fields, [seed, seed + 1])}
    extras = {k: v for k, v in fields.items() if k not in ("input_ids", "labels", "doc_ids", "position_ids")}
    return Batch(ids, fields["labels"], pos, docs, extras=extras)


@pytest.mark.parametrize("prefix", [0, 4])
def test_pooling_factor_1_with_an_identity_projector_reads_the_full_context(prefix: int) -> None:
    """No encoder layer, no norm, PF 1, identity projector, no task vectors: the vectors are the context's own
    token embeddings, so the decoder's loss on the continuation is its loss with the context tokens (after the
    same uncompressed prefix)."""
    stack, model = build(encoder={"source": "truncate", "layers": 0}, pooling_factor=1, pooled_layers=0,
                         final_norm=False, task_vectors=False, reconstruction_fraction=0.0, prefix_tokens=prefix)
    projector = model.compressor.projectors["main"]
    with torch.no_grad():
        projector.down.weight.copy_(torch.eye(CFG.hidden_size))
        projector.up.weight.copy_(torch.eye(CFG.hidden_size))
        model.compressor.encoder.embed.weight.copy_(model.embed.weight)
    model.eval()
    ctx = stack.bind(PluginContext(model=model, training=False))
    with torch.no_grad():
        out = stack.evaluate(ctx, lambda: [batch(stack)])
    assert out["compressor/loss_comp"] == pytest.approx(out["compressor/loss_full"], abs=1e-12)
    assert abs(out["compressor/loss_none"] - out["compressor/loss_full"]) > 1e-3  # the context changes the loss
    assert out["compressor/gap_closed"] == pytest.approx(1.0, abs=1e-9)


def test_the_encoder_starts_as_the_decoders_first_layers() -> None:
    _, model = build()
    encoder = model.compressor.encoder
    for name, p in encoder.named_parameters():
        if name.startswith(("embed.", "layers.")):
            assert torch.equal(p, model.get_parameter(name)) and p.data_ptr() != model.get_parameter(name).data_ptr()
    branch = {"layers.1.attn.q_proj.weight": torch.full((32, 32), 0.5)}  # what a branch will load there
    _, branched = build(starting=branch.get)
    assert torch.equal(branched.compressor.encoder.layers[1].attn.q_proj.weight, branch["layers.1.attn.q_proj.weight"])
    _, fresh = build(encoder={"source": "truncate", "layers": 2, "init": "fresh"})
    assert not torch.equal(fresh.compressor.encoder.layers[0].attn.q_proj.weight, fresh.layers[0].attn.q_proj.weight)


@pytest.mark.parametrize("mode", ["frozen", "joint"])
def test_the_loss_trains_the_encoder_and_a_joint_decoder_only(mode: str) -> None:
    stack, model = build(decoder=mode)
    groups = {g.name: g for g in stack.param_groups(model)}
    mine = {id(p) for g in ("compressor/encoder", "compressor/projector") for p in groups[g].params}
    assert mine == {id(p) for p in model.compressor.parameters()}
    assert ("compressor/frozen_decoder" in groups) == (mode == "frozen")
    if mode == "frozen":
        for p in groups["compressor/frozen_decoder"].params:
            p.requires_grad_(False)
    b = batch(stack)
    ctx = stack.bind(PluginContext(model=model, step=1))
    loss, _, _ = lm_loss(model, b, label_norm=float((b.labels != IGNORE_INDEX).sum()), plugins=stack, ctx=ctx)
    loss.backward()
    assert model.compressor.encoder.layers[0].attn.q_proj.weight.grad.abs().sum() > 0
    assert model.compressor.projectors["main"].cont_embed.grad.abs().sum() > 0
    assert (model.layers[0].attn.q_proj.weight.grad is not None) == (mode == "joint")


def test_vectors_land_in_the_slots_the_batch_reserves() -> None:
    stack, model = build()
    b = batch(stack, 3)
    ctx = stack.bind(PluginContext(model=model))
    inputs = ctx.inputs(b)
    assert torch.equal(inputs.splice.mask, b.extras["dec_vec"]) and torch.equal(inputs.input_ids, b.extras["dec_ids"])
    assert inputs.splice.embeds.shape[0] == int(b.extras["dec_vec"].sum())
    hidden = model(**inputs.model_kwargs()).hidden_states
    marked = torch.zeros_like(inputs.splice.embeds)
    marked[-1] = 1e3  # the last vector (the row's last example's task vector) changes that slot's input only there
    moved = model(**{**inputs.model_kwargs(), "splice": type(inputs.splice)(inputs.splice.mask,
                                                                            inputs.splice.embeds + marked)})
    changed = (moved.hidden_states - hidden).abs().sum(-1) > 0
    last_slot = b.extras["dec_vec"].flatten().nonzero()[-1]
    doc = b.extras["dec_doc"].flatten()
    assert changed.flatten()[last_slot] and (doc[changed.flatten()] == doc[last_slot]).all()


@pytest.mark.parametrize("changes,match", [
    ({"pooling_factor": 0}, "pooling_factor"),
    ({"min_context_tokens": 32}, "min_context_tokens"),
    ({"task_vectors": False}, "reconstruction_fraction"),
    ({"continuation_tokens": 1}, "continuation_tokens"),
])
def test_bad_blocks_are_refused_with_the_field(changes, match) -> None:
    with pytest.raises(ValidationError, match=match):
        validate_plugin_config({**BLOCK, **changes})


def test_a_context_longer_than_the_encoder_takes_is_refused() -> None:
    stack = PluginStack.from_configs([validate_plugin_config({**BLOCK, "context_tokens": 200,
                                                              "continuation_tokens": 8})])
    with pytest.raises(ValueError, match="context_tokens=200 .* max_seq_len=128"):
        stack.configure(CFG)


# -- several decoders ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_decoder(tmp_path_factory) -> str:
    """A second decoder, 48 wide, as a local LlamaForCausalLM directory (an export)."""
    from slimtrain.trainer.export.hf import write_hf_dir

    cfg = CFG.model_copy(update={"hidden_size": 48, "num_layers": 2})
    other = Transformer(cfg)
    other.init_weights(5)
    out = tmp_path_factory.mktemp("other") / "hf"
    write_hf_dir(dict(other.state_dict()), cfg, out, tokenizer_dir=None, ids={})
    return str(out)


def test_each_decoder_has_its_projector_and_the_runs_own_is_unchanged(other_decoder: str) -> None:
    stack, model = build(decoders=[{"name": "other", "path": other_decoder}])
    projectors = model.compressor.projectors
    assert list(projectors) == ["main", "other"] and projectors["other"].up.weight.shape == (48, 32)
    _, single = build()
    for p, q in zip(projectors["main"].parameters(), single.compressor.projectors["main"].parameters()):
        assert torch.equal(p, q)  # the run's own projector draws what it drew without the extra decoder
    assert stack.model_sources() == [("plugins.compressor.decoders.0.path", __import__("pathlib").Path(other_decoder))]


def test_a_step_drawing_another_decoder_trains_the_compressor_through_it(other_decoder: str) -> None:
    from slimtrain.modules.compressor.decoders import drawn_decoder

    names = ["main", "other"]
    draws = [drawn_decoder(names, step) for step in range(1, 41)]
    assert draws == [drawn_decoder(names, step) for step in range(1, 41)] and set(draws) == set(names)
    stack, model = build(decoders=[{"name": "other", "path": other_decoder}])
    step = draws.index("other") + 1
    ctx = stack.bind(PluginContext(model=model, step=step))
    stack.on_step_start(ctx)
    b = batch(stack)
    loss, _, terms = lm_loss(model, b, label_norm=float((b.labels != IGNORE_INDEX).sum()), plugins=stack, ctx=ctx)
    assert set(terms) == {"compressor/decoder_other"} and float(terms["compressor/decoder_other"]) > 0
    loss.backward()
    projectors = model.compressor.projectors
    assert projectors["other"].down.weight.grad.abs().sum() > 0 and projectors["main"].down.weight.grad is None
    assert model.compressor.encoder.layers[0].attn.q_proj.weight.grad.abs().sum() > 0
    extra = stack.plugins[0].extra.models["other"]
    assert all(p.grad is None for p in extra.parameters())
    model.eval()
    ctx.training = False
    with torch.no_grad():
        out = stack.evaluate(ctx, lambda: [batch(stack)])
    assert {"compressor/gap_closed", "compressor/gap_closed/other", "compressor/rec_acc/other"} <= set(out)


def test_bad_extra_decoders_are_refused(other_decoder: str, tmp_path) -> None:
    with pytest.raises(ValidationError, match="not 'main'"):
        validate_plugin_config({**BLOCK, "decoders": [{"name": "main", "path": other_decoder}]})
    stack = PluginStack.from_configs([validate_plugin_config({**BLOCK, "decoders": [
        {"name": "other", "path": other_decoder}]})])
    with pytest.raises(ValueError, match="vocabulary of 64 tokens and the data's tokenizer 100"):
        stack.configure(CFG.model_copy(update={"vocab_size": 100}))
    stack = PluginStack.from_configs([validate_plugin_config({**BLOCK, "decoders": [
        {"name": "other", "path": str(tmp_path)}]})])
    with pytest.raises(ValueError, match="decoders.0.path=.* holds no config.json"):
        stack.configure(CFG)


def test_docs_describe_every_compressor_key() -> None:
    from pathlib import Path

    from slimtrain.modules.compressor.config import SeparateEncoder, TruncatedEncoder
    from slimtrain.modules.compressor.recipe import CompressorConfig, ExtraDecoder

    doc = (Path(__file__).resolve().parents[2] / "docs" / "compressor.md").read_text()
    for cls in (CompressorConfig, TruncatedEncoder, SeparateEncoder, ExtraDecoder):
        for name in cls.model_fields:
            if name != "type":
                assert f"| `{name}` |" in doc, (cls.__name__, name)
