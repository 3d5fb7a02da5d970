"""`ContextCompressor`: context token ids with their span layout in, decoder-ready vectors out.

encoder (encoder.py: embeddings, bidirectional blocks, pooling) -> optional `<Rec>`/`<Cont>` vector after each
span, in encoder space -> the decoder's projector. The vectors come out flat, span after span in row-major order
(`Spans`), with their count per span: a caller lays them into the decoder's rows as a `Splice` whose mask is
True at exactly those slots, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from slimtrain.modules.transformer import ModelConfig, Splice, Transformer

from .config import CompressorModelConfig, TruncatedEncoder, encoder_model_config
from .encoder import SpanEncoder
from .projector import CONT, REC, TASKS, Projector, Task
from .spans import Spans

MAIN = "main"
"""Name of the decoder the compressor is built for (its projector's key) when no names are given."""
NO_TASK = -1
"""A per-span task id: no task vector after this span (REC and CONT are the others)."""
_PROJECTOR_SEED_OFFSET = 0x9E3779B9  # any fixed offset: the projectors must not replay the encoder's draws


@dataclass
class Compressed:
    """vectors [V, decoder width]: span 0's vectors (then its task vector, if asked), span 1's, ...;
    counts [N]: vectors per span, task vector included; spans: the layout (rows, starts) they came from."""

    vectors: torch.Tensor
    counts: torch.Tensor
    spans: Spans

    def splice(self, mask: torch.Tensor, check: bool = True) -> Splice:
        """A `Splice` putting the vectors at `mask`'s True slots [B, S] (row-major, the vectors' order).

        check: compare the slot count with the vector count (reads the device once)."""
        if check and int(mask.sum()) != self.vectors.shape[0]:
            raise ValueError(f"the splice mask has {int(mask.sum())} slots for {self.vectors.shape[0]} compressed "
                             "vectors; reserve counts[i] slots per span, in span order")
        return Splice(mask=mask, embeds=self.vectors)


class ContextCompressor(nn.Module):
    """`encoder` (SpanEncoder) and `projectors.{decoder name}` (one Projector and task pair per decoder).

    decoder: the config of the decoder the encoder is shaped after (a truncated encoder copies its architecture)
    and projects into. decoders: name -> width of every decoder to project into (one encoder shared by several
    decoders, ARC's multi-decoder training); None: just `decoder`, named MAIN.
    """

    def __init__(self, cfg: CompressorModelConfig, decoder: ModelConfig,
                 decoders: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = SpanEncoder(cfg, encoder_model_config(cfg, decoder))
        widths = dict(decoders) if decoders is not None else {MAIN: decoder.hidden_size}
        if not widths:
            raise ValueError("decoders is empty: name at least one decoder to project into")
        width = self.encoder.hidden_size
        self.projectors = nn.ModuleDict({
            name: Projector(width, out, cfg.projector_bottleneck or min(width, out)) for name, out in widths.items()
        })

    @classmethod
    def from_decoder(cls, cfg: CompressorModelConfig, decoder: Transformer, decoders: Mapping[str, int] | None = None,
                     seed: int | None = None) -> "ContextCompressor":
        """Built for `decoder` and initialised (`init_weights(seed)`), then, for a truncated encoder with init:
        decoder, the encoder's embeddings and blocks copied from the decoder's; in the decoder's dtype."""
        compressor = cls(cfg, decoder.cfg, decoders)
        compressor.init_weights(seed)
        if isinstance(cfg.encoder, TruncatedEncoder) and cfg.encoder.init == "decoder":
            compressor.encoder.copy_decoder(decoder)
        return compressor.to(decoder.embed.weight.dtype)

    def init_weights(self, seed: int | None = None) -> None:
        """Fresh weights: the encoder as the model draws its own, the projectors as ARC starts them. With `seed`,
        bitwise reproducible (private generators; the projectors' stream is offset from the encoder's)."""
        self.encoder.init_weights(seed)
        generator = None if seed is None else torch.Generator().manual_seed(seed + _PROJECTOR_SEED_OFFSET)
        for projector in self.projectors.values():
            projector.reset_parameters(generator)

    def forward(self, input_ids: torch.Tensor, span_ids: torch.Tensor, task: Task | torch.Tensor | None = None,
                decoder: str = MAIN) -> Compressed:
        """Compress the spans of `input_ids` [B, S] marked by `span_ids` [B, S] (-1 outside spans; see `Spans`).

        task: "rec" / "cont" puts that task vector after every span; a tensor [num spans] of REC, CONT or
        NO_TASK chooses per span; None puts none. decoder: whose projector (and task vectors) to use.
        """
        return self.compress(Spans.from_span_ids(input_ids, span_ids), task, decoder)

    def compress(self, spans: Spans, task: Task | torch.Tensor | None = None, decoder: str = MAIN) -> Compressed:
        """`forward` for spans already laid out one per row."""
        if decoder not in self.projectors:
            raise ValueError(f"no projector for decoder {decoder!r}; this compressor projects into "
                             f"{list(self.projectors)}")
        projector = self.projectors[decoder]
        encoded = self.encoder(spans)
        states, counts = encoded.states, encoded.counts
        ids = self._task_ids(task, spans.count, counts.device)
        if ids is None:
            keep = torch.arange(states.shape[1], device=states.device)[None, :] < counts[:, None]
            return Compressed(vectors=projector(states[keep]), counts=counts, spans=spans)
        # The task vector goes in the slot after the span's last vector (ARC appends it in encoder space; the
        # projector is linear, so it is projected with the spans' vectors and put in place after); a span without
        # one gets it written past its count, where nothing reads it.
        projected, specials = projector(states, with_tasks=True)
        projected = torch.cat([projected, projected.new_zeros(projected.shape[0], 1, projected.shape[2])], dim=1)
        rows = torch.arange(spans.count, device=projected.device)
        projected = projected.index_put((rows, counts), specials[ids.clamp(min=0)])
        counts = counts + (ids != NO_TASK)
        keep = torch.arange(projected.shape[1], device=projected.device)[None, :] < counts[:, None]
        return Compressed(vectors=projected[keep], counts=counts, spans=spans)

    @staticmethod
    def _task_ids(task: Task | torch.Tensor | None, count: int, device: torch.device) -> torch.Tensor | None:
        if task is None:
            return None
        if isinstance(task, str):
            if task not in TASKS:
                raise ValueError(f"task {task!r} is not one of {list(TASKS)} (or a tensor of per-span task ids)")
            return torch.full((count,), TASKS.index(task), dtype=torch.long, device=device)
        if task.shape != (count,):
            raise ValueError(f"per-span task ids must be [{count}] (one per span), got {tuple(task.shape)}")
        if bool(((task != REC) & (task != CONT) & (task != NO_TASK)).any()):
            raise ValueError(f"per-span task ids must be REC ({REC}), CONT ({CONT}) or NO_TASK ({NO_TASK})")
        return task.to(device=device, dtype=torch.long)
