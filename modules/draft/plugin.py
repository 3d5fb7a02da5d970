"""The `draft` plugin: draft heads trained with (or on) the model, evaluated by lossless speculative decoding."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import torch
from pydantic import TypeAdapter
from torch import nn

from slimtrain.modules.plugin import (
    ExportContext, LossTerm, MetricNames, ModelCounts, ParamGroup, Plugin, PluginContext, WeightInit,
)
from slimtrain.modules.plugin_registry import register_plugin
from slimtrain.modules.plugin_stack import DRY_RUN_VOCAB
from slimtrain.modules.transformer.init import init_weights as init_like_base

from .base import BaseView, own_generator_seed
from .config import DraftConfig, HeadConfig, HydraHead, MedusaHead, MTPHead
from .eagle3 import Eagle3Head as Eagle3Module
from .evaluation import base_view, evaluate_heads
from .hydra import HydraHeads
from .losses import position_result
from .medusa import MedusaHeads
from .mtp import MTPHeads

DRAFT_ORDER = 30  # after moe (10) and qat (20): the heads read the finished model's hidden states


def head_module(head: HeadConfig | dict, model_cfg: Any, model: nn.Module | None = None) -> nn.Module:
    """One head's module for a model of `model_cfg` (`head`: its recipe entry, or that entry as a dict). With
    `model` (the base, after the other plugins applied), MTP blocks take the kind of MLP its last layer has."""
    if isinstance(head, dict):
        head = TypeAdapter(HeadConfig).validate_python(head)
    if isinstance(head, MTPHead):
        return MTPHeads(model_cfg, head.depth, None if model is None else model.layers[-1].mlp)
    if isinstance(head, MedusaHead):
        return MedusaHeads(model_cfg.hidden_size, model_cfg.vocab_size, head.num_heads, head.num_layers)
    if isinstance(head, HydraHead):
        return HydraHeads(model_cfg.hidden_size, model_cfg.vocab_size, head.num_heads, head.num_layers)
    size = head.draft_vocab_size or model_cfg.vocab_size
    if size > model_cfg.vocab_size:
        if model_cfg.vocab_size != DRY_RUN_VOCAB:
            raise ValueError(f"eagle3 draft_vocab_size={size} exceeds the tokenizer's vocabulary "
                             f"({model_cfg.vocab_size}); lower it or leave it null for the whole vocabulary")
        size = model_cfg.vocab_size  # a validation before the tokenizer exists: shapes only, the build checks
    return Eagle3Module(model_cfg, head.layer_ids(model_cfg.num_layers), head.steps, size)


def build_heads(cfg: DraftConfig, model_cfg: Any, model: nn.Module | None = None) -> nn.ModuleDict:
    """The configured heads, by kind (`model`: see `head_module`)."""
    return nn.ModuleDict({head.kind: head_module(head, model_cfg, model) for head in cfg.heads})


def check_heads(cfg: DraftConfig, model_cfg: Any) -> None:
    """What needs the model's shape: EAGLE-3's layers and draft vocabulary."""
    eagle = cfg.head("eagle3")
    if eagle is None:
        return
    n = model_cfg.num_layers
    if n < 2:
        raise ValueError(f"eagle3 fuses hidden states entering layers 1 .. num_layers - 1, and model.num_layers={n} has "
                         "none; use another head kind or a deeper model")
    ids = eagle.layer_ids(n)
    wrong = [k for k in ids if not 1 <= k <= n - 1]
    if eagle.layers is not None and len(set(ids)) < len(ids):
        raise ValueError(f"eagle3 layers={eagle.layers} repeats a layer, which speculators and vLLM refuse; give "
                         f"distinct ids in 1 .. {n - 1}")
    if wrong:
        raise ValueError(f"eagle3 layers={eagle.layers}: {wrong} out of range; the model has {n} layers, so give ids in "
                         f"1 .. {n - 1} (the hidden state entering that layer)")
    # A recipe validated before its tokenizer exists holds a stand-in vocabulary: the build checks again.
    known = model_cfg.vocab_size is not None and model_cfg.vocab_size != DRY_RUN_VOCAB
    if eagle.draft_vocab_size is not None and known and eagle.draft_vocab_size > model_cfg.vocab_size:
        raise ValueError(f"eagle3 draft_vocab_size={eagle.draft_vocab_size} exceeds the tokenizer's vocabulary "
                         f"({model_cfg.vocab_size}); lower it or leave it null for the whole vocabulary")


def _own_weights(module: nn.Module, foreign: list[str]) -> set[str]:
    """`module`'s weight names outside the `foreign` sub-modules (for `init_weights(only=...)`)."""
    return {f"{name}.weight" for name, _ in module.named_modules()
            if not any(name == f or name.startswith(f"{f}.") for f in foreign)}


def _detached(view: BaseView) -> BaseView:
    """`view` with the model's hidden states cut from the graph (a head's loss then trains the head only)."""
    return replace(view, hidden=view.hidden.detach(), last_hidden=view.last_hidden.detach(),
                   layer_hidden={k: v.detach() for k, v in view.layer_hidden.items()})


@register_plugin("draft", DraftConfig)
class DraftPlugin(Plugin):
    """Speculative-decoding draft heads (docs/draft.md)."""

    order = DRAFT_ORDER

    def __init__(self, cfg: DraftConfig) -> None:
        super().__init__(cfg)
        self.cfg: DraftConfig = cfg
        self.weights = {h.kind: h.weight_at(0) for h in cfg.heads}
        self._computed: tuple | None = None  # (outputs, view, head outputs) of the micro-batch being lost

    def configure(self, model_cfg):
        check_heads(self.cfg, model_cfg)
        return model_cfg

    def apply(self, model: nn.Module) -> None:
        check_heads(self.cfg, model.cfg)
        model.draft = build_heads(self.cfg, model.cfg, model)

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        lm_head = init.starting("lm_head.weight")
        lm_head = model.lm_head.weight if lm_head is None else lm_head.to(model.lm_head.weight)
        for kind, heads in model.draft.items():
            if kind == "mtp":  # decoder blocks as the base's are initialised; the head and embedding are shared
                # An MLP another plugin made (MoE) is that plugin's to initialise: its init saw the whole model.
                init_like_base(heads, model.cfg, seed=own_generator_seed(init.generator),
                               only=_own_weights(heads, heads.foreign_modules()))
            elif kind == "eagle3":  # a base-like layer; the output head starts as the base's rows of its vocabulary
                init_like_base(heads, model.cfg, seed=own_generator_seed(init.generator))
                heads.set_vocabulary(init.token_counts(), lm_head)
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

    def model_inputs(self, inputs, batch, ctx: PluginContext):
        layers = self._hidden_layers(ctx.model)
        return inputs.requesting(*layers) if layers else inputs

    @staticmethod
    def _hidden_layers(model: nn.Module) -> tuple[int, ...]:
        return tuple(sorted({k for head in model.draft.values() for k in getattr(head, "hidden_layers", ())}))

    def extend_outputs(self, outputs, batch, ctx: PluginContext) -> None:
        """Every head's outputs, kept for `losses`; what their blocks reported joins `outputs.aux` (an MoE MTP
        block's routing follows the model's layers, one entry per depth)."""
        view = base_view(ctx.model, outputs, batch)
        if self.cfg.mode == "frozen":  # nothing flows back into the base, whatever the engine does with frozen tensors
            view = _detached(view)
        detached = _detached(view)
        heads = {head.kind: ctx.model.draft[head.kind].draft_outputs(detached if head.detach_base else view)
                 for head in self.cfg.heads}
        for out in (o for outs in heads.values() for o in outs):
            for name, value in out.aux.items():
                outputs.aux.setdefault(name, []).append(value)
        self._computed = (outputs, view, heads)

    def losses(self, outputs, batch, ctx: PluginContext) -> dict[str, LossTerm]:
        if self._computed is None or self._computed[0] is not outputs:
            self.extend_outputs(outputs, batch, ctx)  # called on its own (not through the stack)
        _, view, heads = self._computed
        self._computed = None  # the micro-batch's graph is the loss's now
        terms = {}
        for head in self.cfg.heads:
            outs = heads[head.kind]
            scale = self.weights[head.kind] / (len(outs) if head.kind == "mtp" else 1)
            for out in outs:
                r = position_result(out, view, batch.labels, self.cfg.targets == "self_distill")
                terms[f"{head.kind}_{out.offset}"] = LossTerm(r.loss, scale * head.decay ** (out.offset - 1))
        return terms

    def metric_names(self) -> MetricNames:
        kinds = [h.kind for h in self.cfg.heads]
        found = [f"{k}/acc*" for k in kinds]  # one per draft offset
        if self.cfg.eval_prompts:
            found += [f"{k}/{x}" for k in kinds for x in ("tau", "accept*", "greedy_match")]
        return MetricNames(losses=tuple(f"{k}_*" for k in kinds), evaluate=tuple(found))

    def evaluate(self, ctx: PluginContext, batches: Iterable[Any]) -> dict[str, float]:
        heads = dict(ctx.model.draft.items())
        return evaluate_heads(heads, ctx, batches, self.cfg.targets == "self_distill", self.cfg.eval_prompts,
                              self.cfg.eval_prompt_tokens, self.cfg.eval_rounds)

    def counts(self, model_cfg, counts: ModelCounts, seq_len: int, causal: bool) -> ModelCounts:
        with torch.device("meta"):
            heads = build_heads(self.cfg, model_cfg)
        n = sum(p.numel() for p in heads.parameters())
        # Training runs every head on every token: 6 FLOPs per parameter and token (forward and backward). Each
        # MTP depth adds a base layer's attention and a pass through the shared output head; EAGLE-3 runs its
        # layer and head once per unrolled step (its fc once), each step with a layer's attention.
        mtp, eagle = self.cfg.head("mtp"), self.cfg.head("eagle3")
        depth = 0 if mtp is None else mtp.depth
        attention = 12 * model_cfg.num_heads * model_cfg.dim_per_head * seq_len / (2 if causal else 1)
        extra = 6 * n + depth * (attention + 6 * model_cfg.hidden_size * model_cfg.vocab_size)
        if eagle is not None:
            unrolled = sum(p.numel() for name, p in heads["eagle3"].named_parameters() if not name.startswith("fc."))
            extra += eagle.steps * attention + (eagle.steps - 1) * 6 * unrolled
        return ModelCounts(total_params=counts.total_params + n, active_params=counts.active_params,
                           flops_per_token=counts.flops_per_token + extra)

    def export(self, ctx: ExportContext) -> None:
        from .export import export_draft

        export_draft(self.cfg, ctx)
