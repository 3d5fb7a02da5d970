"""Hydra heads: Medusa's heads made sequentially dependent. Head k reads the base model's final hidden state
and the embeddings of the k tokens before the one it drafts (the base's next token, then the earlier
drafts): input (k + 1)H, projected to H by the first residual block."""

from __future__ import annotations

import torch
from torch import nn

from .base import BaseStep, BaseView, DraftOutput
from .blocks import ResBlock, ResidualHeads
from .targets import shifted_tokens


class HydraHeads(ResidualHeads):
    """`blocks.{k}` (the first block of head k takes (k + 2)H, k from 0) then `lm_heads.{k}` [V, H]."""

    kind = "hydra"

    def __init__(self, hidden: int, vocab: int, num_heads: int, num_layers: int) -> None:
        super().__init__([nn.Sequential(ResBlock((k + 2) * hidden, hidden),
                                        *(ResBlock(hidden, hidden) for _ in range(num_layers - 1)))
                          for k in range(num_heads)], hidden, vocab)

    def logits(self, k: int, hidden: torch.Tensor, prefix_embeds: list[torch.Tensor]) -> torch.Tensor:
        """Head k's (0-based) logits from the hidden state and the k + 1 embeddings before its token."""
        return self.lm_heads[k](self.blocks[k](torch.cat([hidden, *prefix_embeds], dim=-1)))

    def draft_outputs(self, base: BaseView) -> list[DraftOutput]:
        embed = base.model.embed
        # The token at t + j (j >= 1) within t's document: what head k reads for j = 1..k + 1.
        ahead = [embed(shifted_tokens(base.input_ids, base.doc_ids, j)) for j in range(1, self.positions + 1)]
        return [DraftOutput(k + 1, self.blocks[k](torch.cat([base.hidden, *ahead[: k + 1]], dim=-1)), self.lm_heads[k])
                for k in range(self.positions)]

    def drafter(self, model: nn.Module) -> "HydraDrafter":
        return HydraDrafter(self, model.embed)


class HydraDrafter:
    """Head k reads the last accepted hidden state and the embeddings of the base's token and k drafts."""

    def __init__(self, heads: HydraHeads, embed: nn.Embedding) -> None:
        self.heads, self.embed = heads, embed
        self.hidden: torch.Tensor | None = None
        self.last_token = 0

    def start(self, first_token: int, max_len: int) -> None:
        """Nothing to set up: the heads read the last accepted position only."""

    def observe(self, step: BaseStep) -> None:
        self.hidden, self.last_token = step.hidden[-1], step.next_tokens[-1]

    def _logits(self, path: list[int]) -> torch.Tensor:
        tokens = torch.tensor([self.last_token, *path], device=self.hidden.device)
        return self.heads.logits(len(path), self.hidden, list(self.embed(tokens)))

    def chain(self, k: int) -> list[int]:
        path: list[int] = []
        for _ in range(k):
            path.append(int(self._logits(path).argmax()))
        return path

    def children(self, path: list[int], width: int) -> list[int]:
        return self._logits(path).topk(width).indices.tolist()
