"""Upcycling: an MoE layer's experts started from the dense MLP it replaced (Sparse Upcycling, Komatsuzaki et
al. 2022), read from the starting checkpoint's tensors the model lacks (`WeightInit.source`).

Every routed expert is a copy of the dense SwiGLU: gate_up[e] = cat(gate, up), down[e] = down. With top-k
weights that sum to 1 and no noise, the MoE layer then computes exactly the dense MLP. Fine-grained experts
(narrower than the dense MLP) take equal slices of its intermediate dimension: expert e the slice e mod
(I_dense / I_expert), so the slices together are the dense MLP (fine-grained upcycling). Shared experts start
as the dense MLP too, or as its first slice when narrower. Optional noise makes the copies diverge.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch

PARTS = ("gate_proj", "up_proj", "down_proj")


class DenseMLP(NamedTuple):
    """A dense SwiGLU: gate [I, H], up [I, H], down [H, I]."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def width(self) -> int:
        return self.gate.shape[0]

    def slice(self, index: int, width: int) -> "DenseMLP":
        """The SwiGLU made of intermediate units [index x width, (index + 1) x width)."""
        rows = slice(index * width, (index + 1) * width)
        return DenseMLP(self.gate[rows], self.up[rows], self.down[:, rows])


def dense_mlp_names(layer: int) -> list[str]:
    """Our names of layer `layer`'s dense MLP weights (gate, up, down)."""
    return [f"layers.{layer}.mlp.{part}.weight" for part in PARTS]


def dense_mlp(source: Mapping[str, torch.Tensor], layer: int) -> DenseMLP | None:
    """Layer `layer`'s dense MLP from `source`, or None when the source holds none of it; a partial one
    is an error naming what is missing."""
    names = dense_mlp_names(layer)
    found = [n for n in names if n in source]
    if not found:
        return None
    if len(found) < len(names):
        missing = sorted(set(names) - set(found))
        raise ValueError(f"the starting checkpoint holds {found} but not {missing}: a dense MLP to upcycle needs "
                         "all three projections")
    return DenseMLP(*(source[n].float() for n in names))


def slices(dense_width: int, width: int, field: str) -> int:
    """How many `width`-wide slices the dense intermediate dimension splits into; an error naming `field`
    when `width` does not divide `dense_width`."""
    if width > dense_width or dense_width % width:
        divisors = [d for d in range(dense_width, 0, -1) if dense_width % d == 0][:4]
        raise ValueError(f"{field}={width} cannot be upcycled from a dense MLP of intermediate size {dense_width}: "
                         f"experts take equal slices of it, so the width must divide {dense_width}; set {field} to "
                         f"a divisor such as {', '.join(map(str, divisors))}")
    return dense_width // width


@torch.no_grad()
def upcycled_experts(dense: DenseMLP, num_experts: int, width: int, noise: float = 0.0,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [E, 2w, H], down [E, H, w]): expert e is slice e mod (I_dense / w) of `dense`, plus Gaussian
    noise of std `noise` x the RMS of the dense matrix it copies (drawn from `generator`, expert by expert)."""
    n = slices(dense.width, width, "moe.expert_intermediate_size")
    gate_up, down = [], []
    scale_gu = noise * _rms(torch.cat([dense.gate, dense.up]))
    scale_down = noise * _rms(dense.down)
    for e in range(num_experts):
        part = dense.slice(e % n, width)
        gu = torch.cat([part.gate, part.up])
        d = part.down.clone()
        if noise:
            gu = gu + torch.randn(gu.shape, generator=generator) * scale_gu
            d = d + torch.randn(d.shape, generator=generator) * scale_down
        gate_up.append(gu)
        down.append(d)
    return torch.stack(gate_up), torch.stack(down)


def upcycled_shared(dense: DenseMLP, num_shared: int, expert_width: int) -> DenseMLP:
    """The shared experts (one SwiGLU num_shared x expert_width wide) as the dense MLP, or as its first slice
    when narrower; an error naming moe.num_shared_experts when the width does not divide the dense one."""
    width = num_shared * expert_width
    if width > dense.width or dense.width % width:
        fits = [n for n in range(1, dense.width // expert_width + 1) if dense.width % (n * expert_width) == 0]
        raise ValueError(f"moe.num_shared_experts={num_shared} x expert width {expert_width} = {width} cannot be "
                         f"upcycled from a dense MLP of intermediate size {dense.width}: the shared experts start as "
                         f"the dense MLP or an equal slice of it, so their width must divide {dense.width}; set "
                         f"moe.num_shared_experts to one of {fits or [0]}")
    return dense.slice(0, width)


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).mean().sqrt()
