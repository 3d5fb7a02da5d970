"""MoE routers against formulas written out here, and the grouped expert GEMM against the per-expert loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimtrain.modules.moe.experts import GroupedExperts, expert_loop, grouped_mm_available
from slimtrain.modules.moe.router import Routing, route_sigmoid, route_softmax


def test_softmax_top_k_with_and_without_renormalisation() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    e = [[math.exp(v) for v in row] for row in logits.tolist()]
    probs = [[v / sum(row) for v in row] for row in e]
    plain = route_softmax(logits, 2, renormalize=False)
    assert plain.experts.tolist() == [[0, 1], [2, 3]]
    torch.testing.assert_close(plain.weights, torch.tensor([[probs[0][0], probs[0][1]], [probs[1][2], probs[1][3]]]))
    renorm = route_softmax(logits, 2)
    torch.testing.assert_close(renorm.weights.sum(-1), torch.ones(2))
    torch.testing.assert_close(renorm.weights[0, 0], torch.tensor(probs[0][0] / (probs[0][0] + probs[0][1])))
    assert renorm.scores.dtype == torch.float32  # also from bf16 logits
    assert route_softmax(logits.bfloat16(), 2).weights.dtype == torch.float32


def test_sigmoid_bias_selects_but_does_not_weight() -> None:
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]])
    bias = torch.tensor([0.0, 0.0, 2.0, 0.0])  # pushes expert 2 into the top-2
    r = route_sigmoid(logits, 2, bias=bias, renormalize=False, scaling=2.5)
    assert sorted(r.experts[0].tolist()) == [0, 2]
    sig = [1 / (1 + math.exp(-v)) for v in logits[0].tolist()]
    got = dict(zip(r.experts[0].tolist(), r.weights[0].tolist()))
    assert got[0] == pytest.approx(2.5 * sig[0]) and got[2] == pytest.approx(2.5 * sig[2])
    normed = route_sigmoid(logits, 2, bias=bias, renormalize=True)
    assert float(normed.weights.sum()) == pytest.approx(1.0)


def test_group_limited_selection_keeps_to_the_best_groups() -> None:
    # 8 experts in 4 groups of 2. Group scores (sum of the two best sigmoid affinities) rank group 3 and 0 first;
    # expert 5 alone is high but its group (2) loses to them, so it cannot be chosen.
    logits = torch.tensor([[2.0, 2.0, -3.0, -3.0, -3.0, 4.0, 3.0, 3.0]])
    r = route_sigmoid(logits, 3, n_group=4, topk_group=2)
    sig = torch.sigmoid(logits[0])
    group_scores = sig.view(4, 2).sum(-1)
    best_groups = set(group_scores.topk(2).indices.tolist())
    assert best_groups == {0, 3}
    assert set(r.experts[0].tolist()) <= {0, 1, 6, 7} and 5 not in r.experts[0].tolist()


def _routing(tokens: int, experts: int, k: int, seed: int, empty: int | None = None) -> Routing:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    if empty is not None:
        logits[:, empty] = -1e4  # nobody picks it
    return route_softmax(logits, k)


@pytest.mark.parametrize("k", [1, 2])
def test_grouped_experts_equal_the_loop_forward_and_backward(k: int) -> None:
    torch.manual_seed(0)
    experts = GroupedExperts(num_experts=4, hidden=16, intermediate=8)
    with torch.no_grad():
        experts.gate_up.normal_(0, 0.2)
        experts.down.normal_(0, 0.2)
    x = torch.randn(37, 16, requires_grad=True)  # uneven counts; expert 3 gets no token
    routing = _routing(37, 4, k, seed=1, empty=3)
    assert grouped_mm_available(x, 16, 8)
    probe = torch.randn(37, 16)  # a contiguous upstream gradient (grouped_mm's backward refuses stride-0 ones)
    fast = experts(x, routing)
    (fast * probe).sum().backward()
    grads = [t.grad.clone() for t in (x, experts.gate_up, experts.down)]
    for t in (x, experts.gate_up, experts.down):
        t.grad = None
    slow = expert_loop(x, routing, experts.gate_up, experts.down)
    (slow * probe).sum().backward()
    torch.testing.assert_close(fast, slow)
    for got, want in zip(grads, (x.grad, experts.gate_up.grad, experts.down.grad)):
        torch.testing.assert_close(got, want)
    assert torch.equal(experts.gate_up.grad[3], torch.zeros_like(experts.gate_up.grad[3]))


def test_the_loop_is_the_path_where_grouped_gemm_cannot_run() -> None:
    experts = GroupedExperts(num_experts=2, hidden=6, intermediate=3)  # 6 x 4 bytes: not 16-byte aligned
    with torch.no_grad():
        experts.gate_up.normal_()
        experts.down.normal_()
    x = torch.randn(5, 6)
    routing = _routing(5, 2, 1, seed=2)
    assert not grouped_mm_available(x, 6, 3)
    torch.testing.assert_close(experts(x, routing), expert_loop(x, routing, experts.gate_up, experts.down))
    # The loop by hand: expert e's SwiGLU on the tokens that chose it, times its weight.
    manual = torch.zeros_like(x)
    for t in range(5):
        e = int(routing.experts[t, 0])
        gate, up = (x[t] @ experts.gate_up[e].T).split(3)
        manual[t] = routing.weights[t, 0] * ((F.silu(gate) * up) @ experts.down[e].T)
    torch.testing.assert_close(expert_loop(x, routing, experts.gate_up, experts.down), manual)


def test_the_expert_computation_is_chosen_for_the_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    from slimtrain.modules.moe.experts import choose_impl

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(4, 32)
    assert choose_impl(x, 32, 16) == "grouped_mm"
    assert choose_impl(x, 30, 12) == "loop"  # 30 fp32 = 120 bytes: not 16-byte aligned
    assert choose_impl(x, 32, 16, "loop") == "loop"
    with pytest.raises(ValueError, match="experts_impl='triton' cannot run on cpu"):
        choose_impl(x, 32, 16, "triton")


def test_a_compiled_moe_layer_in_fp32_equals_eager() -> None:
    """torch 2.13's grouped_mm traces in bf16 only: under compile an fp32 layer takes another path."""
    from slimtrain.modules.moe.config import MoEConfig
    from slimtrain.modules.moe.layer import MoELayer

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(type="moe", num_experts=4, top_k=2), hidden=32, intermediate=16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 8, 32)
    eager = layer(x)[0]
    compiled = torch.compile(layer)(x)[0]
    torch.testing.assert_close(compiled, eager)
    grads = [torch.autograd.grad(out.square().sum(), layer.experts.gate_up)[0] for out in (eager, compiled)]
    torch.testing.assert_close(grads[1], grads[0])
