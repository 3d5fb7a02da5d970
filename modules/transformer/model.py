"""The Llama-family decoder: embedding, pre-norm blocks, final norm, LM head. Single-device PyTorch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimtrain.data.documents import Documents, as_documents

from .attention import bind_attention, check_backend
from .config import ModelConfig
from .init import init_weights
from .layers import DecoderBlock, RMSNorm
from .rope import rope_cos_sin


@dataclass
class TransformerOutput:
    """logits: [B, S, V] in the compute dtype (None when the caller applies the head itself, e.g. the
    chunked loss); hidden_states: final normed hidden [B, S, H]."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor


class Transformer(nn.Module):
    """A decoder-only transformer with RMSNorm, RoPE, grouped-query attention and a SwiGLU MLP.

    The compute dtype is the parameters' dtype (`model.to(torch.bfloat16)`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError(
                "model.vocab_size is None; set it in the recipe or resolve it from the tokenizer "
                "(cfg.model_copy(update={'vocab_size': tokenizer_size})) before building the model"
            )
        check_backend(cfg.attention)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the LM head's weight with the embedding (when configured).

        Called again by `init_weights`: moving a model off the meta device (`to_empty`) replaces
        each parameter separately and so unties them.
        """
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise all weights; see `slimtrain.modules.transformer.init.init_weights`."""
        self.tie_weights()
        init_weights(self, self.cfg, seed)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (same results, less memory)."""
        for layer in self.layers:
            layer.recompute = enabled

    def compile_blocks(self, **options: object) -> None:
        """torch.compile every decoder block in place (parameter names and state dicts are unchanged).

        The blocks share their code, so one compiled graph serves every layer. Call after plugins have
        swapped their layers, since a swap would not be seen by the compiled graph.
        """
        for layer in self.layers:
            layer.compile(**options)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | Documents | None = None,
        with_logits: bool = True,
    ) -> TransformerOutput:
        """Logits for `input_ids` [B, S].

        position_ids [B, S]: RoPE positions (default 0..S-1 in every row).
        doc_ids [B, S]: document of each token (-1 = padding); attention never crosses a document
        and padding attends only to itself. None means one causal document per row. The trainer passes
        `Documents` (the ids with their layout found on the host, so that no forward waits on the GPU).
        with_logits=False: skip the LM head (logits=None); the caller applies `lm_head` to the hidden states.
        """
        b, s = input_ids.shape
        docs = as_documents(doc_ids)
        self._check_inputs(input_ids, position_ids, docs)
        x = self.embed(input_ids)
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        cos, sin = rope_cos_sin(position_ids, self.cfg.dim_per_head, self.cfg.rope_theta, x.dtype)
        attend = bind_attention(self.cfg.attention, docs, s, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        hidden = self.norm(x)
        return TransformerOutput(logits=self.lm_head(hidden) if with_logits else None, hidden_states=hidden)

    def _check_inputs(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, docs: Documents | None
    ) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                "raise model.max_seq_len or shorten the data's seq_len"
            )
        doc_ids = None if docs is None else docs.ids
        for name, t in (("position_ids", position_ids), ("doc_ids", doc_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} != input_ids shape {tuple(input_ids.shape)}")
        boundaries = None if docs is None or docs.varlen is None else docs.varlen[0]
        for name, t in (("doc_ids", doc_ids), ("doc_ids' cu_seqlens", boundaries)):
            if t is not None and t.device != input_ids.device:  # a kernel would fail far from the cause
                raise ValueError(
                    f"{name} on {t.device} but input_ids on {input_ids.device}; move the batch with "
                    "Batch.to(device), or the Documents with .to(device)"
                )
