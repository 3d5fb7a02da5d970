"""Routers: which experts each token goes to and with what weight, in fp32 whatever the training precision.

softmax top-k (Mixtral renormalises the chosen probabilities, Qwen-MoE may not) and sigmoid scores with a
selection-only bias, group-limited top-k and a routed scaling factor (DeepSeek-V3, GLM-4.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """One layer's routing of T tokens to top-k of E experts.

    weights [T, k] fp32: what each chosen expert's output is multiplied by. experts [T, k] int64: the
    chosen experts. scores [T, E] fp32: the router's probabilities (softmax) or affinities (sigmoid), without
    any selection bias: what balancing losses read.
    """

    weights: torch.Tensor
    experts: torch.Tensor
    scores: torch.Tensor


def route_softmax(logits: torch.Tensor, top_k: int, renormalize: bool = True) -> Routing:
    """Softmax over experts, the top-k probabilities; renormalised to sum to 1 when `renormalize`."""
    scores = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return Routing(weights, experts, scores)


def route_sigmoid(logits: torch.Tensor, top_k: int, bias: torch.Tensor | None = None, n_group: int = 1,
                  topk_group: int = 1, renormalize: bool = True, scaling: float = 1.0) -> Routing:
    """Sigmoid affinities; experts chosen on affinity + `bias` (the bias selects, it never weights), within
    the `topk_group` best of `n_group` groups (a group scores the sum of its two best biased affinities);
    weights are the chosen affinities, renormalised when asked, times `scaling`."""
    scores = torch.sigmoid(logits.float())
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        choice = _limit_to_groups(choice, n_group, topk_group)
    experts = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(-1, experts)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return Routing(weights * scaling, experts, scores)


def _limit_to_groups(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """`choice` with the experts outside each token's `topk_group` best groups set to -inf."""
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)
    group_score = grouped.topk(min(2, e // n_group), dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, e)


def apply_capacity(routing: Routing, num_experts: int, capacity: int, by: str = "probability") -> tuple[Routing, torch.Tensor]:
    """Keep at most `capacity` slots per expert; the rest are dropped: their expert becomes `num_experts`
    (a sentinel the experts skip) and their weight 0, so the token keeps only its residual for that slot.

    by "probability": an expert keeps its highest-weighted slots. by "position": first choices of all
    tokens before second choices (GShard's priority), in token order within each. Returns the routing to
    compute and the [T, k] mask of dropped slots.
    """
    t, k = routing.experts.shape
    flat = routing.experts.T.reshape(-1)  # slot-major
    if by == "probability":
        priority = torch.argsort(-routing.weights.T.reshape(-1), stable=True)
    else:
        priority = torch.arange(flat.numel(), device=flat.device)
    order = priority[torch.argsort(flat[priority], stable=True)]  # grouped by expert, by priority within
    counts = torch.bincount(flat, minlength=num_experts)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    dropped = (rank >= capacity).view(k, t).T
    kept = Routing(routing.weights.masked_fill(dropped, 0.0), routing.experts.masked_fill(dropped, num_experts),
                   routing.scores)
    return kept, dropped
