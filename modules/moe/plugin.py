"""The `moe` plugin: MoE layers in place of chosen MLPs, balancing losses, the aux-loss-free bias, load metrics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimtrain.modules.plugin import LossTerm, ModelCounts, Plugin, PluginContext, WeightInit
from slimtrain.modules.plugin_registry import register_plugin

from .config import MoEConfig
from .layer import MoELayer

MOE_ORDER = 10  # before qat (20): experts exist before anything wraps the model's layers


def moe_layer_indices(cfg: MoEConfig, num_layers: int) -> list[int]:
    """The layers whose MLP becomes an MoE layer: from `first_k_dense` on, every `every`-th."""
    return [i for i in range(cfg.first_k_dense, num_layers) if (i - cfg.first_k_dense) % cfg.every == 0]


@register_plugin("moe", MoEConfig)
class MoEPlugin(Plugin):
    """Mixture of experts (docs/moe.md)."""

    order = MOE_ORDER

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg)
        self.cfg: MoEConfig = cfg
        self.pending: torch.Tensor | None = None  # this step's expert loads on this rank, [moe layers, experts]
        self.last_loads: torch.Tensor | None = None  # the last step's, summed over ranks

    def _width(self, model_cfg) -> int:
        return self.cfg.expert_intermediate_size or model_cfg.intermediate_size

    def apply(self, model: nn.Module) -> None:
        chosen = moe_layer_indices(self.cfg, model.cfg.num_layers)
        if not chosen:
            raise ValueError(f"first_k_dense={self.cfg.first_k_dense} leaves no layer of {model.cfg.num_layers} "
                             "to make an MoE layer; lower it")
        for i in chosen:
            model.layers[i].mlp = MoELayer(self.cfg, model.cfg.hidden_size, self._width(model.cfg))

    def _moe_layers(self, model: nn.Module) -> list[tuple[int, MoELayer]]:
        return [(i, layer.mlp) for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoELayer)]

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        cfg = model.cfg
        residual = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # the dense model's rule for outputs
        for i, moe in self._moe_layers(model):
            for name, p in moe.named_parameters():
                if f"layers.{i}.mlp.{name}" in init.imported:
                    continue
                std = residual if name.endswith(("down", "down_proj.weight")) else cfg.init_std
                p.copy_(torch.randn(p.shape, generator=init.generator) * std)
            for name in ("bias_steps", "bias_base"):  # a checkpoint's bias (imported) stays
                if f"layers.{i}.mlp.{name}" not in init.imported:
                    getattr(moe, name).zero_()

    def losses(self, outputs, batch, ctx: PluginContext) -> dict[str, LossTerm]:
        c, e = self.cfg, self.cfg.num_experts
        real = (batch.doc_ids.reshape(-1, 1) >= 0)  # padding excluded by weights: no wait on the device
        tokens = real.sum().clamp_min(1)
        aux, z, loads = 0.0, 0.0, []
        for logits, scores, experts in zip(outputs.aux["moe/logits"], outputs.aux["moe/scores"], outputs.aux["moe/experts"]):
            chosen = F.one_hot(experts, e).sum(1) * real  # [tokens, experts]: slots given to each expert
            loads.append(chosen.sum(0))
            probs = scores / scores.sum(-1, keepdim=True)  # softmax: unchanged; sigmoid: affinities normalised
            frac = chosen.sum(0) / (tokens * c.top_k)
            aux = aux + e * (frac * (probs * real).sum(0) / tokens).sum()
            z = z + (torch.logsumexp(logits, -1).square() * real.squeeze(-1)).sum() / tokens
        if ctx.training:
            step = torch.stack(loads)
            self.pending = step if self.pending is None else self.pending + step
        n = len(loads)
        terms = {"aux": LossTerm(aux / n, c.aux_loss_weight)}
        if c.z_loss_weight:
            terms["z"] = LossTerm(z / n, c.z_loss_weight)
        return terms

    def after_optimizer_step(self, ctx: PluginContext) -> None:
        if self.pending is None:
            return
        loads = ctx.comm.all_reduce(self.pending.to(ctx.device), group="data")  # summed over micro-batches and ranks
        self.pending, self.last_loads = None, loads
        if self.cfg.bias_update_rate:
            with torch.no_grad():
                for (_, moe), load in zip(self._moe_layers(ctx.model), loads):
                    step = torch.sign(load.double().mean() - load.double()).to(moe.bias_steps.dtype)
                    moe.bias_steps += step.to(moe.bias_steps.device)

    def metrics(self, ctx: PluginContext) -> dict[str, float]:
        if self.last_loads is None:
            return {}
        loads = self.last_loads.double()
        maxvio = loads.max(-1).values / loads.mean(-1).clamp_min(1e-9) - 1  # per MoE layer, this global batch
        layers = [i for i, _ in self._moe_layers(ctx.model)]
        return {"moe/maxvio": float(maxvio.mean()), **{f"moe/maxvio/layer{i}": float(v) for i, v in zip(layers, maxvio)}}

    def counts(self, model_cfg, counts: ModelCounts, seq_len: int, causal: bool) -> ModelCounts:
        c, h = self.cfg, model_cfg.hidden_size
        n = len(moe_layer_indices(c, model_cfg.num_layers))
        expert = 3 * h * self._width(model_cfg)
        dense, router, shared = 3 * h * model_cfg.intermediate_size, h * c.num_experts, c.num_shared_experts * expert
        total = n * (c.num_experts * expert + shared + router - dense)
        active = n * (c.top_k * expert + shared + router - dense)
        return ModelCounts(counts.total_params + total, counts.active_params + active,
                           counts.flops_per_token + 6 * active)
