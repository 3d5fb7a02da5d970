"""Rotary position embedding (RoPE), in the "rotate half" layout that HF Llama checkpoints use, with the frequency
scalings transformers defines (linear, dynamic NTK, YaRN, Llama 3.1): same inverse frequencies, same attention
factor, so that an imported checkpoint computes what it computed there."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import ModelConfig, RopeScaling


def rope_for(cfg: "ModelConfig", position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the model `cfg` (its head width, theta and scaling) for `position_ids` [B, S]."""
    return rope_cos_sin(position_ids, cfg.dim_per_head, cfg.rope_theta, dtype, cfg.rope_scaling, cfg.max_seq_len)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
    scaling: "RopeScaling | None" = None, max_seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [B, S, 1, head_dim] for `position_ids` [B, S], cast to `dtype`.

    The angles are computed in fp32 on the fly (no cached table): position * frequency loses
    precision in bf16 at long positions, and a buffer would be cast to bf16 by `model.to(bf16)`.
    `max_seq_len`: the context the dynamic scaling starts to grow past (transformers' max_position_embeddings).
    """
    device = position_ids.device
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    factor = 1.0
    if scaling is None:
        inv_freq = 1.0 / (theta**exponents)  # [head_dim / 2]
    else:
        inv_freq, factor = scaled_inv_freq(exponents, theta, scaling, head_dim, position_ids, max_seq_len)
    angles = position_ids.float()[..., None] * inv_freq  # [B, S, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    if factor == 1.0:
        return angles.cos().to(dtype), angles.sin().to(dtype)
    return (angles.cos() * factor).to(dtype), (angles.sin() * factor).to(dtype)


def scaled_inv_freq(exponents: torch.Tensor, theta: float, scaling: "RopeScaling", head_dim: int,
                    position_ids: torch.Tensor, max_seq_len: int | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2], attention factor) of a scaled RoPE, by transformers' formulas."""
    if scaling.type == "linear":
        return 1.0 / (theta**exponents) / scaling.factor, 1.0
    if scaling.type == "dynamic":
        if max_seq_len is None:
            raise ValueError("dynamic RoPE scaling needs the model's max_seq_len")
        # transformers grows the base once a forward's positions pass max_position_embeddings (a host sync: dynamic only)
        seq_len = max(int(position_ids.max()) + 1, max_seq_len) if position_ids.numel() else max_seq_len
        base = theta * ((scaling.factor * seq_len / max_seq_len) - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (base**exponents), 1.0
    if scaling.type == "llama3":
        return _llama3(1.0 / (theta**exponents), scaling), 1.0
    return _yarn(exponents, theta, scaling, head_dim)


def _llama3(inv_freq: torch.Tensor, s: "RopeScaling") -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by the factor, short ones kept, a smooth blend between."""
    old = s.original_max_seq_len
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(exponents: torch.Tensor, theta: float, s: "RopeScaling", head_dim: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolated frequencies below the correction range, extrapolated above it, a linear ramp between."""
    factor = s.factor
    attention = s.attention_factor
    if attention is None:
        attention = (_yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
                     if s.mscale and s.mscale_all_dim else _yarn_mscale(factor))

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=exponents.device) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta**exponents
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, S, heads, head_dim] by the angles in cos/sin [B, S, 1, head_dim]."""
    return x * cos + _rotate_half(x) * sin
