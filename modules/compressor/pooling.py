"""Span pooling: ARC-Encoder's mean-pooled queries and ICAE's memory tokens.

Mean pooling (ARC-Encoder's `mean_pooled_queries`, `where: before`). Each span is cut into groups of consecutive
tokens, never across spans: groups of `factor` tokens with the last one shorter (ceil(n / factor) groups), or
`count` near-equal groups (min(n, count) of them, the first n % k one token longer). A block-diagonal averaging
matrix P [G, L] per span (P[j, t] = 1 / |group j| for t in group j) turns the residual stream x into the pooled
stream P @ x. A pooled layer is a decoder block whose queries come from the pooled stream and whose keys and
values come from the span's un-pooled tokens:

    p' = p + o_proj(attn(q = q_proj(norm(p)) at positions 0 .. G-1,  k, v = k/v_proj(norm(x)) at 0 .. L-1))
    p'' = p' + mlp(post_attn_norm(p'))

The projections are the block's own modules, so their biases (Qwen2's q/k/v) come with them, and q and k pass through
the block's q/k norms before RoPE where it has them (Qwen3), exactly as in `Attention.forward`.

Positions: pooled query j takes RoPE position j (ARC re-indexes the pooled queries 0 .. n/PF - 1; the keys keep
their token positions 0 .. n-1). We follow ARC rather than placing a query at its group's centre: it is the setting
the published numbers come from, and with a frozen decoder the encoder learns whichever offsets it is given.
The residual carries the pooled stream (ARC pools the block's input, before its norm), so with factor 1 a pooled
layer is exactly the plain block.

With several pooled layers (ARC's released encoders pool in one), each pooled layer reads the keys and values of
the un-pooled token stream at its own depth: the token stream keeps running through those layers (all but the
last, whose token output nobody reads), and the pooled stream rides beside it. The factor then stays the total
compression, where pooling the stream again at every layer would compound it.

Memory tokens (ICAE): M learned embeddings put after each span's tokens (positions n .. n+M-1), attending and
attended to within the span like its tokens; the last layer's states at those slots are the span's vectors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from slimtrain.modules.transformer.layers import Aux, DecoderBlock, with_aux
from slimtrain.modules.transformer.rope import apply_rope

from .attention import SpanAttention


def group_ids(lengths: torch.Tensor, width: int, *, factor: int | None = None,
              count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups [N, width] long: each token's group within its span, -1 on padding; groups per span [N]).

    Give exactly one of `factor` (groups of `factor` tokens, the last shorter) and `count` (min(n, count)
    near-equal groups, the first n % k one longer: ARC's split for a positive compression rate).
    """
    if (factor is None) == (count is None):
        raise ValueError("give exactly one of factor and count")
    t = torch.arange(width, device=lengths.device)[None, :]
    if factor is not None:
        groups = (t // factor).expand(lengths.shape[0], -1)
        num = (lengths + factor - 1) // factor
    else:
        num = lengths.clamp(max=count)
        base, extra = (lengths // num)[:, None], (lengths % num)[:, None]
        boundary = extra * (base + 1)  # the first `extra` groups hold base + 1 tokens, the others base
        groups = torch.where(t < boundary, t // (base + 1), extra + (t - boundary) // base)
    return torch.where(t < lengths[:, None], groups, -1), num


def max_groups(width: int, *, factor: int | None = None, count: int | None = None) -> int:
    """Groups of the longest span (`width` tokens): the pooled stream's length, known without reading the device."""
    return -(-width // factor) if factor is not None else min(width, count)


def pooling_matrix(groups: torch.Tensor, num_groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, num_groups, L]: row j averages the tokens of group j (an all-zero row for a group a span lacks)."""
    member = groups[:, None, :] == torch.arange(num_groups, device=groups.device)[None, :, None]
    member = member.to(dtype)
    return member / member.sum(-1, keepdim=True).clamp(min=1)


def pooled_query_block(block: DecoderBlock, tokens: torch.Tensor, pooled: torch.Tensor,
                       rope_k: tuple[torch.Tensor, torch.Tensor], rope_q: tuple[torch.Tensor, torch.Tensor],
                       attend: SpanAttention) -> tuple[torch.Tensor, Aux]:
    """One decoder block run with pooled queries: the new pooled stream [N, G, H] (see the module docstring).

    tokens [N, L, H]: the un-pooled residual stream entering the block (keys and values, at RoPE `rope_k`);
    pooled [N, G, H]: the pooled residual stream entering it (queries and residual, at RoPE `rope_q`).
    Uses the block's own modules (a plugin's swapped linears included) and honours its activation checkpointing.
    """
    if block.recompute and torch.is_grad_enabled():
        return checkpoint(_pooled_query_block, block, tokens, pooled, rope_k, rope_q, attend, use_reentrant=False)
    return _pooled_query_block(block, tokens, pooled, rope_k, rope_q, attend)


def _pooled_query_block(block: DecoderBlock, tokens: torch.Tensor, pooled: torch.Tensor,
                        rope_k: tuple[torch.Tensor, torch.Tensor], rope_q: tuple[torch.Tensor, torch.Tensor],
                        attend: SpanAttention) -> tuple[torch.Tensor, Aux]:
    attn = block.attn
    (n, g, _), length = pooled.shape, tokens.shape[1]
    kv_in = block.input_norm(tokens)
    q = attn.q_proj(block.input_norm(pooled)).view(n, g, -1, attn.head_dim)
    k = attn.k_proj(kv_in).view(n, length, -1, attn.head_dim)
    v = attn.v_proj(kv_in).view(n, length, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3's per-head norms, before RoPE as `Attention.forward` applies them
        q, k = attn.q_norm(q), attn.k_norm(k)
    out = attend(apply_rope(q, *rope_q), apply_rope(k, *rope_k), v)
    x = pooled + attn.o_proj(out.reshape(n, g, -1))
    out, aux = with_aux(block.mlp(block.post_attn_norm(x)), {})
    return x + out, aux


class MemoryTokens(nn.Module):
    """ICAE's memory tokens: `embed` [M, H] learned embeddings appended to every span and read back out."""

    def __init__(self, count: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(count, width)  # an Embedding, so the model's init draws it like token embeddings

    @property
    def count(self) -> int:
        return self.embed.num_embeddings

    def append(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[N, L + M, H]: span i's M memory tokens in slots lengths[i] .. lengths[i] + M - 1, after its tokens.

        Slot index = RoPE position, so the memory tokens continue the span's positions. What lies after them is
        padding (x's own padding, or zeros)."""
        n, length, width = x.shape
        out = torch.cat([x, x.new_zeros(n, self.count, width)], dim=1)
        slots = self.slots(lengths)[..., None].expand(-1, -1, width)
        return out.scatter(1, slots, self.embed.weight.to(x.dtype).expand(n, -1, -1))

    def read(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[N, M, H]: the states at each span's memory slots."""
        return x.gather(1, self.slots(lengths)[..., None].expand(-1, -1, x.shape[-1]))

    def slots(self, lengths: torch.Tensor) -> torch.Tensor:
        """[N, M]: where span i's memory tokens sit."""
        return lengths[:, None] + torch.arange(self.count, device=lengths.device)[None, :]
