"""The MoE layer that replaces a decoder block's MLP: router, grouped experts, optional shared experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .experts import GroupedExperts
from .router import Routing, apply_capacity, route_sigmoid, route_softmax


class SharedExperts(nn.Module):
    """The always-on experts as one SwiGLU (n experts of width I are one of width n x I); with `gated`, its
    output is scaled per token by sigmoid(gate(x)), a learned H -> 1 projection (Qwen2-MoE)."""

    def __init__(self, hidden: int, width: int, gated: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.gate = nn.Linear(hidden, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out if self.gate is None else out * torch.sigmoid(self.gate(x))


class MoELayer(nn.Module):
    """Routes each token to top-k experts; returns (output, aux) with the router's logits and choices.

    `bias_steps` counts the aux-loss-free updates per expert (+1 / -1 each step); `bias_base` holds the fp32
    bits (as int32) of a bias imported from a checkpoint. The selection bias is
    `bias_base + bias_update_rate x bias_steps`. Integer buffers are exact, and an engine's bf16 cast of the
    module leaves them alone (a float buffer would be rounded to bf16).
    """

    def __init__(self, cfg: MoEConfig, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(hidden, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, hidden, intermediate, cfg.experts_impl)
        self.shared = (SharedExperts(hidden, cfg.num_shared_experts * intermediate, cfg.shared_expert_gate)
                       if cfg.num_shared_experts else None)
        self.register_buffer("bias_steps", torch.zeros(cfg.num_experts, dtype=torch.int64))
        self.register_buffer("bias_base", torch.zeros(cfg.num_experts, dtype=torch.int32))
        # "Dense training, sparse inference" (moe.dense_training_steps): set by the plugin from the step
        # (`on_step_start`, idempotent, so a resume is exact); False in every model built for export or serving.
        self.dense_routing = False

    def selection_bias(self) -> torch.Tensor:
        """The sigmoid router's selection bias, fp32 [E] (zeros for a softmax router)."""
        base = self.bias_base.view(torch.float32)
        return base + self.bias_steps.float() * self.cfg.bias_update_rate

    def set_selection_bias(self, bias: torch.Tensor) -> None:
        """Take `bias` (fp32 [E], e.g. a checkpoint's e_score_correction_bias) as the base; no updates yet."""
        self.bias_base.copy_(bias.detach().to(torch.float32).contiguous().view(torch.int32))
        self.bias_steps.zero_()

    def route(self, logits: torch.Tensor) -> Routing:
        c = self.cfg
        if c.router == "softmax":
            routing = route_softmax(logits, c.top_k, c.renormalize)
            return Routing(routing.weights * c.routed_scaling_factor, routing.experts, routing.scores)
        bias = self.selection_bias()
        return route_sigmoid(logits, c.top_k, bias, c.n_group, c.topk_group, c.renormalize, c.routed_scaling_factor)

    def every_expert(self, routing: Routing) -> Routing:
        """Dense training: every token to every routed expert, weighted by the router's whole distribution
        (softmax probabilities; sigmoid scores normalised to sum to 1), times the routed scaling factor."""
        scores = routing.scores
        weights = scores if self.cfg.router == "softmax" else scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
        experts = torch.arange(scores.shape[-1], device=scores.device).expand(scores.shape[0], -1)
        return Routing(weights * self.cfg.routed_scaling_factor, experts, scores)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat.float(), self.router.weight.float())  # router math in fp32 (bf16 ties flip choices)
        routing = self.route(logits)
        # The top-k choices, also while training densely: the balancing losses and load metrics keep
        # measuring the routing that inference will use.
        aux = {"moe/logits": logits, "moe/scores": routing.scores, "moe/experts": routing.experts}
        # Both only while training: evaluation and export route top-k without drops, as serving does.
        if self.dense_routing and self.training:
            routing = self.every_expert(routing)  # no capacity: every token through every expert
        elif self.cfg.capacity_factor is not None and self.training:
            capacity = math.ceil(self.cfg.capacity_factor * flat.shape[0] * self.cfg.top_k / self.cfg.num_experts)
            routing, aux["moe/dropped"] = apply_capacity(routing, self.cfg.num_experts, capacity, self.cfg.drop_policy)
        out = self.experts(flat, routing)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view_as(x), aux
