"""The Llama-family decoder: embedding, pre-norm blocks, final norm, LM head. Single-device PyTorch."""

from __future__ import annotations

from typing import Callable, Collection

import torch
from torch import nn

from slimtrain.core.documents import Documents, as_documents

from .attention import BoundAttention, bind_attention, check_backend
from .config import ModelConfig
from .init import init_weights
from .io import Splice, TransformerOutput
from .kv_cache import KVCache
from .layers import DecoderBlock, RMSNorm
from .rope import rope_for
from .sequence_shard import SequenceShard


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
        # Set by a backend that splits the sequence over ranks (Ulysses): see `SequenceShard`.
        self.sequence_shard: SequenceShard | None = None
        # Set by a backend whose hidden states hold 1/sequence_split of every row's tokens between the embedding
        # and the head (megatron's sequence parallelism: its embedding scatters the sequence, the projections
        # gather it, so attention, positions and masks see whole rows). Logits cover the whole sequence;
        # hidden_states, last_hidden and layer_hidden are this rank's slice.
        self.sequence_split = 1
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the LM head's weight with the embedding (when configured).

        Called again by `init_weights`: moving a model off the meta device (`to_empty`) replaces
        each parameter separately and so unties them.
        """
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_weights(self, seed: int | None = None, only: Collection[str] | None = None) -> None:
        """(Re)initialise the weights; see `slimtrain.modules.transformer.init.init_weights`. `only`: the
        parameter names to initialise (the dense model's, once plugins added theirs); None: all."""
        self.tie_weights()
        init_weights(self, self.cfg, seed, only)

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
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | Documents | None = None,
        with_logits: bool = True,
        *,
        inputs_embeds: torch.Tensor | None = None,
        splice: Splice | None = None,
        hidden_layers: tuple[int, ...] = (),
        cache: KVCache | None = None,
        tree_mask: torch.Tensor | None = None,
    ) -> TransformerOutput:
        """Logits for `input_ids` [B, S] (or for `inputs_embeds` [B, S, H]).

        position_ids [B, S]: RoPE positions (default 0..S-1 in every row).
        doc_ids [B, S]: document of each token (-1 = padding); attention never crosses a document
        and padding attends only to itself. None means one causal document per row. The trainer passes
        `Documents` (the ids with their layout found on the host, so that no forward waits on the GPU).
        with_logits=False: skip the LM head (logits=None); the caller applies `lm_head` to the hidden states.
        splice: embeddings that replace the token embeddings at the splice's positions (with input_ids).
        hidden_layers: layers (negative: from the end) whose output hidden states `layer_hidden` returns.
        cache: incremental decoding (see `KVCache`): these tokens follow the `cache.length` cached ones
        (positions default to `cache.length ...`), attend to them, and are added to the cache.
        tree_mask [S, S]: with a cache, which new tokens each new token attends to (a token tree); default causal.
        See `ModelInputs` for the same arguments as one object (training never passes a cache).
        """
        docs = as_documents(doc_ids)
        if self.sequence_shard is not None and cache is None:
            x, position_ids = self._embed_shard(input_ids, inputs_embeds, splice, position_ids, docs)
            s = docs.ids.shape[1] if docs is not None else position_ids.shape[1] * self.sequence_shard.size
        else:
            if self.sequence_split > 1 and (splice is not None or cache is not None):
                raise ValueError("splice and cache need the whole sequence's hidden states on every rank, which a "
                                 "sequence-parallel backend splits; run them without sequence parallelism")
            x = self._embed(input_ids, inputs_embeds, splice)
            b, s = x.shape[0], x.shape[1] * self.sequence_split
            self._check_inputs((b, s), x.device, position_ids, docs)
        wanted = self._layer_indices(hidden_layers)
        start = 0 if cache is None else cache.length
        if position_ids is None:
            position_ids = torch.arange(start, start + s, device=x.device).expand(b, s)
        cos, sin = rope_for(self.cfg, position_ids, x.dtype)
        if cache is None:
            if tree_mask is not None:
                raise ValueError("tree_mask shapes attention among tokens added to a KV cache: pass cache= with it")
            attend = self.bind_attention(docs, s, x.device, x.dtype)
        else:
            self._check_cache(cache, docs, tree_mask)
            cached = cache.bind(s, tree_mask)
        layer_hidden: dict[int, torch.Tensor] = {}
        aux: dict[str, list[torch.Tensor]] = {}
        for i, layer in enumerate(self.layers):
            window = self.cfg.window_of(i)
            x, reported = layer(x, cos, sin, attend(window) if cache is None else cached.layer(i, window))
            for name, value in reported.items():
                aux.setdefault(name, []).append(value)
            for asked in wanted.get(i, ()):
                layer_hidden[asked] = x
        if cache is not None:
            cache.commit(s)
        hidden = self.norm(x)
        return TransformerOutput(logits=self.lm_head(hidden) if with_logits else None, hidden_states=hidden,
                                 last_hidden=x, layer_hidden=layer_hidden, aux=aux)

    def bind_attention(self, docs: Documents | None, seq_len: int, device: torch.device,
                       dtype: torch.dtype) -> Callable[[int | None], BoundAttention]:
        """The attention of one forward by sliding window (None: full): each mask is prepared once, for every
        layer with that window. With a sequence shard, each is wrapped by the shard's attention (the whole
        sequence's mask, this rank's heads)."""
        bound: dict[int | None, BoundAttention] = {}
        shard = self.sequence_shard

        def attend(window: int | None) -> BoundAttention:
            if window not in bound:
                local = bind_attention(self.cfg.attention, docs, seq_len, device, dtype, window)
                bound[window] = local if shard is None else shard.attention(local)
            return bound[window]

        return attend

    def _embed_shard(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, splice: Splice | None,
                     position_ids: torch.Tensor | None, docs: Documents | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's embeddings [B, S/N, H], its positions [B, S/N]) of whole rows, under a sequence shard: the
        inputs, positions and documents are the whole rows' (so masks and positions stay global), only this
        rank's 1/N of the sequence is embedded."""
        if splice is not None:
            raise ValueError("splice (a compressor's embeddings) cannot run under sequence parallelism: its spans "
                             "would cross the shards; set backend.sequence_parallel=1")
        full = input_ids if input_ids is not None else inputs_embeds
        if full is None or full.dim() < 2:
            raise ValueError("give the model exactly one of input_ids [batch, seq] and inputs_embeds [batch, seq, hidden]")
        b, s = full.shape[:2]
        self._check_inputs((b, s), full.device, position_ids, docs)
        if position_ids is None:
            position_ids = torch.arange(s, device=full.device).expand(b, s)
        local = self.sequence_shard.local
        x = self._embed(None if input_ids is None else local(input_ids),
                        None if inputs_embeds is None else local(inputs_embeds), None)
        return x, local(position_ids)

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
               splice: Splice | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give the model exactly one of input_ids [batch, seq] and inputs_embeds [batch, seq, hidden]")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq, {self.cfg.hidden_size}], got shape "
                                 f"{tuple(inputs_embeds.shape)}")
            if splice is not None:
                raise ValueError("splice replaces token embeddings: give it with input_ids, not inputs_embeds")
            # The parameters' dtype (the compute dtype): a pipeline stage after the first holds no embedding.
            return inputs_embeds.to(next(self.parameters()).dtype)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        if splice is None:
            return x
        if splice.mask.shape != input_ids.shape or splice.embeds.dim() != 2 or splice.embeds.shape[-1] != x.shape[-1]:
            raise ValueError(f"splice: mask must be [batch, seq] = {tuple(input_ids.shape)} and embeds [positions, "
                             f"{x.shape[-1]}]; got {tuple(splice.mask.shape)} and {tuple(splice.embeds.shape)}")
        return x.masked_scatter(splice.mask.unsqueeze(-1), splice.embeds.to(x.dtype))

    def _check_cache(self, cache: KVCache, docs: Documents | None, tree_mask: torch.Tensor | None) -> None:
        if docs is not None:
            raise ValueError("decoding with a KV cache takes rows of one document each: pass no doc_ids")
        if cache.num_layers != len(self.layers):
            raise ValueError(f"the KV cache holds {cache.num_layers} layers, the model has {len(self.layers)}; "
                             "build it with KVCache.for_model(model, ...)")
        if tree_mask is not None and tree_mask.dim() != 2:
            raise ValueError(f"tree_mask must be [new tokens, new tokens], got shape {tuple(tree_mask.shape)}")

    def _layer_indices(self, hidden_layers: tuple[int, ...]) -> dict[int, list[int]]:
        """Layer index -> the requested indices it answers (a request may count from the end)."""
        n, wanted = len(self.layers), {}
        for asked in hidden_layers:
            if not -n <= asked < n:
                raise ValueError(f"hidden_layers asks for layer {asked}, but the model has {n} layers "
                                 f"(valid: {-n}..{n - 1})")
            wanted.setdefault(asked % n, []).append(asked)
        return wanted

    def _check_inputs(self, shape: tuple[int, int], device: torch.device, position_ids: torch.Tensor | None,
                      docs: Documents | None) -> None:
        if shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                "raise model.max_seq_len or shorten the data's seq_len"
            )
        doc_ids = None if docs is None else docs.ids
        for name, t in (("position_ids", position_ids), ("doc_ids", doc_ids)):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} != input shape {shape}")
        boundaries = None if docs is None or docs.varlen is None else docs.varlen[0]
        for name, t in (("doc_ids", doc_ids), ("doc_ids' cu_seqlens", boundaries)):
            if t is not None and t.device != device:  # a kernel would fail far from the cause
                raise ValueError(
                    f"{name} on {t.device} but the inputs on {device}; move the batch with "
                    "Batch.to(device), or the Documents with .to(device)"
                )
