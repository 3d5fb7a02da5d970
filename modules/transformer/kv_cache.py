"""A key/value cache for incremental decoding: prefill the prompt once, then a few tokens per forward.

`Transformer.forward(..., cache=cache)` writes the keys and values of its new tokens at positions
`cache.length ...` of every layer and attends over everything cached so far; the new tokens attend to
each other causally, or along the branches of a token tree (`tree_mask`, for speculative decoding that
verifies several candidate continuations in one forward). A speculative decoder then keeps what the
verification accepted (`truncate`, `keep`) and drops the rest.

Rows hold one document each and no padding: decoding of prompts of one length, or of one prompt.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .attention.base import repeat_kv


class KVCache:
    """The keys and values of `num_layers` attention layers for `batch` rows, up to `max_len` positions.

    keys, values: [num_layers, batch, max_len, kv_heads, head_dim], in the model's compute dtype.
    length: positions filled; the next forward's tokens go to `length ... length + s`.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, batch, max_len, kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_layers(cls, layers: Iterable[nn.Module], batch: int, max_len: int) -> "KVCache":
        """A cache for decoder blocks `layers` (each with an attention `attn` or `self_attn` holding `k_proj` and
        `head_dim`; the projection's width gives the kv heads)."""
        layers = list(layers)
        attn = getattr(layers[0], "attn", None) or layers[0].self_attn
        weight = attn.k_proj.weight
        # The Linear's width, not the weight's shape: ZeRO-3 leaves a partitioned weight empty between forwards.
        kv_heads = getattr(attn.k_proj, "out_features", weight.shape[0]) // attn.head_dim
        return cls(len(layers), batch, max_len, kv_heads, attn.head_dim, weight.dtype, weight.device)

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int | None = None) -> "KVCache":
        """A cache for every layer of `model` (a `Transformer`); `max_len` defaults to `model.max_seq_len`."""
        return cls.for_layers(model.layers, batch, max_len or model.cfg.max_seq_len)

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    def bind(self, new_tokens: int, tree_mask: torch.Tensor | None = None) -> "CachedAttention":
        """The attention of one forward that adds `new_tokens` tokens to the cache.

        tree_mask [new, new] bool: True where new token i may attend new token j (its ancestors and itself,
        in a token tree); None: causal among the new tokens.
        """
        end = self.length + new_tokens
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions and {self.length} are filled: "
                             f"{new_tokens} more do not fit; make the cache longer (max_len) or decode fewer tokens")
        if tree_mask is not None and tuple(tree_mask.shape) != (new_tokens, new_tokens):
            raise ValueError(f"tree_mask must be [{new_tokens}, {new_tokens}] (new tokens x new tokens), got "
                             f"{tuple(tree_mask.shape)}")
        return CachedAttention(self, new_tokens, tree_mask)

    def commit(self, new_tokens: int) -> None:
        """Count the `new_tokens` just written as cached (the model calls it after its forward)."""
        self.length += new_tokens

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (rejected draft tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate({length}): the cache holds {self.length} positions")
        self.length = length

    def keep(self, start: int, offsets: torch.Tensor | list[int]) -> None:
        """Of the positions from `start` on, keep those at `start + offsets` (in that order), moved to
        `start, start + 1, ...`; forget the rest. Keeps the accepted branch of a verified token tree."""
        index = torch.as_tensor(offsets, dtype=torch.long, device=self.keys.device) + start
        if index.numel() and int(index.max()) >= self.length:
            raise ValueError(f"keep: offset {int(index.max()) - start} is past the {self.length - start} "
                             "positions cached from start")
        end = start + index.numel()
        for store in (self.keys, self.values):
            store[:, :, start:end] = store[:, :, index]
        self.length = end


class CachedAttention:
    """One forward's attention over a `KVCache`: `layer(i)` is what decoder block i calls as `attend`."""

    name = "kv_cache"

    def __init__(self, cache: KVCache, new_tokens: int, tree_mask: torch.Tensor | None) -> None:
        self.cache = cache
        self.start = cache.length
        self.new_tokens = new_tokens
        device = cache.keys.device
        end = self.start + new_tokens
        new = (torch.ones(new_tokens, new_tokens, dtype=torch.bool, device=device).tril() if tree_mask is None
               else tree_mask.to(device=device, dtype=torch.bool))
        # Every new token sees the whole cached prefix, and the new tokens as the chain or tree allows.
        self.mask = torch.cat([torch.ones(new_tokens, self.start, dtype=torch.bool, device=device), new], dim=1)
        self.end = end

    def layer(self, index: int, window: int | None = None) -> "_LayerAttention":
        """What decoder block `index` calls as `attend`; `window`: its sliding window (None: full attention)."""
        return _LayerAttention(self, index, window)

    def mask_for(self, window: int | None) -> torch.Tensor:
        """[new, end] bool: the mask cut to keys at most window - 1 positions before each new token's position."""
        if window is None:
            return self.mask
        device = self.mask.device
        query = torch.arange(self.start, self.end, device=device)[:, None]
        return self.mask & (torch.arange(self.end, device=device)[None, :] > query - window)


class _LayerAttention:
    """attend(q, k, v) of one layer: store k, v at the new positions, attend over the cache up to them."""

    def __init__(self, bound: CachedAttention, index: int, window: int | None = None) -> None:
        self.bound, self.index, self.window = bound, index, window

    @property
    def name(self) -> str:
        return self.bound.name

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, cache = self.bound, self.bound.cache
        if q.shape[1] != b.new_tokens or q.shape[0] != cache.keys.shape[1]:
            raise ValueError(f"the forward feeds [{q.shape[0]}, {q.shape[1]}] tokens but the cache was bound for "
                             f"[{cache.keys.shape[1]}, {b.new_tokens}]")
        cache.keys[self.index, :, b.start:b.end] = k
        cache.values[self.index, :, b.start:b.end] = v
        keys = cache.keys[self.index, :, :b.end].transpose(1, 2)
        values = cache.values[self.index, :, :b.end].transpose(1, 2)
        q = q.transpose(1, 2)
        groups = q.shape[1] // keys.shape[1]
        out = F.scaled_dot_product_attention(q, repeat_kv(keys, groups), repeat_kv(values, groups),
                                             attn_mask=b.mask_for(self.window)[None, None])
        return out.transpose(1, 2)
