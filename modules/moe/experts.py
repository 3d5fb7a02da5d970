"""Routed experts as one grouped GEMM: tokens sorted by expert, one matrix product per projection over all
experts (`torch.nn.functional.grouped_mm` where the installed torch has it), outputs weighted and summed back.

Weights are stored stacked, in transformers' own layout: gate_up [E, 2I, H] (gate rows then up rows) and
down [E, H, I]. `expert_loop` is the reference every path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .router import Routing


def grouped_mm_available(x: torch.Tensor, *inner: int) -> bool:
    """Whether torch's grouped GEMM can run here: it exists, and every inner dimension is 16-byte aligned."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn is not None and all(d * x.element_size() % 16 == 0 for d in inner)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


class GroupedExperts(nn.Module):
    """E SwiGLU experts of hidden width `intermediate` on `hidden`-wide inputs."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [T, H] -> sum over each token's chosen experts of weight x expert(x), [T, H]."""
        hidden, inter = x.shape[-1], self.intermediate
        if not grouped_mm_available(x, hidden, inter) or x.dtype != self.gate_up.dtype:
            return expert_loop(x, routing, self.gate_up, self.down)
        k = routing.experts.shape[-1]
        flat = routing.experts.reshape(-1)
        order = flat.argsort(stable=True)  # rows grouped by expert, in token order within each
        token = order // k
        offs = torch.bincount(flat, minlength=self.num_experts).cumsum(0).to(torch.int32)
        h = _grouped_mm(x[token], self.gate_up.transpose(1, 2), offs)
        gate, up = h.split(inter, dim=-1)
        y = _grouped_mm(F.silu(gate) * up, self.down.transpose(1, 2), offs)
        y = y * routing.weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y)


def expert_loop(x: torch.Tensor, routing: Routing, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The reference: every expert on the tokens that chose it, one at a time."""
    out = torch.zeros_like(x)
    inter = down.shape[-1]
    for e in range(gate_up.shape[0]):
        token, slot = (routing.experts == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        gate, up = (x[token] @ gate_up[e].T).split(inter, dim=-1)
        y = (F.silu(gate) * up) @ down[e].T
        out = out.index_add(0, token, y * routing.weights[token, slot].unsqueeze(-1).to(y.dtype))
    return out
