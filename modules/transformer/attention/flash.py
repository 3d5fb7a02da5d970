"""flash-attn varlen kernels: packed documents as separate sequences via cu_seqlens (CUDA, bf16/fp16).

Two packages provide them: `flash-attn` (FA2, module `flash_attn`) and `flash-attn-4` (FA4, module
`flash_attn.cute`, pure Python on the CUTLASS DSL, kernels for Ampere, Hopper and Blackwell). FA4 is
used on Hopper and newer when installed, FA2 elsewhere; `SLIMTRAIN_FLASH=fa2|fa4` forces one.

Padding runs count as sequences of their own (see `slimtrain.data.masks.cu_seqlens`), so a padding
position attends to the padding before it in its run rather than only to itself as in the other
backends. Real tokens never see padding either way, so their outputs are the same.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from typing import Any, Callable

import torch

from .base import is_plain_causal, require_cuda_half, varlen_mask

_DISTRIBUTIONS = {"fa2": "flash-attn", "fa4": "flash-attn-4"}


def _installed(impl: str) -> bool:
    # Package metadata, not an import: importing flash-attn loads its CUDA extension.
    try:
        importlib.metadata.version(_DISTRIBUTIONS[impl])
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def flash_attn_available() -> bool:
    """True when flash-attn (FA2) or flash-attn-4 is installed."""
    return any(_installed(impl) for impl in _DISTRIBUTIONS)


def check_flash_available() -> None:
    """Raise a clear error when no flash-attn package is installed, or SLIMTRAIN_FLASH names a missing one."""
    forced = os.environ.get("SLIMTRAIN_FLASH")
    if forced is not None and (forced not in _DISTRIBUTIONS or not _installed(forced)):
        raise RuntimeError(
            f"SLIMTRAIN_FLASH={forced!r} names no installed flash-attn package; installed: "
            f"{[i for i in _DISTRIBUTIONS if _installed(i)]}; unset it or choose one of {list(_DISTRIBUTIONS)}"
        )
    if not flash_attn_available():
        raise RuntimeError(
            "model.attention='flash' needs the flash-attn or flash-attn-4 package, neither is installed; "
            "install one (pip install 'slimtrain[gpu]') or choose attention 'auto', 'varlen', 'flex' or 'sdpa'"
        )


def flash_impl(device: torch.device) -> str:
    """'fa4' or 'fa2': the package the flash backend calls on `device`."""
    forced = os.environ.get("SLIMTRAIN_FLASH")
    if forced:
        return forced
    if _installed("fa4") and (not _installed("fa2") or torch.cuda.get_device_capability(device)[0] >= 9):
        return "fa4"
    return "fa2"


@functools.cache
def _kernels(impl: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(dense causal call, varlen causal call), each returning the attention output alone."""
    if impl == "fa4":
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

        # FA4 launches CUTLASS-DSL kernels from Python, which Dynamo cannot trace: inside a compiled
        # block (train.compile) the call runs eagerly, between the block's two compiled halves.
        @torch.compiler.disable
        def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return flash_attn_func(q, k, v, causal=True)[0]  # FA4 returns (out, lse)

        @torch.compiler.disable
        def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
            return flash_attn_varlen_func(
                q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len, causal=True
            )[0]

        return dense, varlen
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    return (
        lambda q, k, v: flash_attn_func(q, k, v, causal=True),
        lambda q, k, v, cu, max_len: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True),
    )


def _kernels_for(q: torch.Tensor) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The kernels for `q`'s device, after checking that a package is installed and q is CUDA bf16/fp16."""
    check_flash_available()
    require_cuda_half(q, "flash")
    return _kernels(flash_impl(q.device))


class FlashAttention:
    """flash_attn_func for plain causal rows, flash_attn_varlen_func for packed rows."""

    name = "flash"

    def prepare(
        self, doc_ids: torch.Tensor | None, seq_len: int, device: torch.device
    ) -> tuple[torch.Tensor, int] | None:
        return None if is_plain_causal(doc_ids) else varlen_mask(doc_ids)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
        dense, varlen = _kernels_for(q)
        if mask is None:
            return dense(q, k, v)
        cu, max_len = mask
        b, s = q.shape[:2]
        out = varlen(*(t.reshape(b * s, *t.shape[2:]) for t in (q, k, v)), cu, max_len)
        return out.view(b, s, *out.shape[1:])
