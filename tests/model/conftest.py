"""Tiny model factories shared by the model tests (hidden 64, 2 layers: fast on 2 CPU cores)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from slimtrain.modules.transformer import ModelConfig, Transformer

TINY: dict[str, Any] = dict(
    vocab_size=123, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128
)


@pytest.fixture
def make_config() -> Callable[..., ModelConfig]:
    """make_config(**overrides) -> the tiny config with `overrides` applied."""
    return lambda **overrides: ModelConfig(**{**TINY, **overrides})


@pytest.fixture
def make_model() -> Callable[..., Transformer]:
    """make_model(seed=0, **config_overrides) -> a tiny fp32 Transformer in eval mode."""

    def make(seed: int = 0, **overrides: Any) -> Transformer:
        model = Transformer(ModelConfig(**{**TINY, **overrides}))
        model.init_weights(seed)
        return model.eval()

    return make


def packed_layout(lengths: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc_ids, position_ids) [S] for documents of `lengths` packed in one row, padding after."""
    doc_ids = torch.full((seq_len,), -1, dtype=torch.long)
    position_ids = torch.zeros(seq_len, dtype=torch.long)
    start = 0
    for doc, n in enumerate(lengths):
        doc_ids[start : start + n] = doc
        position_ids[start : start + n] = torch.arange(n)
        start += n
    return doc_ids, position_ids


@pytest.fixture
def packed() -> Callable[[list[int], int], tuple[torch.Tensor, torch.Tensor]]:
    """packed(lengths, seq_len) -> (doc_ids, position_ids) for one row."""
    return packed_layout
