"""An independent encoder for the compressor tests: one span at a time, no masks, no batching, explicit groups.

It reuses the blocks' weights and the model's RMSNorm, MLP and RoPE functions (not under test), and writes out
again what the compressor's own code decides: the attention (plain softmax over the whole span), the layout, the
groups and their means, the pooled queries' positions, the memory tokens' slots.
"""

from __future__ import annotations

import math

import torch

from slimtrain.modules.compressor import SpanEncoder
from slimtrain.modules.transformer.rope import apply_rope, rope_cos_sin


def factor_groups(n: int, factor: int) -> list[list[int]]:
    """Consecutive groups of `factor` tokens, the last one shorter."""
    return [list(range(start, min(start + factor, n))) for start in range(0, n, factor)]


def count_groups(n: int, count: int) -> list[list[int]]:
    """min(n, count) consecutive groups, the first n % k one token longer than the others."""
    k = min(n, count)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    starts = [sum(sizes[:i]) for i in range(k)]
    return [list(range(s, s + size)) for s, size in zip(starts, sizes)]


def _rope(x: torch.Tensor, positions: torch.Tensor, encoder: SpanEncoder) -> torch.Tensor:
    cfg = encoder.model_cfg
    cos, sin = rope_cos_sin(positions[None], cfg.dim_per_head, cfg.rope_theta, x.dtype)
    return apply_rope(x[None], cos, sin)[0]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [Lq, heads, D] over every key of k, v [Lk, kv_heads, D] (query head h reads kv head h // groups)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def block(encoder: SpanEncoder, index: int, x_q: torch.Tensor, x_kv: torch.Tensor, pos_q: torch.Tensor,
          pos_kv: torch.Tensor) -> torch.Tensor:
    """Block `index` with queries (and the residual) from x_q and keys/values from x_kv, all of one span."""
    layer = encoder.layers[index]
    attn, d = layer.attn, layer.attn.head_dim
    hq, hkv = layer.input_norm(x_q), layer.input_norm(x_kv)
    q = _rope(attn.q_proj(hq).view(len(x_q), -1, d), pos_q, encoder)
    k = _rope(attn.k_proj(hkv).view(len(x_kv), -1, d), pos_kv, encoder)
    v = attn.v_proj(hkv).view(len(x_kv), -1, d)
    x = x_q + attn.o_proj(_attention(q, k, v).reshape(len(x_q), -1))
    return x + layer.mlp(layer.post_attn_norm(x))


def encode_span(encoder: SpanEncoder, tokens: list[int], groups: list[list[int]] | None = None) -> torch.Tensor:
    """The vectors of one span: [len(groups), H] for mean pooling, [M, H] for memory pooling."""
    cfg = encoder.cfg
    x = encoder.embed.weight[torch.tensor(tokens)]
    n = len(tokens)
    if encoder.memory is not None:
        x = torch.cat([x, encoder.memory.embed.weight])  # positions n .. n+M-1, after the span
    pos = torch.arange(len(x))
    pooled_layers = 0 if encoder.memory is not None else cfg.pooled_layers
    first_pooled = len(encoder.layers) - pooled_layers
    for i in range(first_pooled):
        x = block(encoder, i, x, x, pos, pos)
    if encoder.memory is not None:
        out = x[n:]
    else:
        p = torch.stack([x[g].mean(0) for g in groups])
        pos_q = torch.arange(len(groups))  # pooled query j at position j
        for i in range(first_pooled, len(encoder.layers)):
            p, x = block(encoder, i, p, x, pos_q, pos), block(encoder, i, x, x, pos, pos)
        out = p
    return out if encoder.norm is None else encoder.norm(out)


def encode_tokens(encoder: SpanEncoder, tokens: list[int]) -> torch.Tensor:
    """Every token's state after every layer, no pooling."""
    x = encoder.embed.weight[torch.tensor(tokens)]
    pos = torch.arange(len(x))
    for i in range(len(encoder.layers)):
        x = block(encoder, i, x, x, pos, pos)
    return x if encoder.norm is None else encoder.norm(x)
