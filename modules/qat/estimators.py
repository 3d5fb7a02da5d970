"""Gradient estimators through rounding: STE, clipped STE and LSQ (learned step size).

STE and clipped STE are autograd Functions whose forward is the fake quantizer (Triton kernel or the
PyTorch reference) and whose backward passes the gradient straight through (clipped: only where the
value was inside the format's range). LSQ differentiates the quantizer itself with respect to a learned
step, with the rounding made straight-through and the step's gradient scaled by 1/sqrt(N * qmax).
"""

from __future__ import annotations

import math

import torch

from .config import QuantSpec
from .formats import int_range
from .reference import QParams, compute_qparams, fake_quant_reference, quantize_blocks, to_blocks


class _StraightThrough(torch.autograd.Function):
    """Fake-quantize with dynamic scales; backward is identity (STE) or masked by the in-range test."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: QuantSpec, clipped: bool, use_kernel: bool) -> torch.Tensor:
        ctx.clipped, ctx.use_kernel, ctx.spec = clipped, use_kernel, spec
        if use_kernel:
            from . import kernels

            y, tensor_scale = kernels.fake_quant_forward(x, spec)
            if clipped:  # the backward kernel recomputes the mask from x: no mask kept in memory
                ctx.save_for_backward(x, tensor_scale)
            return y
        y, mask, _ = fake_quant_reference(x, spec)
        if clipped:
            ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.clipped:
            return grad, None, None, None
        if ctx.use_kernel:
            from . import kernels

            x, tensor_scale = ctx.saved_tensors
            return kernels.fake_quant_backward(grad, x, ctx.spec, tensor_scale), None, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None


def fake_quant_ste(x: torch.Tensor, spec: QuantSpec, clipped: bool = False, use_kernel: bool = False) -> torch.Tensor:
    """Fake-quantized `x` (dynamic scales) with a straight-through gradient."""
    return _StraightThrough.apply(x, spec, clipped, use_kernel)


class _RoundSTE(torch.autograd.Function):
    """torch.round forward, identity backward (a custom Function so the forward is exactly round(v))."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient multiplied by `factor` (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def lsq_grad_scale(spec: QuantSpec, elements_per_step: int) -> float:
    """LSQ's g = 1 / sqrt(N * Q_p): N elements share a step, Q_p is the grid's largest level."""
    return 1.0 / math.sqrt(elements_per_step * int_range(spec.bits, True)[1])


def lsq_init_step(w: torch.Tensor, spec: QuantSpec, method: str = "absmax") -> torch.Tensor:
    """The initial step per scale group (blocked layout). absmax: round-to-nearest's own scale (max|w| / Q_p,
    the same tensor `compute_qparams` gives, so the first quantized forward equals RTN PTQ bit for bit);
    mean: LSQ's 2 * mean|w| / sqrt(Q_p)."""
    if method == "absmax":
        return compute_qparams(w.detach(), spec).scale
    blocks, _ = to_blocks(w.detach().float(), spec)
    qmax = int_range(spec.bits, True)[1]
    return (2 * blocks.abs().mean(-1) / math.sqrt(qmax)).clamp(min=1e-8)


def lsq_step(base: torch.Tensor, gain: torch.Tensor, lr_scale: float = 1.0) -> torch.Tensor:
    """The learned step: the calibrated `base` (blocked layout) times the trained 1-D `gain` seen through
    `lr_scale` (gain 1 + lr_scale x (gain - 1): Adam's ~lr update of the gain moves the step lr_scale times as far)."""
    gain = gain.view_as(base)
    if lr_scale != 1.0:
        gain = 1.0 + lr_scale * (gain - 1.0)
    return base * gain


def fake_quant_lsq(w: torch.Tensor, spec: QuantSpec, step: torch.Tensor) -> torch.Tensor:
    """LSQ fake quantization of `w` with the learned `step` (blocked layout, differentiable)."""
    blocks, restore = to_blocks(w.float(), spec)
    step = _ScaleGrad.apply(step, lsq_grad_scale(spec, blocks.shape[-1]))
    y, _ = quantize_blocks(blocks, step, None, spec, round_fn=_RoundSTE.apply)
    return restore(y).to(w.dtype)


def weight_qparams(w: torch.Tensor, spec: QuantSpec, step: torch.Tensor | None) -> QParams:
    """The parameters the forward used for `w`: the learned step under LSQ, else from w's statistics."""
    return QParams(step.detach().float()) if step is not None else compute_qparams(w, spec)
