"""Tiny decoders and compressors for the compressor tests (fp64: exact comparisons with the reference).

A uniquely named module rather than conftest.py: `from conftest import` finds whichever conftest pytest loaded
last when several test folders are collected together."""

from __future__ import annotations

from typing import Any

import torch

from slimtrain.modules.compressor import CompressorModelConfig, ContextCompressor
from slimtrain.modules.transformer import ModelConfig, Transformer

# init_std 0.1 rather than 0.02: attention far from uniform, so a wrong mask or position changes the outputs clearly.
TINY: dict[str, Any] = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                            num_kv_heads=2, max_seq_len=64, init_std=0.1)


def tiny_decoder(seed: int = 0, **overrides: Any) -> Transformer:
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    model.init_weights(seed)
    return model.to(torch.float64).eval()


def tiny_compressor(seed: int = 1, decoder: Transformer | None = None, **cfg: Any) -> ContextCompressor:
    """A compressor on a tiny decoder: by default its first 2 layers, PF 3, pooled in the last layer."""
    cfg = {"encoder": {"source": "truncate", "layers": 2}, **cfg}
    return ContextCompressor.from_decoder(CompressorModelConfig(**cfg), decoder or tiny_decoder(), seed=seed).eval()


def packed(spans: list[list[int]], row_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and span_ids [rows, row_len]: spans packed greedily into rows, span i with id i, -1 after."""
    rows: list[list[int]] = [[]]
    for i, span in enumerate(spans):
        if sum(len(spans[j]) for j in rows[-1]) + len(span) > row_len:
            rows.append([])
        rows[-1].append(i)
    ids = torch.full((len(rows), row_len), 7, dtype=torch.long)  # padding holds a real token id on purpose
    span_ids = torch.full((len(rows), row_len), -1, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            ids[r, at:at + len(spans[i])] = torch.tensor(spans[i])
            span_ids[r, at:at + len(spans[i])] = i
            at += len(spans[i])
    return ids, span_ids
