"""Tiny base models and heads for the draft tests (fp64 where decoding is compared: no near-ties in argmax), and
tests/trainer's helpers (train_helpers: `slimtrain train` run as a user runs it)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

from slimtrain.modules.transformer import ModelConfig, Transformer

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
            max_seq_len=256)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> Transformer:
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    model.init_weights(seed)
    return model.to(dtype).eval()


def randomise(module: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Every parameter drawn at random (heads that draft something other than the identity start)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
    return module
