"""The `moe` plugin through the seams: layers chosen, aux read by its losses (written out here), the
aux-loss-free bias from loads reduced over ranks, MaxVio, counts, recipe errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimtrain.data.batch import Batch
from slimtrain.modules.moe.layer import MoELayer
from slimtrain.modules.plugin import PluginContext
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig
from slimtrain.trainer.backends.build import ModelInit, build_model
from slimtrain.trainer.loss.lm import make_loss_fn

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, max_seq_len=32,
                  attention="sdpa")


def _built(**moe):
    stack = PluginStack.from_configs([validate_plugin_config({"type": "moe", **moe})])
    return build_model(CFG, stack, ModelInit(seed=0), torch.device("cpu")), stack


def _batch(seed: int = 0) -> Batch:
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    doc_ids = torch.zeros_like(ids)
    doc_ids[1, 12:] = -1  # padding: excluded from loads and losses
    labels[1, 11:] = -100
    return Batch(input_ids=ids, labels=labels, position_ids=torch.arange(16).expand(2, 16), doc_ids=doc_ids)


class Doubling:
    def all_reduce(self, tensor, op="sum", group="data"):
        return tensor.mul_(2)

    def size(self, group="data"):
        return 2

    def rank(self, group="data"):
        return 0


def test_layers_are_chosen_like_first_k_dense_replace_and_decoder_sparse_step() -> None:
    model, _ = _built(first_k_dense=1, every=2, num_experts=4, top_k=1)
    assert [isinstance(layer.mlp, MoELayer) for layer in model.layers] == [False, True, False, True]


def test_the_aux_loss_and_z_loss_are_the_formulas() -> None:
    model, stack = _built(num_experts=4, top_k=2, z_loss_weight=1e-3, aux_loss_weight=0.1)
    batch = _batch()
    out = model(batch.input_ids)
    terms = stack.losses(out, batch, PluginContext(model=model, training=False))
    real = (batch.doc_ids.reshape(-1) >= 0)
    aux = z = 0.0
    for logits, experts in zip(out.aux["moe/logits"], out.aux["moe/experts"]):
        lg, ex = logits[real], experts[real]
        frac = torch.stack([(ex == e).sum() for e in range(4)]).float() / (len(lg) * 2)
        prob = torch.softmax(lg, -1).mean(0)
        aux += 4 * (frac * prob).sum()
        z += torch.logsumexp(lg, -1).pow(2).mean()
    torch.testing.assert_close(terms["moe/aux"].value, aux / CFG.num_layers)
    torch.testing.assert_close(terms["moe/z"].value, z / CFG.num_layers)
    assert terms["moe/aux"].weight == 0.1 and terms["moe/z"].weight == 1e-3


def test_the_bias_moves_by_the_rate_from_loads_summed_over_micro_batches_and_ranks() -> None:
    model, stack = _built(router="sigmoid", num_experts=4, top_k=2, bias_update_rate=0.01)
    ctx = PluginContext(model=model, step=1, comm=Doubling())
    loss = make_loss_fn(stack, ctx)
    loads = 0
    for seed in (0, 1):  # two micro-batches of one step
        batch = _batch(seed)
        loss(model, batch, 1.0)
        with torch.no_grad():
            experts = model(batch.input_ids).aux["moe/experts"]
        real = batch.doc_ids.reshape(-1, 1) >= 0
        loads = loads + torch.stack([(F.one_hot(ex, 4).sum(1) * real).sum(0) for ex in experts])
    stack.after_optimizer_step(ctx)
    total = 2 * loads  # the other rank's, equal here
    for moe, load in zip([layer.mlp for layer in model.layers], total):
        want = torch.sign(load.double().mean() - load.double()).long()
        assert torch.equal(moe.bias_steps, want)
        assert torch.equal(moe.route(torch.zeros(1, 4)).scores, torch.full((1, 4), 0.5))  # the bias never weights
    maxvio = stack.metrics(ctx)["moe/maxvio"]
    want = (total.double().max(-1).values / total.double().mean(-1) - 1).mean()
    assert maxvio == pytest.approx(float(want))


def test_counts_tell_active_from_total() -> None:
    _, stack = _built(num_experts=8, top_k=2, expert_intermediate_size=16, num_shared_experts=1)
    dense = PluginStack().counts(CFG, 32)
    counts = stack.counts(CFG, 32)
    per_layer = 3 * 32 * 16
    assert counts.total_params - dense.total_params == 4 * (9 * per_layer + 32 * 8 - 3 * 32 * 64)
    assert counts.active_params - dense.active_params == 4 * (3 * per_layer + 32 * 8 - 3 * 32 * 64)
    model, _ = _built(num_experts=8, top_k=2, expert_intermediate_size=16, num_shared_experts=1)
    assert sum(p.numel() for p in model.parameters()) == counts.total_params


@pytest.mark.parametrize("block, message", [
    ({"top_k": 9}, "top_k=9 exceeds num_experts=8"),
    ({"router": "sigmoid", "n_group": 3}, "n_group=3 does not divide num_experts=8"),
    ({"bias_update_rate": 0.01}, "need router: sigmoid"),
    ({"router": "sigmoid", "n_group": 4, "topk_group": 1, "top_k": 3}, "raise topk_group"),
])
def test_bad_settings_fail_with_the_fix(block: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_plugin_config({"type": "moe", **block})


def test_the_build_is_the_same_every_time() -> None:
    """The MoE drops the dense MLPs: the build must not take a new parameter for a dense one whose id was
    freed and reused (that made the head's draw vary from run to run)."""
    first = {k: v.clone() for k, v in _built(num_experts=4, top_k=2)[0].state_dict().items()}
    for _ in range(4):
        again = _built(num_experts=4, top_k=2)[0].state_dict()
        assert all(torch.equal(again[k], v) for k, v in first.items())
