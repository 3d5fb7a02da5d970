"""Number formats: element grids (integers, FP8, FP4 E2M1) and the rules that pick a scale for a block.

Conventions follow compressed-tensors so that what we pack dequantizes to exactly what we trained:
the value is `q * scale` (integers: `(q - zero_point) * scale`), and NVFP4's fp32 tensor scale
*divides* the E4M3 block scale (`scale / global_scale`).
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
FP8_E5M2_MAX = 57344.0
FP4_E2M1_MAX = 6.0
# Largest exponent of the element format (max = 1.x * 2**emax): the OCP MX shared scale is
# 2**(floor(log2(amax)) - emax), so that the block's largest value lands in the top binade.
MX_ELEMENT_EMAX = {"mxfp4": 2, "mxfp8": 8}
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
TINY = torch.finfo(torch.float32).tiny


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of a signed `bits`-bit integer; the symmetric grid also keeps -2**(bits-1)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def round_fp4_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives), ties to even; |v| <= 6 expected.

    The grid spacing is 0.5 below 2, 1 up to 4 and 2 above: dividing by the local spacing turns it
    into integer rounding, and torch.round is round-half-to-even like the format.
    """
    a = v.abs()
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    return torch.copysign(torch.round(a / step) * step, v)


def round_to_element(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round already-clamped scaled values to the element grid of a float format (fp32 in and out)."""
    if fmt in ("fp8_e4m3", "mxfp8"):
        return v.to(torch.float8_e4m3fn).float()
    if fmt == "fp8_e5m2":
        return v.to(torch.float8_e5m2).float()
    if fmt in ("mxfp4", "nvfp4"):
        return round_fp4_e2m1(v)
    raise ValueError(f"{fmt!r} has no float element grid")


def element_max(fmt: str) -> float:
    """Largest magnitude of the element format."""
    return {"fp8_e4m3": FP8_E4M3_MAX, "mxfp8": FP8_E4M3_MAX, "fp8_e5m2": FP8_E5M2_MAX,
            "mxfp4": FP4_E2M1_MAX, "nvfp4": FP4_E2M1_MAX}[fmt]


def mx_scale(amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """OCP MX shared scale: the power of two 2**(floor(log2(amax)) - emax), within E8M0's range.

    frexp gives floor(log2) exactly (log2 of a float just below a power of two can round up).
    """
    _, exp = torch.frexp(amax)
    e = (exp - 1 - MX_ELEMENT_EMAX[fmt]).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    e = torch.where(amax > 0, e, torch.full_like(e, E8M0_MIN_EXP))
    return torch.ldexp(torch.ones_like(amax), e)


def nvfp4_global_scale(amax_tensor: torch.Tensor) -> torch.Tensor:
    """NVFP4's fp32 tensor scale (compressed-tensors convention): 448 * 6 / amax, 1 for an all-zero tensor."""
    g = (FP8_E4M3_MAX * FP4_E2M1_MAX) / amax_tensor.float()
    return torch.where(amax_tensor > 0, g, torch.ones_like(g)).reshape(1)


def nvfp4_block_scale(amax_block: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """E4M3 block scales (as float8_e4m3fn) such that block amax maps to 6 after `/ (scale / global)`."""
    scaled = global_scale * amax_block
    # a same-shaped divisor: CUDA torch multiplies by the reciprocal of a scalar divisor (not IEEE division)
    return (scaled / torch.full_like(scaled, FP4_E2M1_MAX)).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
