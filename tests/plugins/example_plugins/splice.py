"""`splice`: a small encoder reads each row's tokens and its outputs replace the embeddings of the first
`context` ones (ICAE/ARC-Encoder style, at toy scale), given to the model as `inputs_embeds`. Seams: a batch transform that builds a per-row field
on the data side and masks the loss there (part of the resume fingerprint), model inputs with
embeddings spliced in, a parameter group with its own learning rate, an export adapter."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal, Mapping, Sequence

import torch
from pydantic import Field
from torch import nn

from slimtrain.core.transforms import TRANSFORMS
from slimtrain.modules.plugin import HFAdapter, ParamGroup, Plugin, PluginConfig, PluginContext, WeightInit
from slimtrain.modules.transformer.io import ModelInputs

IGNORE = -100


class SpliceConfig(PluginConfig):
    """Replace the embeddings of each row's first tokens by an encoder's outputs."""

    type: Literal["splice"] = Field(description="Plugin name.")
    context: int = Field(8, gt=0, description="Tokens at the start of each row that the encoder reads.")
    jitter: int = Field(4, ge=0, description="The span is `context` minus a per-row draw in [0, jitter] tokens.")
    lr_scale: float = Field(3.0, gt=0, description="Learning-rate multiplier of the encoder.")


@TRANSFORMS.register("context-span")
class ContextSpan:
    """Marks each row's leading context span (`context_mask`) and removes it from the LM loss."""

    name = "context-span"

    def __init__(self, context: int, jitter: int) -> None:
        self.context, self.jitter = context, jitter

    def identity(self) -> dict[str, Any]:
        return {"context": self.context, "jitter": self.jitter}

    def __call__(self, fields: Mapping[str, torch.Tensor], rows: Sequence[int | None]) -> dict[str, torch.Tensor]:
        labels = fields["labels"].clone()
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for b, key in enumerate(rows):
            if key is None:
                continue
            draw = int(torch.randint(0, self.jitter + 1, (), generator=torch.Generator().manual_seed(key)))
            span = self.context - draw
            mask[b, :span] = True
            labels[b, :span] = IGNORE
        return {"labels": labels, "context_mask": mask}


class SplicePlugin(Plugin):
    order = 40

    def __init__(self, cfg: SpliceConfig) -> None:
        super().__init__(cfg)
        self.cfg: SpliceConfig = cfg

    def apply(self, model: nn.Module) -> None:
        h = model.cfg.hidden_size
        model.context_encoder = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        for name, p in model.context_encoder.named_parameters():
            if f"context_encoder.{name}" not in init.imported:
                p.copy_(torch.randn(p.shape, generator=init.generator) * 0.02 if p.ndim > 1 else torch.zeros(p.shape))

    def batch_transforms(self) -> list[Any]:
        return [ContextSpan(self.cfg.context, self.cfg.jitter)]

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        return [ParamGroup("splice/encoder", list(model.context_encoder.parameters()), lr_scale=self.cfg.lr_scale)]

    def hf_adapter(self) -> HFAdapter:
        # The encoder is written beside the decoder's tensors, as a compressor's encoder + projector would be.
        context = self.cfg.context
        return HFAdapter(owns=lambda name: name.startswith("context_encoder."),
                         to_hf=lambda state, cfg: {"splice_" + k.removeprefix("context_"): v for k, v in state.items()},
                         from_hf=lambda hf, cfg: {"context_" + k.removeprefix("splice_"): v for k, v in hf.items()
                                                  if k.startswith("splice_encoder.")},
                         config=lambda cfg: {"splice_context_tokens": context})

    def model_inputs(self, inputs: ModelInputs, batch, ctx: PluginContext) -> ModelInputs:
        # The encoder reads every token and a mask picks its outputs for the span: fixed shapes, no wait on
        # the device (a `Splice` of the span alone would need its length on the host).
        mask = batch.extras["context_mask"].unsqueeze(-1)
        tokens = ctx.model.embed(inputs.input_ids)
        embeds = torch.where(mask, ctx.model.context_encoder(tokens), tokens)
        return replace(inputs, input_ids=None, inputs_embeds=embeds, splice=None)


ENTRY = (SpliceConfig, SplicePlugin)
