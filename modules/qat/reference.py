"""Fake quantization in plain PyTorch: the reference every Triton kernel is tested against.

A tensor is viewed as blocks that share one scale (`to_blocks`: [..., n_scales..., elements]); the
scale tensor has the block view's shape without the element axis, which is the layout
compressed-tensors stores (`weight_scale`: [1] per tensor, [out, 1] per channel, [out, in/g] per group,
[out/B, in/B] per tile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import QuantSpec
from .formats import (TINY, element_max, int_range, mx_scale, nvfp4_block_scale, nvfp4_global_scale,
                      round_to_element)


@dataclass
class QParams:
    """A quantizer's parameters for one tensor.

    scale: float32 (nvfp4: float8_e4m3fn block scales), blocked layout (see module docstring).
    zero_point: integer-valued float32, same shape as scale (asymmetric int only).
    global_scale: float32 [1] (nvfp4 only); the effective scale is scale / global_scale.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    def effective_scale(self) -> torch.Tensor:
        """The fp32 factor the element value is multiplied by."""
        if self.global_scale is None:
            return self.scale
        return self.scale.float() / self.global_scale


def to_blocks(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """x viewed as [..., n_scales..., elements] plus the function that undoes the view."""
    g, size, shape = spec.resolved_granularity, spec.resolved_group_size, x.shape
    if g == "tensor":
        return x.reshape(1, -1), lambda y: y.reshape(shape)
    if g in ("channel", "token"):
        return x.unsqueeze(-2), lambda y: y.squeeze(-2)
    if g == "group":
        return x.unflatten(-1, (shape[-1] // size, size)), lambda y: y.flatten(-2)
    out, cols = shape  # block: 2-D tiles of a weight
    tiles = x.reshape(out // size, size, cols // size, size).transpose(1, 2).flatten(-2)
    return tiles, lambda y: y.unflatten(-1, (size, size)).transpose(1, 2).reshape(shape)


def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    # Divide by a same-shaped tensor, not a Python scalar: on CUDA torch turns division by a scalar into
    # multiplication by its reciprocal, which is an ulp off IEEE division (the kernels divide exactly).
    return a / torch.full_like(a, b)


@torch.no_grad()
def compute_qparams(x: torch.Tensor, spec: QuantSpec) -> QParams:
    """Scales (and zero points) for `x` from its statistics: absmax, min/max, or absmean (ternary)."""
    blocks, _ = to_blocks(x.float(), spec)
    fmt = spec.format
    if fmt == "ternary":
        return QParams(blocks.abs().mean(-1).clamp(min=1e-5))
    if fmt == "int" and not spec.symmetric:
        qmin, qmax = int_range(spec.bits, False)
        lo, hi = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
        scale = _div(hi - lo, qmax - qmin).clamp(min=TINY)
        return QParams(scale, zero_point=torch.round(qmin - lo / scale).clamp(qmin, qmax))
    amax = blocks.abs().amax(-1)
    if fmt == "int":
        return QParams(_div(amax, int_range(spec.bits, True)[1]).clamp(min=TINY))
    if fmt in ("mxfp4", "mxfp8"):
        return QParams(mx_scale(amax, fmt))
    if fmt == "nvfp4":
        global_scale = nvfp4_global_scale(amax.amax())
        return QParams(nvfp4_block_scale(amax, global_scale), global_scale=global_scale)
    return QParams(_div(amax, element_max(fmt)).clamp(min=TINY))


def element_range(spec: QuantSpec) -> tuple[float, float]:
    """(lowest, highest) scaled value the element grid holds."""
    if spec.format == "ternary":
        return -1.0, 1.0
    if spec.format == "int":
        lo, hi = int_range(spec.bits, spec.symmetric)
        return float(lo), float(hi)
    m = element_max(spec.format)
    return -m, m


# Half the spacing between the two largest values of each float grid: a value up to this far above the
# largest one rounds onto the grid by itself, so clipped STE treats it as "not clipped".
_TOP_HALF_GAP = {"fp8_e4m3": 16.0, "mxfp8": 16.0, "fp8_e5m2": 4096.0, "mxfp4": 1.0, "nvfp4": 1.0}


def clip_bounds(spec: QuantSpec) -> tuple[float, float]:
    """Scaled values outside these bounds are clamped by the quantizer (clipped STE drops their gradient)."""
    lo, hi = element_range(spec)
    margin = 0.5 if spec.format in ("int", "ternary") else _TOP_HALF_GAP[spec.format]
    return lo - margin, hi + margin


def quantize_blocks(blocks: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    spec: QuantSpec, round_fn: Callable[[torch.Tensor], torch.Tensor] = torch.round,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized values, in-range mask) of blocks [..., elements] with scale [...].

    `round_fn` is torch.round normally and a straight-through round under LSQ (where the scale is a
    differentiable input); the arithmetic is the same either way, so the exported weights are too.
    """
    lo, hi = element_range(spec)
    clip_lo, clip_hi = clip_bounds(spec)
    s = scale.unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero NVFP4 block has scale 0
    v = blocks / safe
    if zero_point is not None:
        v = v + zero_point.unsqueeze(-1)
    mask = (v >= clip_lo) & (v <= clip_hi)
    clamped = v.clamp(lo, hi)
    q = round_fn(clamped) if spec.format in ("int", "ternary") else round_to_element(clamped, spec.format)
    if zero_point is not None:
        q = q - zero_point.unsqueeze(-1)
    return q * s, mask


@torch.no_grad()
def fake_quant_reference(x: torch.Tensor, spec: QuantSpec, qparams: QParams | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, QParams]:
    """(fake-quantized x in x's dtype, in-range mask, qparams) — the reference of every kernel."""
    qp = qparams if qparams is not None else compute_qparams(x, spec)
    blocks, restore = to_blocks(x.float(), spec)
    y, mask = quantize_blocks(blocks, qp.effective_scale(), qp.zero_point, spec)
    return restore(y).to(x.dtype), restore(mask), qp
