"""The `moe` plugin: MoE layers in place of chosen MLPs, balancing losses, the aux-loss-free bias, load metrics."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from slimtrain.modules.plugin import LossTerm, MetricNames, ModelCounts, Plugin, PluginContext, WeightInit
from slimtrain.modules.plugin_registry import register_plugin

from .balancing import aux_loss, global_aux_loss, normalised, sequence_aux_loss, slot_counts, z_loss
from .config import MoEConfig
from .layer import MoELayer
from .plots import plot_expert_load
from .stats import layer_metrics, load_shares, micro_batch_row
from .upcycle import DenseMLP, dense_mlp, dense_mlp_names, upcycled_experts, upcycled_shared

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
        self.pending: torch.Tensor | None = None  # this step's statistics on this rank (stats.py), one row per layer
        self.last: torch.Tensor | None = None  # the last step's, summed over ranks

    def _width(self, model_cfg) -> int:
        return self.cfg.expert_intermediate_size or model_cfg.intermediate_size

    def apply(self, model: nn.Module) -> None:
        chosen = moe_layer_indices(self.cfg, model.cfg.num_layers)
        if not chosen:
            raise ValueError(f"first_k_dense={self.cfg.first_k_dense} leaves no layer of {model.cfg.num_layers} "
                             "to make an MoE layer; lower it")
        for i in chosen:
            model.layers[i].mlp = MoELayer(self.cfg, model.cfg.hidden_size, self._width(model.cfg))

    @staticmethod
    def _moe_layers(model: nn.Module) -> list[tuple[int, str, MoELayer]]:
        """(layer number, qualified name, layer) of every MoE layer, in module order: the model's own (numbered by
        their index), then those of blocks a later plugin built beside the model's layers (an MTP block's, numbered
        num_layers, num_layers + 1, ... as the Hugging Face layout numbers them and as their routing follows the
        model's layers in `outputs.aux`, see `Plugin.extend_outputs`)."""
        own = {id(layer.mlp): i for i, layer in enumerate(model.layers)}
        found, extra = [], model.cfg.num_layers
        for name, module in model.named_modules():
            if isinstance(module, MoELayer):
                i = own.get(id(module))
                if i is None:
                    i, extra = extra, extra + 1
                found.append((i, name, module))
        return found

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        cfg = model.cfg
        residual = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # the dense model's rule for outputs
        for i, qualified, moe in self._moe_layers(model):
            # The starting checkpoint's MLP of this layer, if it had one (a block outside the layers has none).
            dense = dense_mlp(init.source, i) if i < cfg.num_layers else None
            upcycled = self._upcycle(moe, dense, init) if dense is not None else set()
            if dense is not None:
                init.consume(*dense_mlp_names(i))
            experts = moe.expert_parameters()
            for name in moe.own_parameters:  # not the ones another plugin put inside (QAT's step sizes)
                p = moe.get_parameter(name)
                if f"{qualified}.{name}" in init.imported or name in upcycled:
                    continue
                std = residual if name.endswith(("down", "down_proj.weight")) else cfg.init_std
                if name in experts:  # all E experts drawn, this rank's kept: any expert-parallel size, same weights
                    full = torch.randn((moe.num_experts, *p.shape[1:]), generator=init.generator) * std
                    p.copy_(full[moe.expert_slice])
                else:
                    p.copy_(torch.randn(p.shape, generator=init.generator) * std)
            for name in ("bias_steps", "bias_base"):  # a checkpoint's bias (imported) stays
                if f"{qualified}.{name}" not in init.imported:
                    getattr(moe, name).zero_()

    def _upcycle(self, moe: MoELayer, dense: DenseMLP, init: WeightInit) -> set[str]:
        """Start the layer's experts (and shared experts) as the dense MLP; returns the names it set. The
        router and the shared experts' gate start from init, as in a model trained from scratch."""
        c, width = self.cfg, moe.experts.intermediate
        gate_up, down = upcycled_experts(dense, c.num_experts, width, c.upcycle_noise, init.generator)
        moe.experts.gate_up.copy_(gate_up[moe.expert_slice])  # all experts made, this rank's kept
        moe.experts.down.copy_(down[moe.expert_slice])
        names = {"experts.gate_up", "experts.down"}
        if moe.shared is not None:
            shared = upcycled_shared(dense, c.num_shared_experts, width)
            for part, value in zip(("gate_proj", "up_proj", "down_proj"), shared):
                getattr(moe.shared, part).weight.copy_(value)
                names.add(f"shared.{part}.weight")
        return names

    def on_step_start(self, ctx: PluginContext) -> None:
        dense = 0 < ctx.step <= self.cfg.dense_training_steps  # a pure function of the step: a resume is exact
        for _, _, moe in self._moe_layers(ctx.model):
            moe.dense_routing = dense

    def losses(self, outputs, batch, ctx: PluginContext) -> dict[str, LossTerm]:
        c = self.cfg
        shard = getattr(ctx.model, "sequence_shard", None)  # the routed tokens are this rank's slice of the rows
        doc_ids = batch.doc_ids if shard is None else shard.local(batch.doc_ids)
        real = (doc_ids.reshape(-1, 1) >= 0)  # padding excluded by weights: no wait on the device
        aux = outputs.aux
        layers = list(zip(aux["moe/logits"], aux["moe/scores"], aux["moe/experts"]))
        dropped = aux.get("moe/dropped", [None] * len(layers))
        counts = [slot_counts(experts, c.num_experts, real) for _, _, experts in layers]
        probs = [normalised(scores) for _, scores, _ in layers]
        n = len(layers)
        terms = {"aux": LossTerm(sum(aux_loss(k, p, real, c.top_k) for k, p in zip(counts, probs)) / n,
                                 c.aux_loss_weight)}
        if c.seq_aux_loss_weight:
            rows = batch.doc_ids.shape[0]
            seq = sum(sequence_aux_loss(k, p, real, c.top_k, rows) for k, p in zip(counts, probs)) / n
            terms["seq_aux"] = LossTerm(seq, c.seq_aux_loss_weight)
        if c.global_aux_loss_weight:
            terms["global_aux"] = LossTerm(self._global_aux(counts, probs, real, ctx) / n, c.global_aux_loss_weight)
        if c.z_loss_weight:
            terms["z"] = LossTerm(sum(z_loss(logits, real) for logits, _, _ in layers) / n, c.z_loss_weight)
        if ctx.training:
            rows = torch.stack([micro_batch_row(k, p, real, d) for k, p, d in zip(counts, probs, dropped)])
            self.pending = rows if self.pending is None else self.pending + rows
        return terms

    def _global_aux(self, counts, probs, real, ctx: PluginContext) -> torch.Tensor:
        """The global-batch loss: expert counts (and tokens) summed over the data-parallel ranks in one
        all-reduce while training; an evaluation (ranks may see different numbers of batches) stays local."""
        local = torch.cat([torch.stack([k.sum(0) for k in counts]).flatten(), real.sum().reshape(1)]).float()
        summed = ctx.comm.all_reduce(local.detach().clone(), group="data") if ctx.training else local.detach()
        per_layer, tokens = summed[:-1].view(len(counts), -1), summed[-1]
        return sum(global_aux_loss(g, tokens, p, real, self.cfg.top_k) for g, p in zip(per_layer, probs))

    def after_optimizer_step(self, ctx: PluginContext) -> None:
        if self.pending is None:
            return
        totals = ctx.comm.all_reduce(self.pending.to(ctx.device), group="data")  # micro-batches and ranks
        self.pending, self.last = None, totals
        if self.cfg.bias_update_rate:
            with torch.no_grad():
                for (_, _, moe), load in zip(self._moe_layers(ctx.model), totals[:, :self.cfg.num_experts]):
                    if not moe.router.weight.requires_grad:  # a frozen layer (draft heads on a frozen base) routes as it did
                        continue
                    step = torch.sign(load.mean() - load).to(moe.bias_steps.dtype)
                    moe.bias_steps += step.to(moe.bias_steps.device)

    def metric_names(self) -> MetricNames:
        c = self.cfg
        terms = ("aux", *(["seq_aux"] if c.seq_aux_loss_weight else []),
                 *(["global_aux"] if c.global_aux_loss_weight else []), *(["z"] if c.z_loss_weight else []))
        stats = ["maxvio", "maxvio_micro", "cv", "entropy", *(["dropped"] if c.capacity_factor is not None else [])]
        return MetricNames(losses=terms, metrics=(*(f"moe/{s}" for s in stats), *(f"moe/{s}/layer*" for s in stats),
                                                  "moe/load/layer*"))

    def metrics(self, ctx: PluginContext) -> dict[str, float | list[float]]:
        if self.last is None:
            return {}
        c = self.cfg
        per_layer = layer_metrics(self.last.cpu(), c.num_experts, c.top_k)
        shares = load_shares(self.last.cpu(), c.num_experts)
        if c.capacity_factor is None:
            per_layer.pop("dropped")
        layers = [i for i, _, _ in self._moe_layers(ctx.model)]
        out: dict[str, float | list[float]] = {}
        for name, values in per_layer.items():
            out[f"moe/{name}"] = float(values.mean())
            out.update({f"moe/{name}/layer{i}": float(v) for i, v in zip(layers, values)})
        out.update({f"moe/load/layer{i}": [round(float(v), 6) for v in share] for i, share in zip(layers, shares)})
        return out

    def plots(self, records, out_dir: Path) -> list[Path]:
        path = plot_expert_load(records, out_dir / "moe_load.png")
        return [path] if path else []

    def hf_architecture(self, model_cfg) -> str:
        from .hf_export import register_architecture  # transformers-free until a config is built

        return register_architecture(self.cfg, model_cfg)

    def counts(self, model_cfg, counts: ModelCounts, seq_len: int, causal: bool) -> ModelCounts:
        c, h = self.cfg, model_cfg.hidden_size
        n = len(moe_layer_indices(c, model_cfg.num_layers))
        expert = 3 * h * self._width(model_cfg)
        dense, router, shared = 3 * h * model_cfg.intermediate_size, h * c.num_experts, c.num_shared_experts * expert
        total = n * (c.num_experts * expert + shared + router - dense)
        active = n * (c.top_k * expert + shared + router - dense)
        return ModelCounts(counts.total_params + total, counts.active_params + active,
                           counts.flops_per_token + 6 * active)
