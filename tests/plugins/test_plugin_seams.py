"""The seams, one process: the model's forward for every plugin, the context and communicator, model
inputs and loss targets, parameter groups, evaluation and counts, exercised by the example plugins."""

from __future__ import annotations

import pytest
import torch

from slimtrain.data.batch import Batch
from slimtrain.modules.plugin import ParamGroup, Plugin, PluginContext
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig, Splice, Transformer
from slimtrain.trainer.recipe.schema import OptimConfig
from slimtrain.trainer.loss.lm import make_loss_fn
from slimtrain.trainer.optim import build_optimizer

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, max_seq_len=32,
                  attention="sdpa")


def _batch(b: int = 2, s: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG.vocab_size, (b, s), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    return Batch(input_ids=ids, labels=labels, position_ids=torch.arange(s).expand(b, s),
                 doc_ids=torch.zeros_like(ids))


def _built(*blocks: dict) -> tuple[torch.nn.Module, PluginStack]:
    """A model built as a backend builds it: meta, plugins applied, materialised, initialised."""
    from slimtrain.trainer.backends.build import ModelInit, build_model

    stack = PluginStack.from_configs([validate_plugin_config(b) for b in blocks])
    return build_model(CFG, stack, ModelInit(seed=0), torch.device("cpu")), stack


class Doubling:
    """A communicator standing for two ranks that hold the same values."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def all_reduce(self, tensor, op="sum", group="data"):
        self.calls.append(group)
        return tensor.mul_(2)

    def size(self, group="data"):
        return 2

    def rank(self, group="data"):
        return 0


def test_forward_takes_embeddings_splices_them_and_returns_requested_hidden_states() -> None:
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    ids = _batch().input_ids
    out = model(ids, hidden_layers=(0, -1))
    assert torch.equal(model(inputs_embeds=model.embed(ids)).logits, out.logits)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 2:5] = True
    same = model(ids, splice=Splice(mask, model.embed(ids)[mask])).logits
    assert torch.equal(same, out.logits)
    other = model(ids, splice=Splice(mask, torch.randn(int(mask.sum()), CFG.hidden_size))).logits
    assert torch.equal(other[:, :2], out.logits[:, :2]) and not torch.allclose(other[:, 2:], out.logits[:, 2:])
    assert set(out.layer_hidden) == {0, -1} and torch.equal(out.layer_hidden[-1], out.last_hidden)
    assert torch.equal(model.norm(out.last_hidden), out.hidden_states) and out.aux == {}
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model(ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match="asks for layer 3"):
        model(ids, hidden_layers=(3,))


@pytest.mark.parametrize("mode", ["checkpointing", "compile"])
def test_aux_from_a_swapped_layer_survives_recompute_and_compile(example_plugins, mode: str) -> None:
    model, _ = _built({"type": "router"})
    batch = _batch()
    eager = model(batch.input_ids)
    # The router's gradient comes through aux alone (top-1 weights are 1): it must flow under recompute too.
    (eager.logits.sum() + sum(r.square().sum() for r in eager.aux["router_logits"])).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    if mode == "compile":
        model.compile_blocks()
    model.set_activation_checkpointing(True)
    again = model(batch.input_ids)
    (again.logits.sum() + sum(r.square().sum() for r in again.aux["router_logits"])).backward()
    assert len(again.aux["router_logits"]) == CFG.num_layers
    for a, b in zip(eager.aux["router_logits"], again.aux["router_logits"]):
        torch.testing.assert_close(a, b)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_router_reads_aux_and_reduces_its_load_over_the_data_group(example_plugins) -> None:
    model, stack = _built({"type": "router"})
    comm = Doubling()
    ctx = PluginContext(model=model, step=1, comm=comm)
    loss_fn = make_loss_fn(stack, ctx)
    batch = _batch()
    loss, token_sum, terms = loss_fn(model, batch, float(batch.num_label_tokens))
    assert set(terms) == {"router/balance"} and terms["router/balance"] > 0
    assert torch.allclose(loss, token_sum / batch.num_label_tokens + 0.01 * terms["router/balance"])
    ctx.training = False
    loss_fn(model, batch, 1.0)  # an evaluation does not count
    stack.after_optimizer_step(ctx)
    assert comm.calls == ["data"]
    loads = torch.stack([layer.mlp.load for layer in model.layers])
    assert torch.equal(loads.sum(-1), torch.full((CFG.num_layers,), 2 * batch.num_tokens))
    with torch.no_grad():  # what the counter counted: the experts the forward chose, on both "ranks"
        choices = model(batch.input_ids).aux["router_choice"]
    for load, choice in zip(loads, choices):
        assert torch.equal(load, 2 * torch.bincount(choice, minlength=2))
    assert 0 < stack.metrics(ctx)["router/expert0_share"] < 1


def test_plugin_parameter_groups_reach_the_optimizer(example_plugins) -> None:
    model, stack = _built({"type": "router"}, {"type": "probe", "lr_scale": 4.0})
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1), stack.param_groups(model))
    by_name = {}
    for g in opt.param_groups:
        by_name.setdefault(g.get("name"), []).append(g)
    assert {g["lr"] for g in by_name["router/routers"]} == {5e-4} and by_name["router/routers"][0]["weight_decay"] == 0.0
    assert all(g["expert_group"] == "experts" for g in by_name["router/experts"])
    assert {g["lr"] for g in by_name["probe/head"]} == {4e-3} and by_name["probe/head"][0]["weight_decay"] == 0.1
    assert {g["lr"] for g in by_name[None]} == {1e-3}
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted({id(p) for p in model.parameters()})  # each once, none left out
    with pytest.raises(ValueError, match="named 'router/experts'"):
        PluginStack([*stack, *stack]).param_groups(model)

    class Greedy(Plugin):
        def param_groups(self, model):
            return [ParamGroup("greedy/head", [model.probe.weight])]

    with pytest.raises(ValueError, match="in both 'probe/head' and 'greedy/head'"):
        PluginStack([*stack, Greedy(None)]).param_groups(model)


def test_a_frozen_base_is_neither_updated_nor_decayed(example_plugins) -> None:
    model, stack = _built({"type": "probe", "freeze_base": True, "layer": 1})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.5), stack.param_groups(model))
    assert [p for g in opt.param_groups for p in g["params"]] == [model.probe.weight]
    ctx = PluginContext(model=model, step=1)
    batch = _batch()
    loss, _, terms = make_loss_fn(stack, ctx)(model, batch, float(batch.num_label_tokens))
    assert set(terms) == {"probe/ce"}
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        assert p.requires_grad == (n == "probe.weight")
        assert torch.equal(p, before[n]) != (n == "probe.weight"), n


def test_a_plugin_evaluates_on_held_out_batches(example_plugins) -> None:
    model, stack = _built({"type": "probe"})
    ctx = stack.bind(PluginContext(model=model.eval(), step=3, training=False))
    batches = [_batch(seed=s) for s in range(3)]
    result = stack.evaluate(ctx, lambda: iter(batches))
    hits = total = 0
    with torch.no_grad():
        for b in batches:
            guess = model.probe(model(b.input_ids, hidden_layers=(0,)).layer_hidden[0]).argmax(-1)
            keep = b.labels != -100
            hits, total = hits + int((guess == b.labels)[keep].sum()), total + int(keep.sum())
    assert result == {"probe/accuracy": hits / total}


def test_counts_tell_total_from_active_parameters(example_plugins) -> None:
    _, stack = _built({"type": "router"})
    dense = PluginStack().counts(CFG, 32)
    moe = stack.counts(CFG, 32)
    assert dense.total_params == dense.active_params == CFG.num_params()
    assert moe.total_params > moe.active_params > dense.active_params
    assert moe.flops_per_token > dense.flops_per_token


def test_spliced_encoder_outputs_reach_the_model_and_its_gradient(example_plugins) -> None:
    model, stack = _built({"type": "splice", "context": 4, "jitter": 0})
    (transform,) = stack.batch_transforms()
    batch = _batch()
    fields = transform({"labels": batch.labels}, [0, 1])
    batch = Batch(input_ids=batch.input_ids, labels=fields["labels"], position_ids=batch.position_ids,
                  doc_ids=batch.doc_ids, extras={"context_mask": fields["context_mask"]})
    assert (batch.labels[:, :4] == -100).all()
    loss, _, _ = make_loss_fn(stack, PluginContext(model=model))(model, batch, float(batch.num_label_tokens))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.context_encoder.parameters())


def test_the_dense_weights_do_not_depend_on_what_plugins_insert(example_plugins) -> None:
    """The router inserts experts and a router in every layer: the dense model's weights (the first expert is
    the dense MLP) are still the dense build's, each plugin draws from a stream of its own, and a tensor a
    plugin forgets to initialise stops the build by name."""
    dense, _ = _built()
    routed, _ = _built({"type": "router"})
    probe, _ = _built({"type": "probe"})
    mine = dict(routed.named_parameters())
    for name, value in dense.named_parameters():
        moved = name.replace(".mlp.", ".mlp.experts.0.")
        assert torch.equal(mine[moved if moved in mine else name], value), name
    assert not torch.equal(probe.probe.weight, probe.embed.weight)  # same shape, same std: another stream

    class Forgetful(Plugin):
        name = "forgetful"

        def apply(self, model):
            model.extra = torch.nn.Linear(4, 4)

    from slimtrain.trainer.backends.build import ModelInit, build_model

    with pytest.raises(ValueError, match=r"not initialised: \['extra.weight', 'extra.bias'\]"):
        build_model(CFG, PluginStack([Forgetful(None)]), ModelInit(seed=0), torch.device("cpu"))


def test_plugins_work_without_whole_logits_under_the_chunked_loss(example_plugins) -> None:
    """train.loss_chunk_tokens: the model returns no logits; a plugin reading hidden states and aux still works."""
    model, stack = _built({"type": "probe"}, {"type": "router"})
    ctx = PluginContext(model=model, step=1)
    batch = _batch()
    whole = make_loss_fn(stack, ctx)(model, batch, float(batch.num_label_tokens))
    chunked = make_loss_fn(stack, ctx, chunk_tokens=8)(model, batch, float(batch.num_label_tokens))
    torch.testing.assert_close(chunked[0], whole[0])
    assert set(chunked[2]) == {"probe/ce", "router/balance"}
