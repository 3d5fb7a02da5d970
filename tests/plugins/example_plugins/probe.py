"""`probe`: a next-token head on an intermediate layer's hidden states. Seams: model inputs that ask
for a layer's hidden states, a loss on them, an evaluation of its own on held-out data (the probe's
top-1 accuracy, reduced over ranks), a frozen option for the base model, an export adapter."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtrain.modules.plugin import (
    HFAdapter, LossTerm, ModelCounts, ParamGroup, Plugin, PluginConfig, PluginContext, WeightInit,
)
from slimtrain.modules.transformer.io import ModelInputs

IGNORE = -100


class ProbeConfig(PluginConfig):
    """A linear next-token head on layer `layer`'s output."""

    type: Literal["probe"] = Field(description="Plugin name.")
    layer: int = Field(0, description="Layer whose output hidden states the probe reads (negative: from the end).")
    weight: float = Field(0.5, ge=0, description="Weight of the probe's loss.")
    lr_scale: float = Field(2.0, gt=0, description="Learning-rate multiplier of the probe head.")
    freeze_base: bool = Field(False, description="Freeze the decoder (embedding, layers, norm, head): the probe "
                              "and other plugins' modules train.")


class ProbePlugin(Plugin):
    order = 30

    def __init__(self, cfg: ProbeConfig) -> None:
        super().__init__(cfg)
        self.cfg: ProbeConfig = cfg

    def apply(self, model: nn.Module) -> None:
        model.probe = nn.Linear(model.cfg.hidden_size, model.cfg.vocab_size, bias=False)

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        if "probe.weight" not in init.imported:
            model.probe.weight.copy_(torch.randn(model.probe.weight.shape, generator=init.generator) * 0.02)

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        groups = [ParamGroup("probe/head", [model.probe.weight], lr_scale=self.cfg.lr_scale)]
        if self.cfg.freeze_base:  # the decoder's own modules (another plugin's modules keep their groups)
            decoder = [model.embed, model.layers, model.norm, model.lm_head]
            base = list({id(p): p for m in decoder for p in m.parameters()}.values())
            groups.append(ParamGroup("probe/frozen_base", base, frozen=True))
        return groups

    def model_inputs(self, inputs: ModelInputs, batch, ctx: PluginContext) -> ModelInputs:
        return inputs.requesting(self.cfg.layer)

    def _logits(self, model: nn.Module, outputs) -> torch.Tensor:
        return model.probe(outputs.layer_hidden[self.cfg.layer])

    def losses(self, outputs, batch, ctx: PluginContext) -> dict[str, LossTerm]:
        logits = self._logits(ctx.model, outputs).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=IGNORE)
        return {"ce": LossTerm(loss, self.cfg.weight)}

    def evaluate(self, ctx: PluginContext, batches) -> dict[str, float]:
        hits = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for batch in batches:
            outputs = ctx.model(**ctx.inputs(batch).model_kwargs())  # as in training: every plugin's inputs
            guess = self._logits(ctx.model, outputs).argmax(-1)
            counted = batch.labels != IGNORE
            hits += torch.stack([(guess == batch.labels)[counted].sum(), counted.sum()]).double()
        ctx.comm.all_reduce(hits, group="data")
        return {"accuracy": float(hits[0] / hits[1].clamp_min(1))}

    def counts(self, model_cfg, counts: ModelCounts, seq_len: int, causal: bool) -> ModelCounts:
        head = model_cfg.hidden_size * model_cfg.vocab_size
        return ModelCounts(counts.total_params + head, counts.active_params + head, counts.flops_per_token + 6 * head)

    def hf_adapter(self) -> HFAdapter:
        # The head rides in the same safetensors under a name of its own, as MTP layers do; config says where it reads.
        layer = self.cfg.layer
        return HFAdapter(owns=lambda name: name.startswith("probe."),
                         to_hf=lambda state, cfg: {"probe_head.weight": state["probe.weight"]},
                         from_hf=lambda hf, cfg: {"probe.weight": hf["probe_head.weight"]} if "probe_head.weight" in hf else {},
                         config=lambda cfg: {"probe_layer": layer})


ENTRY = (ProbeConfig, ProbePlugin)
