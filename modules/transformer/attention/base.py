"""What every attention backend shares: the tensor layout, the GQA head repeat, the causal check.

Layout: q is [B, S, num_heads, head_dim], k and v are [B, S, num_kv_heads, head_dim]; a backend
returns [B, S, num_heads, head_dim]. This is the projections' natural layout (and flash-attn's), so
the model never transposes for a backend that does not need it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from slimtrain.core.documents import Documents
from slimtrain.core.masks import document_causal_mask, window_band

# `enable_gqa` arrived in torch 2.5; before it, kv heads are repeated to the query heads' count.
_SDPA_HAS_GQA = torch.__version__ >= "2.5"


class AttentionBackend(Protocol):
    """An attention implementation: `prepare` once per forward, then call once per layer."""

    name: str

    def prepare(self, docs: Documents | None, seq_len: int, device: torch.device, window: int | None = None) -> Any:
        """The mask structure for this forward (shared by the layers with this window); docs None = plain causal.
        window: sliding-window attention (a key at most window - 1 tokens back); None = full. A backend that
        cannot slide raises a RuntimeError naming the backends that can."""
        ...

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        """Causal attention of q over k, v restricted by `mask` (from `prepare`)."""
        ...


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * groups, S, D]; query head h reads kv head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def is_plain_causal(docs: Documents | None) -> bool:
    """True when the document mask equals the causal mask: one document per row, no padding.

    Unless the host already knows (`Batch.to`), this syncs once per forward on a device tensor;
    worth it because it unlocks the `is_causal` kernels.
    """
    return docs is None or docs.single_rows()


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [1, 1, S, S], True where query i may attend key j (j <= i)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]


def dense_mask(docs: Documents | None, seq_len: int, device: torch.device, window: int | None) -> torch.Tensor:
    """The boolean mask [B or 1, 1, S, S] of a document (or plain causal) mask cut to a sliding window."""
    mask = causal_mask(seq_len, device) if docs is None else document_causal_mask(docs.ids)
    return mask if window is None else mask & window_band(seq_len, window, device)


def cannot_slide(backend: str, why: str) -> RuntimeError:
    """The refusal of a sliding window by a backend that has no such kernel."""
    return RuntimeError(f"model.attention={backend!r} cannot compute model.sliding_window ({why}); choose attention "
                        "'sdpa' (any device), 'flex' (CUDA) or 'flash' with flash-attn 2")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain causal attention in the backend layout, on SDPA's fused causal kernels.

    sdpa, flex and varlen send rows that hold one unpadded document each here: with no mask tensor
    SDPA may pick its fastest fused kernel (its own choice by torch version: cuDNN or flash on CUDA).
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    if _SDPA_HAS_GQA:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    else:
        out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)
    return out.transpose(1, 2)


def over_flat_batch(kernel: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                    max_len: int) -> torch.Tensor:
    """A varlen kernel over the batch flattened to [B*S, heads, dim] (rows split by `cu`), unflattened."""
    b, s = q.shape[:2]
    out = kernel(*(t.reshape(b * s, *t.shape[2:]) for t in (q, k, v)), cu, max_len)
    return out.view(b, s, *out.shape[1:])


def require_cuda_half(q: torch.Tensor, backend: str) -> None:
    """The flash-attention kernels run on CUDA in bf16/fp16 only: say so, and what to change."""
    if q.device.type != "cuda":
        raise RuntimeError(
            f"model.attention={backend!r} runs on CUDA only, got {q.device.type}; choose attention 'sdpa' (or 'auto')"
        )
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(
            f"model.attention={backend!r} runs in bf16/fp16, got {q.dtype}; "
            "set backend.precision=bf16 or choose attention 'sdpa'"
        )
