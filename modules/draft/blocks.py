"""Medusa's residual block, also Hydra's (whose first block projects a wider input down), and the heads both
build from them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    """x + SiLU(Linear(x)); with a wider input, a bias-free projection replaces x on the residual path.

    The Linear starts at zero (weight and bias) and the projection as [I, 0, ...] (it passes the hidden
    state, the input's first `width` features, through): a new head starts as the identity on the base
    model's hidden state.
    """

    def __init__(self, in_width: int, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_width, width)
        self.residual = nn.Linear(in_width, width, bias=False) if in_width != width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.residual is None else self.residual(x)
        return skip + F.silu(self.linear(x))

    @torch.no_grad()
    def reset(self) -> None:
        """The identity start (see the class)."""
        self.linear.weight.zero_()
        self.linear.bias.zero_()
        if self.residual is not None:
            self.residual.weight.zero_()
            self.residual.weight[:, : self.residual.weight.shape[0]].copy_(torch.eye(self.residual.weight.shape[0]))


class ResidualHeads(nn.Module):
    """Heads of residual blocks (`blocks.{k}`) each with a vocabulary projection of its own (`lm_heads.{k}`)."""

    def __init__(self, blocks: list[nn.Sequential], hidden: int, vocab: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.lm_heads = nn.ModuleList(nn.Linear(hidden, vocab, bias=False) for _ in blocks)

    @property
    def positions(self) -> int:
        return len(self.blocks)

    @torch.no_grad()
    def reset(self, lm_head: torch.Tensor) -> None:
        """Blocks that pass the hidden state through, every projection a copy of the base's `lm_head` weight."""
        for blocks, head in zip(self.blocks, self.lm_heads):
            for block in blocks:
                block.reset()
            head.weight.copy_(lm_head)
