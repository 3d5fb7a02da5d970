"""`router`: every MLP becomes two MLPs and a router (top-1). Seams: a sub-layer that reports `aux`
(router logits), a loss read from `aux`, a load counter all-reduced over the data-parallel ranks after
each optimizer step and kept in a buffer (so it resumes), a bias updated from it (aux-loss-free
balancing), parameter groups with engine flags, FLOPs and active parameters."""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtrain.modules.plugin import LossTerm, ModelCounts, ParamGroup, Plugin, PluginConfig, PluginContext, WeightInit


class RouterConfig(PluginConfig):
    """Two experts per MLP, mixed by a learned router; a biased top-1 choice is counted for balancing."""

    type: Literal["router"] = Field(description="Plugin name.")
    balance_weight: float = Field(0.01, ge=0, description="Weight of the Switch-style balance loss.")
    bias_rate: float = Field(0.01, ge=0, description="Step of the aux-loss-free bias update per optimizer step.")


class TwoExperts(nn.Module):
    """A router and two copies of the replaced MLP; returns (output, {"router_logits": [tokens, 2], ...})."""

    def __init__(self, mlp: nn.Module, hidden: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList([mlp, copy.deepcopy(mlp)])
        self.router = nn.Linear(hidden, 2, bias=False)
        self.register_buffer("bias", torch.zeros(2))  # selection only (DeepSeek-V3): not in the weights
        self.register_buffer("load", torch.zeros(2, dtype=torch.float64))  # tokens routed, all ranks, all steps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Both experts, weighted by the router's softmax (Mixtral with top-2 of 2, so that an export to
        # MixtralForCausalLM computes the same); the biased argmax is the choice the load counts.
        logits = self.router(x).float()
        gates = torch.softmax(logits, -1).to(x.dtype)
        out = self.experts[0](x) * gates[..., :1] + self.experts[1](x) * gates[..., 1:]
        choice = (logits + self.bias).argmax(-1)
        return out, {"router_logits": logits.reshape(-1, 2), "router_choice": choice.reshape(-1)}


class RouterPlugin(Plugin):
    order = 10

    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__(cfg)
        self.cfg: RouterConfig = cfg
        self.pending: torch.Tensor | None = None  # this step's routed tokens on this rank, per layer

    def apply(self, model: nn.Module) -> None:
        for layer in model.layers:
            layer.mlp = TwoExperts(layer.mlp, model.cfg.hidden_size)

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        generator = init.generator
        for layer in model.layers:
            moe = layer.mlp
            moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=generator) * 0.02)
            for mine, other in zip(moe.experts[1].parameters(), moe.experts[0].parameters()):
                mine.copy_(other + 0.01 * torch.randn(other.shape, generator=generator))
            moe.bias.zero_()
            moe.load.zero_()

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        experts = [p for layer in model.layers for p in layer.mlp.experts.parameters()]
        routers = [layer.mlp.router.weight for layer in model.layers]
        return [ParamGroup("router/experts", experts, engine={"expert_group": "experts"}),
                ParamGroup("router/routers", routers, lr_scale=0.5, weight_decay=0.0)]

    def losses(self, outputs, batch, ctx: PluginContext) -> dict[str, LossTerm]:
        logits, choices = outputs.aux["router_logits"], outputs.aux["router_choice"]
        real = (batch.doc_ids.reshape(-1) >= 0)
        balance = logits[0].new_zeros(())
        counts = []
        for layer_logits, choice in zip(logits, choices):
            frac = F.one_hot(choice[real], 2).float().mean(0)
            prob = torch.softmax(layer_logits[real], -1).mean(0)
            balance = balance + 2 * (frac * prob).sum()
            counts.append(F.one_hot(choice[real], 2).sum(0).double())
        if ctx.training:
            step_counts = torch.stack(counts).detach()
            self.pending = step_counts if self.pending is None else self.pending + step_counts
        return {"balance": LossTerm(balance / len(logits), self.cfg.balance_weight)}

    def after_optimizer_step(self, ctx: PluginContext) -> None:
        if self.pending is None:
            return
        total = ctx.comm.all_reduce(self.pending.to(ctx.device), group="data")
        self.pending = None
        with torch.no_grad():
            for layer, counts in zip(ctx.model.layers, total):
                moe = layer.mlp
                moe.load += counts.to(moe.load.device)
                moe.bias += self.cfg.bias_rate * torch.sign(counts.mean() - counts).to(moe.bias)

    def metrics(self, ctx: PluginContext) -> dict[str, float]:
        loads = torch.stack([layer.mlp.load for layer in ctx.model.layers])
        share = loads[:, 0] / loads.sum(-1).clamp_min(1)
        return {"router/expert0_share": float(share.mean())}

    def counts(self, model_cfg, counts: ModelCounts, seq_len: int, causal: bool) -> ModelCounts:
        mlp = 3 * model_cfg.hidden_size * model_cfg.intermediate_size * model_cfg.num_layers
        router = 2 * model_cfg.hidden_size * model_cfg.num_layers
        return ModelCounts(total_params=counts.total_params + mlp + router,
                           active_params=counts.active_params + router,
                           flops_per_token=counts.flops_per_token + 6 * router)


ENTRY = (RouterConfig, RouterPlugin)
