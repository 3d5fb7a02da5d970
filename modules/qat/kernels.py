"""Triton kernels: fused fake-quant forward (scale + quantize + dequantize in one pass) and the clipped-STE
backward (recomputes the in-range mask from x, so no mask is kept between forward and backward).

Covered: integer groups (symmetric and asymmetric; a "group" may be a whole row: per-channel weights,
per-token activations), MXFP4, NVFP4 and ternary. Each program handles BLOCK_N groups of G contiguous
elements. Every result equals `reference.fake_quant_reference` bit for bit: the same fp32 operations in
the same order, round-half-to-even by the 1.5 * 2**23 trick (exact for |v| < 2**22, which every rounded
value here is), and power-of-two scales assembled from exponent bits as `frexp` gives them.
Tests run them on CPU under TRITON_INTERPRET=1; on CUDA they are the default (`kernels: auto`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .config import QuantSpec
from .formats import int_range, nvfp4_global_scale

MODE_INT_SYM, MODE_INT_ASYM, MODE_MXFP4, MODE_NVFP4, MODE_TERNARY = 0, 1, 2, 3, 4
_RINT = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds an fp32 to the nearest integer, ties to even
_TINY = 1.1754943508222875e-38
MAX_GROUP = 16384


@triton.jit
def _div(a, b):
    # IEEE round-to-nearest division, as torch does it: plain `/` on fp32 compiles to an approximate
    # division on NVIDIA GPUs, which moves scales by an ulp and breaks bit-equality with the reference.
    return tl.math.div_rn(a, b + tl.zeros_like(a))  # b broadcast (or a constant made a tensor) to a's shape


@triton.jit
def _rint(v):
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _floor_log2(a):
    """Unbiased exponent of a non-negative fp32 (-127 for zero and subnormals)."""
    return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _pow2(e):
    """2**e for integer e in [-127, 127] (2**-127 is the one subnormal needed: E8M0's smallest scale)."""
    normal = ((e + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(e >= -126, normal, tl.full(e.shape, 0x00400000, tl.int32).to(tl.float32, bitcast=True))


@triton.jit
def _round_fp4(v):
    a = tl.abs(v)
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    q = _rint(_div(a, step)) * step
    return tl.where(v < 0, -q, q)


@triton.jit
def _round_e4m3(a):
    """Nearest E4M3 value of 0 <= a <= 448 (3 mantissa bits; subnormal spacing 2**-9), ties to even."""
    e = tl.maximum(_floor_log2(a), -6)
    step = _pow2(e - 3)
    return _rint(_div(a, step)) * step


@triton.jit
def _scales(x, tscale, MODE: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """(effective scale, zero point, lowest, highest) of each group (row) of x [BLOCK_N, BLOCK_G]."""
    zp = tl.zeros([x.shape[0]], dtype=tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    if MODE == 0:
        s = tl.maximum(_div(amax, QMAX * 1.0), 1.1754943508222875e-38)
        lo, hi = QMIN * 1.0, QMAX * 1.0
    elif MODE == 1:
        mn = tl.minimum(tl.min(x, axis=1), 0.0)
        mx = tl.maximum(tl.max(x, axis=1), 0.0)
        s = tl.maximum(_div(mx - mn, (QMAX - QMIN) * 1.0), 1.1754943508222875e-38)
        zp = tl.minimum(tl.maximum(_rint(QMIN - _div(mn, s)), QMIN * 1.0), QMAX * 1.0)
        lo, hi = QMIN * 1.0, QMAX * 1.0
    elif MODE == 2:
        s = _pow2(tl.minimum(tl.maximum(_floor_log2(amax) - 2, -127), 127))
        lo, hi = -6.0, 6.0
    elif MODE == 3:
        s = _div(_round_e4m3(tl.minimum(_div(tscale * amax, 6.0), 448.0)), tscale)
        lo, hi = -6.0, 6.0
    else:
        s = tl.zeros([x.shape[0]], dtype=tl.float32) + tscale
        lo, hi = -1.0, 1.0
    return s, zp, lo, hi


@triton.jit
def _fq_fwd_kernel(x_ptr, y_ptr, tscale_ptr, n_groups, G, MODE: tl.constexpr, QMIN: tl.constexpr,
                   QMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_G)
    inside = (rows[:, None] < n_groups) & (cols[None, :] < G)
    offs = rows[:, None].to(tl.int64) * G + cols[None, :]
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tscale = tl.load(tscale_ptr)
    s, zp, lo, hi = _scales(x, tscale, MODE, QMIN, QMAX)
    safe = tl.where(s > 0, s, 1.0)
    v = _div(x, safe[:, None]) + zp[:, None]
    c = tl.minimum(tl.maximum(v, lo), hi)
    if MODE == 2 or MODE == 3:
        q = _round_fp4(c)
    else:
        q = _rint(c)
    y = (q - zp[:, None]) * s[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _fq_bwd_kernel(g_ptr, x_ptr, gx_ptr, tscale_ptr, n_groups, G, MODE: tl.constexpr, QMIN: tl.constexpr,
                   QMAX: tl.constexpr, MARGIN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_G)
    inside = (rows[:, None] < n_groups) & (cols[None, :] < G)
    offs = rows[:, None].to(tl.int64) * G + cols[None, :]
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tscale = tl.load(tscale_ptr)
    s, zp, lo, hi = _scales(x, tscale, MODE, QMIN, QMAX)
    safe = tl.where(s > 0, s, 1.0)
    v = _div(x, safe[:, None]) + zp[:, None]
    keep = (v >= lo - MARGIN) & (v <= hi + MARGIN)
    g = tl.load(g_ptr + offs, mask=inside, other=0.0)
    tl.store(gx_ptr + offs, tl.where(keep, g, 0.0).to(gx_ptr.dtype.element_ty), mask=inside)


@functools.lru_cache(maxsize=None)
def _one(device: torch.device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)  # allocated once: launches are per layer per step


def _mode(x: torch.Tensor, spec: QuantSpec) -> tuple[int, int, int, int]:
    """(mode, group length, qmin, qmax) of `spec` for x: everything the kernels take but the tensor scale."""
    fmt, g = spec.format, spec.resolved_granularity
    size = x.shape[-1] if g in ("channel", "token", "tensor") else spec.resolved_group_size
    if fmt == "ternary":
        return MODE_TERNARY, size, -1, 1
    if fmt == "mxfp4":
        return MODE_MXFP4, size, 0, 0
    if fmt == "nvfp4":
        return MODE_NVFP4, size, 0, 0
    if fmt == "int" and g in ("group", "channel", "token"):
        qmin, qmax = int_range(spec.bits, spec.symmetric)
        return (MODE_INT_SYM if spec.symmetric else MODE_INT_ASYM), size, qmin, qmax
    raise ValueError(f"no Triton kernel for format {fmt!r} with granularity {g!r}; use kernels: torch or auto")


def _tensor_scale(x: torch.Tensor, mode: int) -> torch.Tensor:
    """The tensor-level scale of the forward (ternary absmean, NVFP4 global scale; 1 otherwise). The backward
    gets it from the forward: it reads the whole tensor, and recomputing it would double that cost."""
    if mode == MODE_TERNARY:
        return x.detach().float().reshape(1, -1).abs().mean(-1).clamp(min=1e-5)
    if mode == MODE_NVFP4:
        lo, hi = torch.aminmax(x.detach())  # no |x| temporary; max is exact whichever way it is taken
        return nvfp4_global_scale(torch.maximum(-lo, hi).float())
    return _one(x.device)


def _launch_shape(n_groups: int, size: int) -> tuple[int, int, tuple[int]]:
    if size > MAX_GROUP:
        raise ValueError(f"groups of {size} elements exceed the kernel's {MAX_GROUP}; use kernels: torch")
    block_g = triton.next_power_of_2(size)
    block_n = max(1, min(64, 4096 // block_g))
    return block_n, block_g, (triton.cdiv(n_groups, block_n),)


def fake_quant_forward(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized x in x's dtype, the tensor-level scale the kernel used) for a supported spec."""
    mode, size, qmin, qmax = _mode(x, spec)
    tscale = _tensor_scale(x, mode)
    xc = x.detach().contiguous()
    y = torch.empty_like(xc)
    n_groups = xc.numel() // size
    block_n, block_g, grid = _launch_shape(n_groups, size)
    _fq_fwd_kernel[grid](xc, y, tscale, n_groups, size, MODE=mode, QMIN=qmin, QMAX=qmax, BLOCK_N=block_n,
                         BLOCK_G=block_g)
    return y.view_as(x), tscale


def fake_quant_backward(grad: torch.Tensor, x: torch.Tensor, spec: QuantSpec, tscale: torch.Tensor) -> torch.Tensor:
    """Clipped-STE gradient: `grad` where x was inside the format's range, 0 where it was clamped."""
    mode, size, qmin, qmax = _mode(x, spec)
    margin = 0.5 if mode in (MODE_INT_SYM, MODE_INT_ASYM, MODE_TERNARY) else 1.0  # see reference.clip_bounds
    xc, gc = x.detach().contiguous(), grad.contiguous()
    gx = torch.empty_like(gc)
    n_groups = xc.numel() // size
    block_n, block_g, grid = _launch_shape(n_groups, size)
    _fq_bwd_kernel[grid](gc, xc, gx, tscale, n_groups, size, MODE=mode, QMIN=qmin, QMAX=qmax, MARGIN=margin,
                         BLOCK_N=block_n, BLOCK_G=block_g)
    return gx.view_as(grad)
