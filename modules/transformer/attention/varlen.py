"""PyTorch's own varlen attention (`torch.nn.attention.varlen`, torch >= 2.10): packed documents as
separate sequences via cu_seqlens, on the flash-attention kernels that CUDA builds of torch ship.

No extra package: this is the flash-attention varlen path for machines where the flash-attn wheel
cannot be installed. If FA3 or FA4 has been activated in torch
(`torch.nn.attention.activate_flash_attention_impl`), the same call runs on those kernels.

Rows that hold one unpadded document each take SDPA's fused causal kernel instead,
which needs no cu_seqlens. Padding runs count as sequences of their own, as in `flash`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

from slimtrain.core.documents import Documents

from .base import cannot_slide, causal_attention, is_plain_causal, over_flat_batch, require_cuda_half

_NEEDS = (
    "model.attention='varlen' needs torch>=2.10 with torch.nn.attention.varlen (found {}); "
    "choose attention 'flex' or 'sdpa', or upgrade torch"
)


def varlen_available() -> bool:
    """True when this torch has the built-in varlen attention."""
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False
    return True


def check_varlen_available() -> None:
    """Raise a clear error when this torch has no built-in varlen attention."""
    if not varlen_available():
        raise RuntimeError(_NEEDS.format(torch.__version__))


@functools.cache
def _varlen_call(window: int | None = None) -> Callable[..., torch.Tensor]:
    """`varlen_attn` bound to causal masking (cut to a sliding `window`) and GQA, whichever keywords this torch
    version spells.

    torch 2.10 took `is_causal=`; later versions take `window_size=(-1, 0)` (left, right: a window of `window` is
    `window - 1` keys back); GQA became an explicit `enable_gqa=` flag later still (before it, the kernel took
    fewer kv heads as they came).
    """
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    if window is not None and "window_size" not in params:
        raise cannot_slide("varlen", f"torch {torch.__version__}'s varlen_attn takes no window_size")
    left = -1 if window is None else window - 1
    causal: dict[str, Any] = {"window_size": (left, 0)} if "window_size" in params else {"is_causal": True}
    has_gqa_flag = "enable_gqa" in params

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        require_cuda_half(q, "varlen")
        gqa = {"enable_gqa": q.shape[1] != k.shape[1]} if has_gqa_flag else {}
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal, **gqa)

    return call


class VarlenAttention:
    """torch's varlen_attn over the flattened batch; SDPA causal for single-document rows.

    The kernel call is resolved in `prepare`, outside any compiled block (it inspects torch's signature).
    """

    name = "varlen"

    def prepare(self, docs: Documents | None, seq_len: int, device: torch.device,
                window: int | None = None) -> tuple[Any, ...] | None:
        if window is None and is_plain_causal(docs):
            return None
        check_varlen_available()
        if is_plain_causal(docs):  # a sliding window over whole rows: each row one sequence (cu_seqlens in the call)
            return _varlen_call(window), None, seq_len
        return (_varlen_call(window), *docs.varlen_args())

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: tuple[Any, ...] | None) -> torch.Tensor:
        if prepared is None:
            return causal_attention(q, k, v)
        call, cu, max_len = prepared
        if cu is None:
            cu = torch.arange(0, (q.shape[0] + 1) * max_len, max_len, dtype=torch.int32, device=q.device)
        return over_flat_batch(call, q, k, v, cu, max_len)
