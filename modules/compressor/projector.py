"""The projector from the encoder's width into a decoder's, and the `<Rec>` / `<Cont>` task embeddings.

ARC-Encoder's `EmbProjector` (`bridge_type: mlp`): two bias-free linear layers with no activation between them,
a rank bottleneck (3072 -> 2048 -> 4096 there), Kaiming-uniform init (torch's Linear default). The task embeddings
live in the encoder's space, start at ones (ARC), and pass through the same projector, so a decoder sees them as
it sees the compressed vectors. One projector (with its task embeddings) per decoder.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Task = Literal["rec", "cont"]
REC, CONT = 0, 1
"""Rows of `Projector.task_embeds()`: reconstruction (the decoder repeats the span) and continuation."""
TASKS: tuple[Task, ...] = ("rec", "cont")


class Projector(nn.Module):
    """`down` (encoder width -> bottleneck) then `up` (bottleneck -> decoder width); `rec_embed`, `cont_embed` [in]."""

    def __init__(self, in_width: int, out_width: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_width, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, out_width, bias=False)
        self.rec_embed = nn.Parameter(torch.ones(in_width))
        self.cont_embed = nn.Parameter(torch.ones(in_width))
        self.reset_parameters()

    def forward(self, x: torch.Tensor, with_tasks: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """[..., in_width] -> [..., out_width], in the projector's dtype; `with_tasks`: also the projected `<Rec>`
        and `<Cont>` vectors [2, out_width]. They are read here, inside the forward, because an engine that gathers
        a module's parameters around its forward (DeepSpeed ZeRO-3) holds them only there."""
        dtype = self.down.weight.dtype
        if not with_tasks:
            return self.up(self.down(x.to(dtype)))
        rows = torch.cat([x.reshape(-1, x.shape[-1]).to(dtype), self.task_embeds().to(dtype)])
        out = self.up(self.down(rows))
        return out[:-2].reshape(*x.shape[:-1], out.shape[-1]), out[-2:]

    def task_embeds(self) -> torch.Tensor:
        """[2, in_width]: the `<Rec>` (row REC) and `<Cont>` (row CONT) embeddings, in encoder space."""
        return torch.stack([self.rec_embed, self.cont_embed])

    def special(self, task: Task) -> torch.Tensor:
        """[out_width]: the projected `<Rec>` or `<Cont>` vector a decoder reads after a compressed span."""
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {list(TASKS)}")
        return self.specials()[TASKS.index(task)]

    def specials(self) -> torch.Tensor:
        """[2, out_width]: both projected task vectors (rows REC and CONT)."""
        return self(self.rec_embed.new_zeros(0, self.down.in_features), with_tasks=True)[1]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """ARC's start: Kaiming-uniform linears (torch's Linear default, U(+-1/sqrt(fan_in))), task embeddings at
        ones. With `generator`, bitwise reproducible and the global RNG untouched (as the model's init_weights)."""
        for linear in (self.down, self.up):
            if linear.weight.is_meta:  # built on the meta device: initialised again once materialised
                continue
            bound = linear.in_features ** -0.5
            # Drawn on the CPU in fp32, then copied: the same seed gives the same weights on any device and dtype.
            sample = torch.empty(linear.weight.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            linear.weight.copy_(sample)
        self.rec_embed.fill_(1.0)
        self.cont_embed.fill_(1.0)
