"""Balancing at every level, capacity and token dropping, the routing metrics and the load heat map,
each against formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch
from test_moe_plugin import CFG, Doubling, _batch, _built

from slimtrain.modules.context import LocalCommunicator
from slimtrain.modules.moe.experts import GroupedExperts, expert_loop
from slimtrain.modules.moe.plots import plot_expert_load
from slimtrain.modules.moe.router import Routing, apply_capacity, route_sigmoid
from slimtrain.modules.plugin import PluginContext
from slimtrain.modules.plugin_registry import validate_plugin_config


def _slot_shares(experts: torch.Tensor, keep: torch.Tensor, e: int, k: int) -> torch.Tensor:
    return torch.stack([((experts == i) & keep.unsqueeze(-1)).sum() for i in range(e)]).float() / (keep.sum() * k)


def _layers(model, batch):
    out = model(batch.input_ids)
    return out, list(zip(out.aux["moe/logits"], out.aux["moe/experts"]))


class OtherRank:
    """A second rank whose expert counts and tokens are `extra`: the all-reduce adds them."""

    def __init__(self, extra: torch.Tensor) -> None:
        self.extra = extra

    def all_reduce(self, tensor, op="sum", group="data"):
        return tensor.add_(self.extra)

    def size(self, group="data"):
        return 2

    def rank(self, group="data"):
        return 0


def test_the_sequence_loss_is_the_micro_batch_loss_of_each_row_averaged() -> None:
    model, stack = _built(num_experts=4, top_k=2, seq_aux_loss_weight=0.5)
    batch = _batch()
    out, layers = _layers(model, batch)
    terms = stack.losses(out, batch, PluginContext(model=model, training=False))
    want = 0.0
    for logits, experts in layers:
        rows = []
        for r in range(2):
            keep = batch.doc_ids[r] >= 0
            lg, ex = logits.view(2, 16, 4)[r], experts.view(2, 16, 2)[r]
            prob = torch.softmax(lg[keep], -1).mean(0)
            rows.append(4 * (_slot_shares(ex, keep, 4, 2) * prob).sum())
        want += sum(rows) / 2
    torch.testing.assert_close(terms["moe/seq_aux"].value, want / CFG.num_layers)
    assert terms["moe/seq_aux"].weight == 0.5


def test_the_global_loss_takes_expert_counts_from_every_rank() -> None:
    model, stack = _built(num_experts=4, top_k=2, global_aux_loss_weight=0.1)
    batch = _batch()
    out, layers = _layers(model, batch)
    other = torch.arange(4 * CFG.num_layers + 1, dtype=torch.float32)  # the other rank's counts, then its tokens
    terms = stack.losses(out, batch, PluginContext(model=model, training=True, comm=OtherRank(other)))
    keep = batch.doc_ids.reshape(-1) >= 0
    want = 0.0
    for i, (logits, experts) in enumerate(layers):
        mine = torch.stack([((experts == e) & keep.unsqueeze(-1)).sum() for e in range(4)]).float()
        counts, tokens = mine + other[4 * i:4 * i + 4], keep.sum() + other[-1]
        prob = torch.softmax(logits[keep], -1).mean(0)
        want += 4 * (counts / (tokens * 2) * prob).sum()
    torch.testing.assert_close(terms["moe/global_aux"].value, want / CFG.num_layers)
    # An evaluation stays on this rank's tokens (ranks may see different numbers of held-out batches).
    local = stack.losses(out, batch, PluginContext(model=model, training=False, comm=OtherRank(other)))
    torch.testing.assert_close(local["moe/global_aux"].value, terms["moe/aux"].value)


def _hand_routing() -> Routing:
    # 4 tokens, top-2 of 3 experts; expert 0 is everyone's first choice.
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 2]])
    weights = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.5, 0.5]])
    return Routing(weights, experts, torch.full((4, 3), 1 / 3))


def test_capacity_by_probability_keeps_each_experts_heaviest_slots() -> None:
    kept, dropped = apply_capacity(_hand_routing(), 3, capacity=2, by="probability")
    # expert 0 keeps tokens 1 (0.9) and 2 (0.7); experts 1 and 2 have two slots each: all kept.
    assert dropped.tolist() == [[True, False], [False, False], [False, False], [True, False]]
    assert kept.experts[0, 0] == 3 and kept.weights[0, 0] == 0 and kept.weights[1, 0] == 0.9


def test_capacity_by_position_serves_first_choices_first_in_token_order() -> None:
    routing = Routing(torch.full((4, 2), 0.5), torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0]]), torch.zeros(4, 2))
    _, dropped = apply_capacity(routing, 2, capacity=2, by="position")
    # first choices: expert 1 <- tokens 0, 3; expert 0 <- tokens 1, 2: full, so every second choice drops.
    assert dropped.tolist() == [[False, True], [False, True], [False, True], [False, True]]


@pytest.mark.parametrize("hidden, inter", [(32, 16), (24, 12)])  # grouped GEMM; unaligned: the loop
def test_a_dropped_slot_is_computed_by_no_expert(hidden: int, inter: int) -> None:
    torch.manual_seed(0)
    experts = GroupedExperts(3, hidden, inter)
    torch.nn.init.normal_(experts.gate_up, std=0.2)
    torch.nn.init.normal_(experts.down, std=0.2)
    x = torch.randn(4, hidden)
    kept, dropped = apply_capacity(_hand_routing(), 3, capacity=2)
    got = experts(x, kept)
    # Written out: each token's kept slots only.
    want = torch.zeros_like(x)
    for t in range(4):
        for s in range(2):
            if not dropped[t, s]:
                e = int(kept.experts[t, s])
                gate, up = (x[t] @ experts.gate_up[e].T).split(inter)
                want[t] += kept.weights[t, s] * ((torch.nn.functional.silu(gate) * up) @ experts.down[e].T)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(expert_loop(x, kept, experts.gate_up, experts.down), want)


def test_dropping_is_logged_and_counted_in_the_model() -> None:
    model, stack = _built(num_experts=4, top_k=2, capacity_factor=0.5)
    ctx = PluginContext(model=model, step=1, comm=LocalCommunicator())
    batch = _batch()
    out = model(batch.input_ids)
    stack.losses(out, batch, ctx)
    stack.after_optimizer_step(ctx)
    metrics = stack.metrics(ctx)
    keep = batch.doc_ids.reshape(-1, 1) >= 0
    capacity = math.ceil(0.5 * 32 * 2 / 4)
    for i, dropped in enumerate(out.aux["moe/dropped"]):
        assert (~dropped).sum() <= 4 * capacity  # no expert over capacity
        assert metrics[f"moe/dropped/layer{i}"] == pytest.approx(float((dropped & keep).sum() / (keep.sum() * 2)))
    assert metrics["moe/dropped"] > 0.3


def test_cv_entropy_and_micro_batch_maxvio_are_the_formulas() -> None:
    model, stack = _built(num_experts=4, top_k=2)
    ctx = PluginContext(model=model, step=1, comm=Doubling())
    loads, micro_maxvio, entropy, tokens = 0, 0, 0, 0
    for seed in (0, 1):  # two micro-batches
        batch = _batch(seed)
        out, layers = _layers(model, batch)
        stack.losses(out, batch, ctx)
        keep = batch.doc_ids.reshape(-1) >= 0
        counts = torch.stack([torch.stack([((ex == e) & keep.unsqueeze(-1)).sum() for e in range(4)])
                              for _, ex in layers]).double()
        loads = loads + counts
        micro_maxvio = micro_maxvio + counts.max(-1).values / counts.mean(-1) - 1
        probs = [torch.softmax(lg[keep].double(), -1) for lg, _ in layers]
        entropy = entropy + torch.stack([-(p * p.log()).sum(-1).sum() for p in probs])
        tokens += keep.sum()
    stack.after_optimizer_step(ctx)
    got = stack.metrics(ctx)
    cv = loads.std(-1, unbiased=False) / loads.mean(-1)
    assert got["moe/cv"] == pytest.approx(float(cv.mean()))
    assert got["moe/entropy/layer2"] == pytest.approx(float(entropy[2] / tokens))
    assert got["moe/maxvio_micro"] == pytest.approx(float((micro_maxvio / 2).mean()))
    assert got["moe/load/layer0"] == pytest.approx((loads[0] / loads[0].sum()).tolist(), abs=1e-6)
    assert "moe/dropped" not in got  # dropless


def test_the_bias_lowers_maxvio_on_a_skewed_router() -> None:
    model, stack = _built(num_experts=8, top_k=2, router="sigmoid", bias_update_rate=0.02)
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.router.weight[:2] += 0.5  # experts 0 and 1 favoured by every token
    ctx = PluginContext(model=model, step=1, comm=LocalCommunicator())
    batch = _batch()
    history = []
    for _ in range(60):  # the bias alone moves: no optimizer step on the weights
        with torch.no_grad():
            stack.losses(model(batch.input_ids), batch, ctx)
        stack.after_optimizer_step(ctx)
        history.append(stack.metrics(ctx)["moe/maxvio"])
    assert history[0] > 1.0
    assert max(history[-10:]) < history[0] / 2


def test_the_heat_map_is_drawn_from_the_vector_metrics(tmp_path) -> None:
    records = [{"step": s, "loss": 1.0, "moe/load/layer1": [0.5, 0.25, 0.25, 0.0], "moe/load/layer3": [0.25] * 4}
               for s in (10, 20, 30)] + [{"step": 30, "eval_loss": 1.0}]
    path = plot_expert_load(records, tmp_path / "moe_load.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert plot_expert_load([{"step": 1, "loss": 1.0}], tmp_path / "none.png") is None


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_capacity_must_be_positive(value: float) -> None:
    with pytest.raises(ValueError, match=f"capacity_factor={value} must be > 0"):
        validate_plugin_config({"type": "moe", "capacity_factor": value})


def test_route_sigmoid_with_a_bias_selects_without_weighting() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0, -1.0]])
    routing = route_sigmoid(logits, 1, bias=torch.tensor([0.0, 0.0, 0.0, 5.0]), renormalize=False)
    assert routing.experts.tolist() == [[3]] and routing.weights == torch.sigmoid(torch.tensor(-1.0))


def test_evaluation_is_dropless_as_serving_is() -> None:
    model, _ = _built(num_experts=4, top_k=2, capacity_factor=0.5)
    dropless, _ = _built(num_experts=4, top_k=2)
    batch = _batch()
    model.eval(), dropless.eval()
    out = model(batch.input_ids)
    assert "moe/dropped" not in out.aux
    torch.testing.assert_close(out.logits, dropless(batch.input_ids).logits)
