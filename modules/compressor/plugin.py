"""The `compressor` plugin: an encoder that turns context spans into a few vectors the decoder reads in place of
their tokens, trained on continuation and reconstruction examples cut from the training rows."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import torch
from torch import nn

from slimtrain.modules.plugin import (
    ExportContext, LossTerm, MetricNames, ModelCounts, ParamGroup, Plugin, PluginContext, WeightInit,
)
from slimtrain.modules.plugin_registry import register_plugin
from slimtrain.modules.plugin_stack import DRY_RUN_VOCAB
from slimtrain.modules.transformer.io import ModelInputs, Splice

from .compressor import MAIN, Compressed, ContextCompressor
from .config import TruncatedEncoder, encoder_model_config
from .decoders import ExtraDecoders, decoder_loss, drawn_decoder, extra_config
from .evaluation import evaluate_compressor
from .examples import CompressorExamples
from .export import export_compressor
from .recipe import CompressorConfig
from .spans import Spans

COMPRESSOR_ORDER = 40  # after moe, qat and draft: the decoder the vectors go into is the finished model


def compress_batch(model: nn.Module, batch: Any, task_vectors: bool = True, decoder: str = MAIN) -> Compressed:
    """The compressed vectors of every example of `batch` (with their task vectors) for `decoder`, in the decoder
    row's slot order."""
    extras = batch.extras
    spans = Spans.from_span_ids(extras["ctx_ids"], extras["ctx_span"])
    task = extras["ctx_task"][spans.rows, spans.starts] if task_vectors else None
    return model.compressor.compress(spans, task, decoder)


def decoder_inputs(inputs: ModelInputs, batch: Any, vectors: torch.Tensor | None) -> ModelInputs:
    """The re-laid decoder row with `vectors` in its vector slots (None: the slots stay token 0's embedding)."""
    extras = batch.extras
    splice = None if vectors is None else Splice(mask=extras["dec_vec"], embeds=vectors)
    return replace(inputs, input_ids=extras["dec_ids"], position_ids=extras["dec_pos"], doc_ids=extras["dec_doc"],
                   splice=splice)


@register_plugin("compressor", CompressorConfig)
class CompressorPlugin(Plugin):
    """Context compression (docs/compressor.md)."""

    order = COMPRESSOR_ORDER

    def __init__(self, cfg: CompressorConfig) -> None:
        super().__init__(cfg)
        self.cfg: CompressorConfig = cfg
        self.extra = ExtraDecoders(cfg.decoders)
        self.drawn = MAIN  # the decoder this step trains through (on_step_start)

    def configure(self, model_cfg):
        encoder = encoder_model_config(self.cfg, model_cfg) if model_cfg.vocab_size is not None else None
        longest = self.cfg.context_tokens + (self.cfg.num_memory_tokens if self.cfg.pooling == "memory" else 0)
        if encoder is not None and longest > encoder.max_seq_len:
            raise ValueError(f"context_tokens={self.cfg.context_tokens} gives spans of {longest} positions, more than "
                             f"the encoder's max_seq_len={encoder.max_seq_len}; lower context_tokens or raise the "
                             "encoder's max_seq_len")
        for i, decoder in enumerate(self.cfg.decoders):
            cfg = extra_config(decoder, f"decoders.{i}.path")
            known = model_cfg.vocab_size not in (None, DRY_RUN_VOCAB)  # a validation before the tokenizer exists
            if known and cfg.vocab_size != model_cfg.vocab_size:
                raise ValueError(f"decoders.{i} ({decoder.name}) has a vocabulary of {cfg.vocab_size} tokens and the "
                                 f"data's tokenizer {model_cfg.vocab_size}; give a decoder trained with that tokenizer")
        return model_cfg

    def apply(self, model: nn.Module) -> None:
        widths = None
        if self.cfg.decoders:  # a projector per decoder, the run's own first
            widths = {MAIN: model.cfg.hidden_size}
            widths.update({d.name: extra_config(d, f"decoders.{i}.path").hidden_size
                           for i, d in enumerate(self.cfg.decoders)})
        model.compressor = ContextCompressor(self.cfg, model.cfg, widths)

    def model_sources(self):
        from pathlib import Path

        return [(f"decoders.{i}.path", Path(d.path)) for i, d in enumerate(self.cfg.decoders)]

    def on_step_start(self, ctx: PluginContext) -> None:
        self.drawn = drawn_decoder(self.extra.names, ctx.step) if self.cfg.decoders else MAIN

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        compressor: ContextCompressor = model.compressor
        own = {f"compressor.{n}" for n, _ in compressor.named_parameters()}
        if own & init.imported:
            return  # a checkpoint import filled the compressor: its values stay
        seed = int(torch.randint(0, 2**62, (), generator=init.generator))
        compressor.init_weights(seed)
        enc = self.cfg.encoder
        if isinstance(enc, TruncatedEncoder) and enc.init == "decoder":
            self._copy_decoder(model, init)

    @staticmethod
    @torch.no_grad()
    def _copy_decoder(model: nn.Module, init: WeightInit) -> None:
        """The encoder's embeddings and blocks start as the decoder's first layers: the values the decoder starts
        from (a branch's checkpoint, when branching), copied, not shared."""
        encoder = model.compressor.encoder
        for name, p in encoder.named_parameters():
            if not name.startswith(("embed.", "layers.")):
                continue
            source = init.starting(name)
            if source is None:
                source = model.get_parameter(name)
            if source.shape != p.shape:
                raise ValueError(f"encoder {name} {tuple(p.shape)} cannot start from the decoder's "
                                 f"{tuple(source.shape)}: build the truncated encoder from the dense decoder")
            p.copy_(source.to(p.dtype))

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        compressor = model.compressor
        mine = list(compressor.parameters())
        groups = [ParamGroup("compressor/encoder", list(compressor.encoder.parameters()), lr_scale=self.cfg.lr_scale),
                  ParamGroup("compressor/projector", list(compressor.projectors.parameters()),
                             lr_scale=self.cfg.projector_lr_scale)]
        if self.cfg.decoder == "frozen":
            held = {id(p) for p in mine}
            groups.append(ParamGroup("compressor/frozen_decoder", [p for p in model.parameters() if id(p) not in held],
                                     frozen=True))
        return groups

    def batch_transforms(self) -> list[Any]:
        c = self.cfg
        memory = c.num_memory_tokens if c.pooling == "memory" else None
        return [CompressorExamples(c.context_tokens, c.continuation_tokens, c.min_context_tokens,
                                   c.reconstruction_fraction, c.factor, c.vectors_per_span, memory, c.task_vectors,
                                   c.prefix_tokens)]

    def model_inputs(self, inputs: ModelInputs, batch, ctx: PluginContext) -> ModelInputs:
        vectors = compress_batch(ctx.model, batch, self.cfg.task_vectors).vectors
        if ctx.training and self.drawn != MAIN:  # this step trains through another decoder: the run's own LM loss
            vectors = vectors.detach()          # (a joint decoder still learns from it) leaves the compressor be
        return decoder_inputs(inputs, batch, vectors)

    def losses(self, outputs, batch, ctx: PluginContext) -> dict[str, LossTerm]:
        if not ctx.training or self.drawn == MAIN:
            return {}
        decoder = self.extra.get(self.drawn, ctx.model)
        vectors = compress_batch(ctx.model, batch, self.cfg.task_vectors, self.drawn).vectors
        value = decoder_loss(decoder, decoder_inputs(ModelInputs.of(batch), batch, vectors), batch.labels)
        return {f"decoder_{self.drawn}": LossTerm(value, 1.0)}

    def metric_names(self) -> MetricNames:
        from .evaluation import LOSSES

        keys = [*(f"loss_{x}" for x in LOSSES), *(f"ppl_{x}" for x in ("none", "full", "comp")), "gap_closed",
                "rec_acc", *(["rec_exact"] if self.cfg.eval_exact_match else [])]
        extra = list(self.extra.configs)
        return MetricNames(losses=tuple(f"decoder_{name}" for name in extra),
                           evaluate=(*keys, *(f"{k}/{name}" for k in keys for name in extra)))

    def evaluate(self, ctx: PluginContext, batches: Iterable[Any]) -> dict[str, float]:
        batches = list(batches)  # one pass per decoder
        c = self.cfg
        out = evaluate_compressor(ctx, batches, c.eval_exact_match, c.task_vectors, longest=c.context_tokens)
        for name in self.extra.configs:
            theirs = evaluate_compressor(ctx, batches, c.eval_exact_match, c.task_vectors,
                                         self.extra.get(name, ctx.model), name, c.context_tokens)
            out.update({f"{key}/{name}": value for key, value in theirs.items()})
        return out

    def counts(self, model_cfg, counts: ModelCounts, seq_len: int, causal: bool) -> ModelCounts:
        with torch.device("meta"):
            n = sum(p.numel() for p in ContextCompressor(self.cfg, model_cfg).parameters())
        # The encoder runs once per context token: about 6 FLOPs per parameter and token when it trains, 2 when
        # only the decoder's gradient flows through it (never: its parameters always train).
        return ModelCounts(total_params=counts.total_params + n, active_params=counts.active_params + n,
                           flops_per_token=counts.flops_per_token + 6 * n)

    def export(self, ctx: ExportContext) -> None:
        export_compressor(self.cfg, ctx)
