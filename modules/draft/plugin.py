"""The `draft` plugin: draft heads trained with (or on) the model, evaluated by lossless speculative decoding."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from slimtrain.modules.plugin import LossTerm, ModelCounts, ParamGroup, Plugin, PluginContext, WeightInit
from slimtrain.modules.plugin_registry import register_plugin
from slimtrain.modules.transformer.init import init_weights as init_like_base

from .base import own_generator_seed
from .config import DraftConfig, HydraHead, MedusaHead, MTPHead
from .evaluation import base_view, evaluate_heads
from .hydra import HydraHeads
from .losses import position_result
from .medusa import MedusaHeads
from .mtp import MTPHeads

DRAFT_ORDER = 30  # after moe (10) and qat (20): the heads read the finished model's hidden states


def build_heads(cfg: DraftConfig, model_cfg: Any) -> nn.ModuleDict:
    """The configured heads, by kind."""
    heads = nn.ModuleDict()
    for head in cfg.heads:
        if isinstance(head, MTPHead):
            heads[head.kind] = MTPHeads(model_cfg, head.depth)
        elif isinstance(head, MedusaHead):
            heads[head.kind] = MedusaHeads(model_cfg.hidden_size, model_cfg.vocab_size, head.num_heads, head.num_layers)
        elif isinstance(head, HydraHead):
            heads[head.kind] = HydraHeads(model_cfg.hidden_size, model_cfg.vocab_size, head.num_heads, head.num_layers)
    return heads


@register_plugin("draft", DraftConfig)
class DraftPlugin(Plugin):
    """Speculative-decoding draft heads (docs/draft.md)."""

    order = DRAFT_ORDER

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__(cfg)
        self.cfg: DraftConfig = cfg
        self.weights = {h.kind: h.weight_at(0) for h in cfg.heads}

    def apply(self, model: nn.Module) -> None:
        model.draft = build_heads(self.cfg, model.cfg)

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        lm_head = init.starting("lm_head.weight")
        lm_head = model.lm_head.weight if lm_head is None else lm_head.to(model.lm_head.weight)
        for kind, heads in model.draft.items():
            if kind == "mtp":  # decoder blocks as the base's are initialised; the head and embedding are shared
                init_like_base(heads, model.cfg, seed=own_generator_seed(init.generator))
            else:
                heads.reset(lm_head)

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        heads = list(model.draft.parameters())
        groups = [ParamGroup("draft/heads", heads, lr_scale=self.cfg.lr_scale)]
        if self.cfg.mode == "frozen":
            held = {id(p) for p in heads}
            base = [p for p in model.parameters() if id(p) not in held]
            groups.append(ParamGroup("draft/frozen_base", base, frozen=True))
        return groups

    def on_step_start(self, ctx: PluginContext) -> None:
        self.weights = {h.kind: h.weight_at(ctx.step) for h in self.cfg.heads}

    def losses(self, outputs, batch, ctx: PluginContext) -> dict[str, LossTerm]:
        model = ctx.model
        view = base_view(model, outputs, batch)
        if self.cfg.mode == "frozen":  # nothing flows back into the base, whatever the engine does with frozen tensors
            view.hidden, view.last_hidden = view.hidden.detach(), view.last_hidden.detach()
        terms = {}
        for head in self.cfg.heads:
            outs = model.draft[head.kind].draft_outputs(view)
            scale = self.weights[head.kind] / (len(outs) if head.kind == "mtp" else 1)
            for out in outs:
                r = position_result(out, view, batch.labels, self.cfg.targets == "self_distill")
                terms[f"{head.kind}_{out.offset}"] = LossTerm(r.loss, scale * head.decay ** (out.offset - 1))
        return terms

    def evaluate(self, ctx: PluginContext, batches: Iterable[Any]) -> dict[str, float]:
        heads = dict(ctx.model.draft.items())
        return evaluate_heads(heads, ctx, batches, self.cfg.targets == "self_distill", self.cfg.eval_prompts,
                              self.cfg.eval_prompt_tokens, self.cfg.eval_rounds)

    def counts(self, model_cfg, counts: ModelCounts, seq_len: int, causal: bool) -> ModelCounts:
        with torch.device("meta"):
            heads = build_heads(self.cfg, model_cfg)
        n = sum(p.numel() for p in heads.parameters())
        # Training runs every head on every token: 6 FLOPs per parameter and token (forward and backward). Each
        # MTP depth adds a base layer's attention and a pass through the shared output head.
        mtp = self.cfg.head("mtp")
        depth = 0 if mtp is None else mtp.depth
        attention = 12 * model_cfg.num_heads * model_cfg.dim_per_head * seq_len / (2 if causal else 1)
        extra = 6 * n + depth * (attention + 6 * model_cfg.hidden_size * model_cfg.vocab_size)
        return ModelCounts(total_params=counts.total_params + n, active_params=counts.active_params,
                           flops_per_token=counts.flops_per_token + extra)
