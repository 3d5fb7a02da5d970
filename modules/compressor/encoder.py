"""The compressor's encoder: token embeddings of its own, decoder blocks run bidirectionally within each context
span, then span pooling (pooling.py) into a few vectors per span.

The blocks are the model's `DecoderBlock`s, built from a `ModelConfig` (`encoder_model_config`): a truncated copy
of the decoder (ARC-Encoder: the LLM without its last layers and without its causal mask) or a separately sized
one. A truncated copy keeps the decoder family's biases (Qwen2), q/k norms (Qwen3) and RoPE scaling (Llama 3.1):
the blocks compute them, and RoPE comes from `rope_for` with the encoder's config. Attention is `SpanAttention`:
every token sees its whole span and nothing else, no padding, no other span, and no sliding window (see
`encoder_model_config` for why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.modules.transformer.init import init_weights
from slimtrain.modules.transformer.layers import DecoderBlock, RMSNorm
from slimtrain.modules.transformer.rope import rope_for

from .attention import SpanAttention
from .config import CompressorModelConfig, TruncatedEncoder
from .pooling import MemoryTokens, group_ids, max_groups, pooled_query_block, pooling_matrix
from .spans import Spans

Rope = tuple[torch.Tensor, torch.Tensor]


@dataclass
class EncodedSpans:
    """The encoder's output in its own width: span i's vectors are states[i, :counts[i]] (the rest is padding)."""

    states: torch.Tensor
    counts: torch.Tensor


class SpanEncoder(nn.Module):
    """`embed`, `layers.{i}` (decoder blocks), `memory` (memory pooling only), `norm` (with final_norm).

    The compute dtype is the parameters' dtype.
    """

    def __init__(self, cfg: CompressorModelConfig, model_cfg: ModelConfig) -> None:
        super().__init__()
        if model_cfg.vocab_size is None:
            raise ValueError("the encoder's vocab_size is not resolved; build it with encoder_model_config")
        self.cfg, self.model_cfg = cfg, model_cfg
        width = model_cfg.hidden_size
        self.embed = nn.Embedding(model_cfg.vocab_size, width)
        self.layers = nn.ModuleList(DecoderBlock(model_cfg) for _ in range(cfg.encoder.layers))
        self.memory = MemoryTokens(cfg.num_memory_tokens, width) if cfg.pooling == "memory" else None
        self.norm = RMSNorm(width, model_cfg.norm_eps) if cfg.final_norm else None
        self.init_weights()

    @property
    def hidden_size(self) -> int:
        return self.model_cfg.hidden_size

    def init_weights(self, seed: int | None = None) -> None:
        """Fresh weights as the model draws its own (normal(0, init_std), residual outputs scaled, norms at 1)."""
        init_weights(self, self.model_cfg, seed)

    @torch.no_grad()
    def copy_decoder(self, decoder: Transformer) -> None:
        """Start from the decoder: its token embeddings and its first len(layers) blocks, copied (not shared)."""
        if not isinstance(self.cfg.encoder, TruncatedEncoder):
            raise ValueError("only a truncated encoder (encoder.source: truncate) starts from the decoder's weights")
        if len(decoder.layers) < len(self.layers) or decoder.embed.weight.shape != self.embed.weight.shape:
            raise ValueError(f"the decoder (embedding {tuple(decoder.embed.weight.shape)}, {len(decoder.layers)} "
                             f"layers) is not the one this encoder was built from (embedding "
                             f"{tuple(self.embed.weight.shape)}, {len(self.layers)} layers)")
        self.embed.weight.copy_(decoder.embed.weight)
        for i, (mine, theirs) in enumerate(zip(self.layers, decoder.layers)):
            try:
                mine.load_state_dict(theirs.state_dict())
            except RuntimeError as err:  # a plugin changed the decoder's blocks (e.g. experts swapped in)
                raise ValueError(f"decoder layer {i} does not load into a plain decoder block: build the compressor "
                                 "from the dense decoder, before plugins swap its layers") from err

    def forward(self, spans: Spans) -> EncodedSpans:
        """The pooled vectors of every span (memory-token or mean pooling, as configured)."""
        x, valid = self._inputs(spans)
        rope = self._rope(x.shape[1], x)
        attend = SpanAttention(valid)
        pooled_layers = 0 if self.memory is not None else self.cfg.pooled_layers
        token_layers = len(self.layers) - pooled_layers
        for block in self.layers[:token_layers]:
            x = self._block(block, x, rope, attend)
        if self.memory is not None:
            states = self.memory.read(x, spans.lengths)
            counts = torch.full_like(spans.lengths, self.memory.count)
        else:
            states, counts = self._mean_pool(x, spans.lengths, rope, attend, self.layers[token_layers:])
        return EncodedSpans(self._finish(states), counts)

    def encode_tokens(self, spans: Spans) -> torch.Tensor:
        """[N, L, H]: every layer run on the span's tokens, no pooling, no memory tokens (span i's states in
        [i, :lengths[i]]). What pooling factor 1 reproduces; also the encoder's per-token view for analysis."""
        x = self.embed(spans.tokens)
        self._check_length(x.shape[1])
        rope, attend = self._rope(x.shape[1], x), SpanAttention(spans.valid)
        for block in self.layers:
            x = self._block(block, x, rope, attend)
        return self._finish(x)

    def _inputs(self, spans: Spans) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded spans (memory tokens appended) and the valid slots [N, L'] (tokens and memory tokens)."""
        x = self.embed(spans.tokens)
        if self.memory is None:
            self._check_length(x.shape[1])
            return x, spans.valid
        self._check_length(x.shape[1] + self.memory.count)
        x = self.memory.append(x, spans.lengths)
        valid = torch.arange(x.shape[1], device=x.device) < (spans.lengths + self.memory.count)[:, None]
        return x, valid

    def _check_length(self, slots: int) -> None:
        if slots > self.model_cfg.max_seq_len:
            memory = f" with {self.memory.count} memory tokens" if self.memory is not None else ""
            raise ValueError(f"a context span of {slots} positions{memory} exceeds the encoder's max_seq_len="
                             f"{self.model_cfg.max_seq_len}; shorten the context spans, or raise max_seq_len (the "
                             "decoder's model.max_seq_len for a truncated encoder, encoder.max_seq_len for a "
                             "separate one)")

    def _rope(self, length: int, like: torch.Tensor) -> Rope:
        """RoPE at positions 0 .. length-1 in every row: each span's own positions (spans start at slot 0)."""
        positions = torch.arange(length, device=like.device)[None, :].expand(like.shape[0], -1)
        return rope_for(self.model_cfg, positions, like.dtype)

    @staticmethod
    def _block(block: DecoderBlock, x: torch.Tensor, rope: Rope, attend: SpanAttention) -> torch.Tensor:
        # A block's aux (an MoE layer's router terms) has no loss wired for the encoder: dropped.
        return block(x, *rope, attend)[0]

    def _mean_pool(self, x: torch.Tensor, lengths: torch.Tensor, rope: Rope, attend: SpanAttention,
                   blocks: Sequence[DecoderBlock]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool x [N, L, H] by the configured groups, through the pooled-query `blocks` (none: pool the output)."""
        rule = {"factor": self.cfg.factor, "count": self.cfg.vectors_per_span}
        groups, counts = group_ids(lengths, x.shape[1], **rule)
        num_groups = max_groups(x.shape[1], **rule)
        pooled = pooling_matrix(groups, num_groups, x.dtype) @ x
        rope_q = self._rope(num_groups, x)  # pooled query j at position j (ARC's re-indexing; see pooling.py)
        for i, block in enumerate(blocks):
            pooled = pooled_query_block(block, x, pooled, rope, rope_q, attend)[0]
            if i < len(blocks) - 1:  # the next pooled layer reads the token stream at its own depth
                x = self._block(block, x, rope, attend)
        return pooled, counts

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm is None else self.norm(x)
