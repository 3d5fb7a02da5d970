"""DeepSeek-V3 multi-token prediction: D sequential modules sharing the base model's embedding and head.

Module k (1-based) at position t reads the previous depth's hidden state h^{k-1}_t (h^0: the base model's
final normed hidden state, what vLLM and transformers hand their MTP layers) and the embedding of token t + k:

    h'_t = eh_proj(cat(enorm(embed(x_{t+k})), hnorm(h^{k-1}_t)))      (2H -> H)
    h^k  = norm(decoder block(h'))    (causal within each document, the base's positions; `shared_head.norm`)
    logits of x_{t+k+1} = lm_head(h^k)                                 (the shared head)

The next depth reads the normed h^k, as transformers' `MtpModel` chains its layers. The block's MLP is of the
kind the base's last layer has (an MoE layer on an MoE base, as DeepSeek-V3 and GLM-4.5 build theirs); its
routing joins the model's in `outputs.aux` (`DraftOutput.aux`), so the MoE plugin balances it as one more layer.
The block is built from the base's config, so it has the base family's biases and q/k norms; its attention is
full (`MTP_WINDOW`) on every family, whatever sliding window the base's layers use: DeepSeek-V3's MTP layers have
none, and transformers' `MtpModel` masks an MTP layer fully unless the config's `mtp_layer_types` says otherwise
(export.py writes it where the family's config has per-layer types; Mistral's has none: see `mtp_window_note`).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtrain.modules.transformer.attention import bind_attention
from slimtrain.modules.transformer.kv_cache import KVCache
from slimtrain.modules.transformer.layers import MLP, Aux, DecoderBlock, RMSNorm, replicate_mlp
from slimtrain.modules.transformer.rope import rope_for

from .base import BaseStep, BaseView, DraftOutput
from .targets import shifted_tokens


MTP_WINDOW: int | None = None
"""The sliding window of every MTP block's attention: none (see the module docstring)."""


def _dense(mlp: nn.Module) -> bool:
    return type(mlp) is MLP


class MTPModule(nn.Module):
    """One depth: `enorm`, `hnorm`, `eh_proj`, `block` (a decoder block like the base's), `norm`. `mlp_like`:
    the base's last MLP, whose kind the block's MLP takes (None: dense)."""

    def __init__(self, cfg, mlp_like: nn.Module | None = None) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderBlock(cfg, None if mlp_like is None else replicate_mlp(mlp_like, cfg))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend) -> tuple[torch.Tensor, Aux]:
        """(h^k [B, S, H] normed, the block's aux) from the embeddings of tokens t + k and h^{k-1} ([B, S, H])."""
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        out, aux = self.block(x, cos, sin, attend)
        return self.norm(out), aux


class MTPHeads(nn.Module):
    """`depths.{k}`: the module of depth k + 1 (1..D); `mlp_like`: the base's last MLP (see `MTPModule`)."""

    kind = "mtp"

    def __init__(self, cfg, depth: int, mlp_like: nn.Module | None = None) -> None:
        super().__init__()
        self.depths = nn.ModuleList(MTPModule(cfg, mlp_like) for _ in range(depth))

    def foreign_modules(self) -> list[str]:
        """Names of the modules another plugin owns and initialises (an MoE block MLP), empty when dense."""
        return [f"depths.{k}.block.mlp" for k, m in enumerate(self.depths) if not _dense(m.block.mlp)]

    @property
    def positions(self) -> int:
        return len(self.depths)

    def draft_outputs(self, base: BaseView) -> list[DraftOutput]:
        model = base.model
        s = base.input_ids.shape[1]
        cos, sin = rope_for(model.cfg, base.position_ids, base.hidden.dtype)
        attend = bind_attention(model.cfg.attention, base.documents, s, base.hidden.device, base.hidden.dtype,
                                MTP_WINDOW)
        hidden, outputs = base.hidden, []
        for k, module in enumerate(self.depths, start=1):
            embeds = model.embed(shifted_tokens(base.input_ids, base.doc_ids, k))
            hidden, aux = module(embeds, hidden, cos, sin, attend)
            outputs.append(DraftOutput(k, hidden, model.lm_head, aux=aux))
        return outputs

    def drafter(self, model: nn.Module) -> "MTPDrafter":
        return MTPDrafter(self, model)


class MTPDrafter:
    """Decoding with every depth's own KV cache.

    Module k at position t needs h^{k-1}_t and token t + k. Once n tokens are accepted (x_0 .. x_{n-1}; the
    base's outputs known at 0 .. n-2), its inputs are real for t <= n-1-k; for the positions after, up to
    n-2, they hold this round's drafts. Each round feeds every module from its first position not cached
    with real inputs, drafts, then forgets the draft-dependent positions again.
    """

    def __init__(self, heads: MTPHeads, model: nn.Module) -> None:
        self.heads, self.model = heads, model
        self.tokens: list[int] = []  # accepted tokens x_0 .. x_{n-1}
        self.caches: list[KVCache] = []
        self.history: list[torch.Tensor] = []  # h^k at the positions module k (or the base, k = 0) holds for real

    def observe(self, step: BaseStep) -> None:
        if not self.tokens:  # the prompt: x_0 is the first row's token, the rest follow the rows
            raise ValueError("MTPDrafter.observe needs the prompt's first token: call start(prompt) first")
        self.tokens.extend(step.next_tokens)
        rows = step.hidden
        self.history[0] = rows if self.history[0] is None else torch.cat([self.history[0], rows])

    def start(self, first_token: int, max_len: int) -> None:
        """Begin a sequence whose first token is `first_token`, for up to `max_len` positions."""
        self.tokens = [first_token]
        self.caches = [KVCache.for_layers([m.block], 1, max_len) for m in self.heads.depths]
        self.history = [None] + [None] * self.heads.positions

    def chain(self, k: int) -> list[int]:
        n, model, cfg = len(self.tokens), self.model, self.model.cfg
        drafts: list[int] = []
        previous = self.history[0]  # h^{k-1} at positions 0 .. n-2 (real, then this round's)
        for depth, (module, cache) in enumerate(zip(self.heads.depths[:k], self.caches), start=1):
            lo, hi = cache.length, n - 2
            sequence = self.tokens + drafts
            tokens = torch.tensor([sequence[t + depth] for t in range(lo, hi + 1)], device=previous.device)
            positions = torch.arange(lo, hi + 1, device=previous.device)[None]
            cos, sin = rope_for(cfg, positions, previous.dtype)
            bound = cache.bind(hi + 1 - lo)
            out = module(model.embed(tokens)[None], previous[lo:hi + 1][None], cos, sin,
                         bound.layer(0, MTP_WINDOW))[0][0]
            cache.commit(hi + 1 - lo)
            drafts.append(int(model.lm_head(out[-1]).argmax()))
            real = max(lo, n - depth)  # positions whose inputs were all accepted tokens
            cache.truncate(real)
            known = self.history[depth]
            kept = out[: real - lo]
            self.history[depth] = kept if known is None else torch.cat([known, kept])
            previous = torch.cat([self.history[depth], out[real - lo:]])
        return drafts

    def children(self, path: list[int], width: int) -> list[int]:
        raise ValueError("mtp heads draft chains only: tree verification is for medusa and hydra heads")
