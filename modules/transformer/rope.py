"""Rotary position embedding (RoPE), in the "rotate half" layout that HF Llama checkpoints use."""

from __future__ import annotations

import torch


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [B, S, 1, head_dim] for `position_ids` [B, S], cast to `dtype`.

    The angles are computed in fp32 on the fly (no cached table): position * frequency loses
    precision in bf16 at long positions, and a buffer would be cast to bf16 by `model.to(bf16)`.
    """
    device = position_ids.device
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [head_dim / 2]
    angles = position_ids.float()[..., None] * inv_freq  # [B, S, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [B, S, heads, head_dim] by the angles in cos/sin [B, S, 1, head_dim]."""
    return x * cos + _rotate_half(x) * sin
