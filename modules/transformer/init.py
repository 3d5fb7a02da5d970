"""Weight initialisation: normal(0, init_std), residual output projections scaled down, norms at 1."""

from __future__ import annotations

import math
from typing import Collection

import torch
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm
from .sharding import shard_of

# Projections that write into the residual stream: scaled by 1/sqrt(2 * num_layers) so that the
# residual's variance does not grow with depth (GPT-2's rule).
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def _normal_(weight: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    if weight.is_meta:  # built on the meta device: the caller initialises after materialising
        return
    # Drawn on the CPU in fp32, then copied: the same seed gives the same weights on any device
    # and in any parameter dtype. A tensor-parallel slice draws the whole tensor and keeps its slice, so that a
    # sharded model starts from the single-device weights.
    shard = shard_of(weight)
    shape = weight.shape if shard is None else shard.full_shape
    sample = torch.empty(shape, dtype=torch.float32, device="cpu").normal_(0.0, std, generator=generator)
    weight.copy_(sample if shard is None else shard.take(sample))


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int | None = None,
                 only: Collection[str] | None = None) -> None:
    """Initialise every Linear, Embedding and RMSNorm of `model`, in module order.

    With `seed`, a private generator is used (bitwise reproducible, global RNG untouched); without
    it, torch's default CPU generator (reproducible given torch.manual_seed). `only`: initialise just the
    modules whose weight has one of these names (the dense model's, where plugins added modules: those
    draw nothing here, so the dense weights are the same whatever a plugin inserted between them).
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    residual_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    seen: set[int] = set()  # a tied weight is drawn once
    for name, module in model.named_modules():
        if only is not None and f"{name}.weight" not in only:
            continue
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif _dense_like(module) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            std = residual_std if name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS else cfg.init_std
            _normal_(module.weight, std, generator)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()


def _dense_like(module: nn.Module) -> bool:
    """A Linear or Embedding, or a backend's parallel version of one (`init_like_dense = True`): drawn alike."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or getattr(module, "init_like_dense", False)
