"""The draft plugin's recipe checks, parameter groups, losses and accounting, in one process."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY
from pydantic import ValidationError

from slimtrain.core.sentinels import IGNORE_INDEX
from slimtrain.modules.draft.config import DraftConfig
from slimtrain.modules.plugin import PluginContext
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig, Transformer

HEADS = [{"kind": "mtp", "depth": 2}, {"kind": "medusa", "num_heads": 2}, {"kind": "hydra", "num_heads": 2}]


def _build(mode: str = "joint", heads=HEADS, counts=None, **extra):
    stack = PluginStack.from_configs([DraftConfig(type="draft", mode=mode, heads=heads, **extra)])
    model = Transformer(ModelConfig(**TINY))
    model.init_weights(0)
    stack.apply(model)
    stack.init_weights(model, seed=0, token_counts=counts)
    return stack, model


@pytest.mark.parametrize("heads,match", [
    ([{"kind": "mtp", "depth": 0}], "depth"),
    ([{"kind": "medusa", "num_heads": 0}], "num_heads"),
    ([{"kind": "hydra", "num_heads": 2}, {"kind": "hydra"}], "more than once"),
    ([{"kind": "mtp", "loss_weight_schedule": [[10, 0.1], [5, 0.3]]}], "increasing"),
    ([], "at least 1"),
    ([{"kind": "eagle3", "steps": 0}], "steps"),
])
def test_bad_heads_are_refused_with_the_field(heads, match) -> None:
    with pytest.raises(ValidationError, match=match):
        DraftConfig(type="draft", heads=heads)


def test_schedule_switches_the_weight_at_its_step() -> None:
    cfg = DraftConfig(type="draft", heads=[{"kind": "mtp", "loss_weight_schedule": [[0, 0.3], [100, 0.1]]}])
    assert [cfg.heads[0].weight_at(s) for s in (1, 99, 100, 500)] == [0.3, 0.3, 0.1, 0.1]


def _batch(b: int = 2, s: int = 16):
    from types import SimpleNamespace

    ids = torch.randint(0, TINY["vocab_size"], (b, s), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[0] * 10 + [1] * 6, [0] * 12 + [-1] * 4])
    labels = torch.full_like(ids, IGNORE_INDEX)
    same = doc_ids[:, 1:] == doc_ids[:, :-1]
    labels[:, :-1] = torch.where(same & (doc_ids[:, :-1] >= 0), ids[:, 1:], IGNORE_INDEX)
    positions = torch.tensor([list(range(10)) + list(range(6)), list(range(12)) + [0] * 4])
    return SimpleNamespace(input_ids=ids, labels=labels, doc_ids=doc_ids, position_ids=positions,
                           attention_documents=doc_ids)


@pytest.mark.parametrize("mode", ["joint", "frozen"])
def test_frozen_mode_freezes_the_base_and_its_gradients(mode: str) -> None:
    stack, model = _build(mode)
    groups = {g.name: g for g in stack.param_groups(model)}
    heads = {id(p) for p in model.draft.parameters()}
    assert {id(p) for p in groups["draft/heads"].params} == heads
    if mode == "frozen":
        assert groups["draft/frozen_base"].frozen
        base = {id(p) for p in groups["draft/frozen_base"].params}
        assert not base & heads and len(base) == len(list(model.parameters())) - len(heads)
    batch = _batch()
    ctx = PluginContext(model=model, step=1)
    out = model(batch.input_ids, batch.position_ids, batch.doc_ids)
    terms = stack.losses(out, batch, ctx)
    assert set(terms) == {"draft/mtp_1", "draft/mtp_2", "draft/medusa_1", "draft/medusa_2", "draft/hydra_1",
                          "draft/hydra_2"}
    # mtp: lambda / D per depth; medusa and hydra: coefficient x decay^(k-1)
    assert terms["draft/mtp_2"].weight == pytest.approx(0.3 / 2)
    assert terms["draft/medusa_2"].weight == pytest.approx(0.2 * 0.8)
    sum(t.weight * t.value for t in terms.values()).backward()
    base_grad = model.layers[0].attn.q_proj.weight.grad
    assert (base_grad is None or not base_grad.any()) == (mode == "frozen")
    assert model.draft["hydra"].blocks[0][0].linear.weight.grad.abs().sum() > 0


def test_new_heads_start_as_the_output_head() -> None:
    _, model = _build()
    for kind in ("medusa", "hydra"):
        heads = model.draft[kind]
        h = torch.randn(3, TINY["hidden_size"])
        torch.testing.assert_close(heads.lm_heads[1].weight, model.lm_head.weight)
        assert not heads.blocks[0][0].linear.weight.any()
    medusa = model.draft["medusa"]
    torch.testing.assert_close(medusa.logits(1, h), model.lm_head(h))


def test_self_distillation_targets_the_base_distribution() -> None:
    stack, model = _build(heads=[{"kind": "medusa", "num_heads": 1}], targets="self_distill")
    batch = _batch()
    out = model(batch.input_ids, batch.position_ids, batch.doc_ids)
    loss = stack.losses(out, batch, PluginContext(model=model, step=1))["draft/medusa_1"].value
    # The head starts as the output head: its loss at offset 1 is the cross-entropy between the base's
    # distributions at t + 1 and at t, over the positions whose t + 1 stays in the document.
    from slimtrain.modules.draft.targets import shifted_labels

    valid = shifted_labels(batch.labels, batch.doc_ids, 1) != IGNORE_INDEX
    logits = out.logits.float()
    ahead = torch.zeros_like(logits)
    ahead[:, :-1] = logits[:, 1:]
    want = -(ahead[valid].softmax(-1) * logits[valid].log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss, want)


def test_counts_add_the_heads() -> None:
    stack, model = _build()
    cfg = model.cfg
    counts = stack.counts(cfg, seq_len=64)
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    assert counts.active_params == cfg.num_params()
    assert counts.flops_per_token > cfg.flops_per_token(64) + 6 * sum(p.numel() for p in model.draft.parameters())


@pytest.mark.parametrize("head,match", [({"kind": "eagle3", "layers": [1, 3, 0]}, r"\[3, 0\] out of range"),
                                        ({"kind": "eagle3", "layers": [1, 2, 2]}, "repeats a layer"),
                                        ({"kind": "eagle3", "draft_vocab_size": 62}, "exceeds the tokenizer")])
def test_eagle3_checks_need_the_model(head, match) -> None:
    from slimtrain.modules.plugin_stack import check_plugins

    with pytest.raises(ValueError, match=match):
        check_plugins([DraftConfig(type="draft", heads=[head])], ModelConfig(**TINY))


def test_eagle3_reduced_vocabulary_learns_only_its_tokens() -> None:
    """The draft vocabulary is the corpus's most frequent tokens; targets outside it take no loss."""
    counts = torch.zeros(TINY["vocab_size"], dtype=torch.long)
    counts[:20] = 100 - torch.arange(20)
    stack, model = _build(heads=[{"kind": "eagle3", "steps": 2, "draft_vocab_size": 20}], counts=lambda: counts)
    head = model.draft["eagle3"]
    assert head.target_ids().tolist() == list(range(20)) and int(head.t2d.sum()) == 20
    torch.testing.assert_close(head.lm_head.weight, model.lm_head.weight[:20])
    batch = _batch()
    out = model(**stack.inputs(batch, PluginContext(model=model)).model_kwargs())
    assert set(out.layer_hidden) == set(head.hidden_layers)
    from slimtrain.modules.draft.evaluation import base_view
    from slimtrain.modules.draft.losses import position_result
    from slimtrain.modules.draft.targets import shifted_labels

    view = base_view(model, out, batch)
    for o in head.draft_outputs(view):
        r = position_result(o, view, batch.labels, self_distill=False)
        targets = shifted_labels(batch.labels, batch.doc_ids, o.offset)
        assert int(r.count) == int(((targets >= 0) & (targets < 20)).sum())
        assert torch.isfinite(r.loss)


def test_docs_describe_every_draft_key() -> None:
    from pathlib import Path

    from slimtrain.modules.draft.config import Eagle3Head, HydraHead, MedusaHead, MTPHead

    doc = (Path(__file__).resolve().parents[2] / "docs" / "draft.md").read_text()
    for cls in (DraftConfig, MTPHead, MedusaHead, HydraHead, Eagle3Head):
        for name in cls.model_fields:
            if name not in ("type", "kind"):
                assert f"| `{name}` |" in doc, (cls.__name__, name)


def test_frozen_groups_that_leave_nothing_to_train_are_refused() -> None:
    """The draft plugin's frozen base always leaves its heads to train; a plugin whose frozen groups cover
    every parameter is refused where the groups are checked (at validation, before anything launches)."""
    from slimtrain.modules.plugin import ParamGroup, Plugin

    class FreezeAll(Plugin):
        def param_groups(self, model):
            return [ParamGroup("freeze_all/base", list(model.parameters()), frozen=True)]

    model = Transformer(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="nothing would train"):
        PluginStack([FreezeAll(None)]).param_groups(model)
    stack, model = _build("frozen")
    assert any(not g.frozen and g.params for g in stack.param_groups(model))


@pytest.mark.parametrize("self_distill", [False, True])
def test_chunked_head_losses_equal_whole_ones(self_distill: bool) -> None:
    """Logits in recomputed chunks of positions (large micro-batches) give the whole computation's loss, hits
    and gradients, the reduced draft vocabulary included."""
    from slimtrain.modules.draft.evaluation import base_view
    from slimtrain.modules.draft.losses import position_result

    counts = torch.zeros(TINY["vocab_size"], dtype=torch.long)
    counts[:30] = 1
    heads = [{"kind": "eagle3", "steps": 2, "draft_vocab_size": 30}, {"kind": "hydra", "num_heads": 2}]
    stack, model = _build(heads=heads, counts=lambda: counts)
    batch = _batch()
    results = {}
    for chunk in (5, 10_000):
        model.zero_grad()
        out = model(**stack.inputs(batch, PluginContext(model=model)).model_kwargs())
        view = base_view(model, out, batch)
        rs = [position_result(o, view, batch.labels, self_distill, chunk=chunk)
              for kind in ("eagle3", "hydra") for o in model.draft[kind].draft_outputs(view)]
        sum(r.loss for r in rs).backward()
        results[chunk] = ([(float(r.loss), int(r.correct), int(r.count)) for r in rs],
                          [p.grad.clone() for p in model.draft.parameters() if p.grad is not None])
    (small, grads_small), (whole, grads_whole) = results[5], results[10_000]
    assert [c[1:] for c in small] == [c[1:] for c in whole]
    assert [c[0] for c in small] == pytest.approx([c[0] for c in whole], rel=1e-5)
    for a, b in zip(grads_small, grads_whole):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_detach_base_keeps_a_heads_loss_out_of_the_models_layers() -> None:
    """Joint mode with `detach_base`: the head learns, the model's layers get nothing from its loss (an MTP
    head's loss still reaches the embedding and output head it shares)."""
    heads = [{"kind": "medusa", "num_heads": 1, "detach_base": True}, {"kind": "mtp", "detach_base": True}]
    stack, model = _build("joint", heads=heads)
    batch = _batch()
    out = model(batch.input_ids, batch.position_ids, batch.doc_ids)
    terms = stack.losses(out, batch, PluginContext(model=model, step=1))
    sum(t.weight * t.value for t in terms.values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.layers.parameters())
    assert model.draft["medusa"].blocks[0][0].linear.bias.grad.abs().sum() > 0
    assert model.draft["mtp"].depths[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.embed.weight.grad.abs().sum() > 0  # through MTP's shared embedding
