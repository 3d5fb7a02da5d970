"""FlexAttention with a document BlockMask: skips fully masked blocks, so packed rows cost less.

Rows that hold one unpadded document each take SDPA's fused causal kernel instead: on an H100 the
cuDNN kernel it picks ran the 1B step's causal attention in half the time of a causal block mask.

On CUDA the flex call and the block-mask construction are compiled (uncompiled flex materialises
the full score matrix). Elsewhere flex runs uncompiled: a slow reference, useful for tests only.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from slimtrain.core.documents import Documents
from slimtrain.core.sentinels import PAD_DOC_ID

from .base import causal_attention, is_plain_causal

_NEEDS = "model.attention='flex' needs torch>=2.5 (found {}); choose attention 'sdpa' or upgrade torch"


def check_flex_available() -> None:
    """Raise a clear error when this torch has no flex attention."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as err:
        raise RuntimeError(_NEEDS.format(torch.__version__)) from err


@functools.cache
def _kernels(compiled: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not compiled:
        return flex_attention, create_block_mask
    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask)


def _document_mask_mod(doc_ids: torch.Tensor | None, window: int | None) -> Callable[..., torch.Tensor]:
    # Same rule as slimtrain.core.masks.document_causal_mask: causal within a document, and a
    # padding position (doc id -1) attends only to itself so that no row is empty; cut to the window if any.
    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        keep = kv_idx <= q_idx
        if doc_ids is not None:
            q_doc = doc_ids[b, q_idx]
            keep = keep & (q_doc == doc_ids[b, kv_idx]) & ((q_doc != PAD_DOC_ID) | (q_idx == kv_idx))
        if window is not None:
            keep = keep & (kv_idx > q_idx - window)
        return keep

    return mask_mod


class FlexAttention:
    """flex_attention with a BlockMask built once per forward from `doc_ids`."""

    name = "flex"

    def prepare(self, docs: Documents | None, seq_len: int, device: torch.device, window: int | None = None) -> Any:
        plain = is_plain_causal(docs)
        if plain and window is None:
            return None  # SDPA's fused causal kernel beats a causal block mask (2x on an H100)
        _, create_block_mask = _kernels(device.type == "cuda")
        ids = None if plain else docs.ids
        rows = 1 if ids is None else ids.shape[0]  # a mask without documents is the same for every row
        return create_block_mask(_document_mask_mod(ids, window), rows, None, seq_len, seq_len, device=device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        if mask is None:
            return causal_attention(q, k, v)
        compiled = q.device.type == "cuda"
        if not compiled and torch.is_grad_enabled() and q.requires_grad:
            raise RuntimeError(
                f"model.attention='flex' has no backward on {q.device.type} (torch's flex attention trains on "
                "CUDA only); choose attention 'sdpa' (or 'auto') to train here"
            )
        if torch.compiler.is_compiling():  # inside a compiled block (train.compile): the block's graph takes flex in
            from torch.nn.attention.flex_attention import flex_attention
        else:
            flex_attention, _ = _kernels(compiled)
        # Inductor picks its decoding kernel for queries shorter than 128; that kernel is for
        # inference, has no backward and fails to lower for small heads. Training wants the main one.
        options = {"FORCE_USE_FLEX_ATTENTION": True} if compiled else None
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = flex_attention(q, k, v, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1], kernel_options=options)
        return out.transpose(1, 2)
