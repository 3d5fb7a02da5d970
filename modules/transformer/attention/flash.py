"""flash-attn varlen kernels: packed documents as separate sequences via cu_seqlens (CUDA, bf16/fp16).

Padding runs count as sequences of their own (see `slimtrain.data.masks.cu_seqlens`), so a padding
position attends to the padding before it in its run rather than only to itself as in the other
backends. Real tokens never see padding either way, so their outputs are the same.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from slimtrain.data.masks import cu_seqlens


def flash_attn_available() -> bool:
    """True when the flash-attn package is installed (without importing it: it loads CUDA code)."""
    return importlib.util.find_spec("flash_attn") is not None


def check_flash_available() -> None:
    """Raise a clear error when flash-attn is not installed."""
    if not flash_attn_available():
        raise RuntimeError(
            "model.attention='flash' needs the flash-attn package, which is not installed; "
            "install it (pip install 'slimtrain[gpu]') or choose attention 'auto', 'flex' or 'sdpa'"
        )


class FlashAttention:
    """flash_attn_func for plain causal rows, flash_attn_varlen_func for packed rows."""

    name = "flash"

    def prepare(
        self, doc_ids: torch.Tensor | None, seq_len: int, device: torch.device
    ) -> tuple[torch.Tensor, int] | None:
        return None if doc_ids is None else cu_seqlens(doc_ids)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        check_flash_available()
        if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
            raise RuntimeError(
                f"model.attention='flash' runs on CUDA in bf16/fp16, got {q.device.type} {q.dtype}; "
                "cast the model to bf16 or choose attention 'sdpa'"
            )
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        if mask is None:
            return flash_attn_func(q, k, v, causal=True)
        cu, max_len = mask
        b, s = q.shape[:2]
        flat = [t.reshape(b * s, *t.shape[2:]) for t in (q, k, v)]
        out = flash_attn_varlen_func(*flat, cu, cu, max_len, max_len, causal=True)
        return out.view(b, s, *out.shape[1:])
