"""Routed experts as one grouped GEMM: tokens sorted by expert, one matrix product per projection over all
experts (`torch.nn.functional.grouped_mm` where the installed torch has it for the device and dtype, else the
Triton kernel of `triton_grouped.py`), outputs weighted and summed back. No Python loop over experts.

Weights are stored stacked, in transformers' own layout: gate_up [E, 2I, H] (gate rows then up rows) and
down [E, H, I]. `expert_loop` is the reference every path is tested against.

Both are declared as matmul weights (`slimtrain.modules.quantizable`): a weight-transforming plugin (QAT) installs
a transform that the forward applies to them before the products, whichever computation runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtrain.modules.quantizable import WeightTransformHost

from .router import Routing
from .triton_grouped import triton_available, triton_grouped_mm


IMPLS = ("auto", "grouped_mm", "triton", "loop")


def grouped_mm_available(x: torch.Tensor, *inner: int) -> bool:
    """Whether torch's grouped GEMM can run here: it exists, the device and dtype have a kernel (CUDA: bf16
    only), and every inner dimension is 16-byte aligned."""
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None or (x.is_cuda and x.dtype != torch.bfloat16):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # torch 2.13's meta kernel, which compile traces with, takes bf16 only
    return all(d * x.element_size() % 16 == 0 for d in inner)


def choose_impl(x: torch.Tensor, hidden: int, inter: int, wanted: str = "auto") -> str:
    """The expert computation for `x`: `wanted`, or under "auto" torch's grouped GEMM where it runs, else the
    Triton kernel where it runs (CUDA), else the per-expert loop. Asking for one that cannot run here is
    an error naming the one that can."""
    runs = {"grouped_mm": grouped_mm_available(x, hidden, inter), "triton": triton_available(x), "loop": True}
    if wanted == "auto":
        return next(impl for impl, ok in runs.items() if ok and not (impl == "triton" and not x.is_cuda))
    if not runs[wanted]:
        raise ValueError(f"experts_impl={wanted!r} cannot run on {x.device.type} {x.dtype} with hidden {hidden} "
                         f"and expert width {inter}; use experts_impl: auto")
    return wanted


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, impl: str = "grouped_mm") -> torch.Tensor:
    if impl == "triton":
        return triton_grouped_mm(a, b, offs)
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


class GroupedExperts(WeightTransformHost, nn.Module):
    """E SwiGLU experts of hidden width `intermediate` on `hidden`-wide inputs (`QuantizableWeights`: gate_up and
    down are its matmul weights, input features last; code that computes with them reads `transformed_weight`)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, impl: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.intermediate, self.impl = num_experts, intermediate, impl
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def matmul_weights(self) -> dict[str, nn.Parameter]:
        """gate_up [E, 2I, H] and down [E, H, I]: one Linear weight [out, in] per expert."""
        return {"gate_up": self.gate_up, "down": self.down}

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [T, H] -> sum over each token's chosen experts of weight x expert(x), [T, H]."""
        inter = self.intermediate
        gate_up, down = self.transformed_weight("gate_up"), self.transformed_weight("down")
        impl = choose_impl(x, x.shape[-1], inter, self.impl) if x.dtype == gate_up.dtype else "loop"
        if impl == "loop":
            return expert_loop(x, routing, gate_up, down)
        k = routing.experts.shape[-1]
        flat = routing.experts.reshape(-1)
        order = flat.argsort(stable=True)  # rows grouped by expert, in token order within each
        token = order // k
        offs = torch.bincount(flat, minlength=self.num_experts + 1)[:self.num_experts].cumsum(0).to(torch.int32)
        if impl == "grouped_mm":
            # A dropped slot's expert is the sentinel E, sorted last. torch leaves rows past offs[-1]
            # uninitialised (forward and backward), so the last expert takes them: their weight is 0, so is
            # their share. (The Triton kernel gives those rows zeros and skips them.)
            offs[-1] = flat.numel()
        y = sorted_swiglu(x[token], offs, gate_up, down, impl)
        y = y * routing.weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y)


def sorted_swiglu(rows: torch.Tensor, offs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  impl: str) -> torch.Tensor:
    """SwiGLU experts on rows sorted by expert (rows offs[e-1]:offs[e] through expert e, int32 cumulative
    offs) as one grouped GEMM per projection; unweighted [N, H]. `impl`: "grouped_mm" or "triton"."""
    gate, up = _grouped_mm(rows, gate_up.transpose(1, 2), offs, impl).split(down.shape[-1], dim=-1)
    return _grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs, impl)


def expert_loop(x: torch.Tensor, routing: Routing, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The reference: every expert on the tokens that chose it, one at a time (a dropped slot, expert E,
    is computed by none)."""
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
