"""The MoE layer that replaces a decoder block's MLP: router, grouped experts, optional shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .experts import GroupedExperts
from .router import Routing, route_sigmoid, route_softmax


class SharedExperts(nn.Module):
    """The always-on experts as one SwiGLU (n experts of width I are one of width n x I)."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoELayer(nn.Module):
    """Routes each token to top-k experts; returns (output, aux) with the router's logits and choices.

    `bias_steps` counts the aux-loss-free updates per expert (+1 / -1 each step): the selection bias is
    `bias_update_rate x bias_steps`. An integer buffer is exact, and an engine's bf16 cast leaves it alone.
    """

    def __init__(self, cfg: MoEConfig, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(hidden, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, hidden, intermediate)
        self.shared = SharedExperts(hidden, cfg.num_shared_experts * intermediate) if cfg.num_shared_experts else None
        self.register_buffer("bias_steps", torch.zeros(cfg.num_experts, dtype=torch.int64))

    def route(self, logits: torch.Tensor) -> Routing:
        c = self.cfg
        if c.router == "softmax":
            routing = route_softmax(logits, c.top_k, c.renormalize)
            return Routing(routing.weights * c.routed_scaling_factor, routing.experts, routing.scores)
        bias = self.bias_steps.float() * c.bias_update_rate if c.bias_update_rate else None
        return route_sigmoid(logits, c.top_k, bias, c.n_group, c.topk_group, c.renormalize, c.routed_scaling_factor)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat.float(), self.router.weight.float())  # router math in fp32 (bf16 ties flip choices)
        routing = self.route(logits)
        out = self.experts(flat, routing)
        if self.shared is not None:
            out = out + self.shared(flat)
        aux = {"moe/logits": logits, "moe/scores": routing.scores, "moe/experts": routing.experts}
        return out.view_as(x), aux
