"""Medusa heads: K independent heads on the base model's final hidden state; head k drafts token t + k + 1.

Each head is `num_layers` residual blocks and a vocabulary projection of its own, started from the base
model's `lm_head` (as Medusa's `add_medusa_heads` does), so that training starts from the base's guess.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import BaseStep, BaseView, DraftOutput
from .blocks import ResBlock, ResidualHeads


class MedusaHeads(ResidualHeads):
    """`num_heads` heads: `blocks.{k}` (residual blocks) then `lm_heads.{k}` [V, H] (k from 0: offset k + 1)."""

    kind = "medusa"

    def __init__(self, hidden: int, vocab: int, num_heads: int, num_layers: int) -> None:
        super().__init__([nn.Sequential(*(ResBlock(hidden, hidden) for _ in range(num_layers)))
                          for _ in range(num_heads)], hidden, vocab)

    def logits(self, k: int, hidden: torch.Tensor) -> torch.Tensor:
        """Head k's (0-based) logits from final hidden states [..., H]."""
        return self.lm_heads[k](self.blocks[k](hidden))

    def draft_outputs(self, base: BaseView) -> list[DraftOutput]:
        return [DraftOutput(k + 1, self.blocks[k](base.hidden), self.lm_heads[k]) for k in range(self.positions)]

    def drafter(self, model: nn.Module) -> "MedusaDrafter":
        return MedusaDrafter(self)


class MedusaDrafter:
    """Every head reads the last accepted position's hidden state: drafts do not depend on each other."""

    def __init__(self, heads: MedusaHeads) -> None:
        self.heads = heads
        self.hidden: torch.Tensor | None = None

    def start(self, first_token: int, max_len: int) -> None:
        """Nothing to set up: the heads read the last accepted position only."""

    def observe(self, step: BaseStep) -> None:
        self.hidden = step.hidden[-1]

    def chain(self, k: int) -> list[int]:
        return [int(self.heads.logits(i, self.hidden).argmax()) for i in range(k)]

    def children(self, path: list[int], width: int) -> list[int]:
        return self.heads.logits(len(path), self.hidden).topk(width).indices.tolist()
