"""flash-attn varlen kernels: packed documents as separate sequences via cu_seqlens (CUDA, bf16/fp16).

Two packages provide them: `flash-attn` (FA2, module `flash_attn`) and `flash-attn-4` (FA4, module
`flash_attn.cute`, pure Python on the CUTLASS DSL; it trains on Hopper and newer only). On Hopper and
newer FA4 is used when installed, else FA2; below Hopper only FA2. `SLIMTRAIN_FLASH=fa2|fa4` forces one.

The package and its kernels are chosen in `prepare`, once per forward and outside any compiled block,
and travel with the mask: package lookups cannot be traced by Dynamo and cost host time per layer.

Padding runs count as sequences of their own (see `slimtrain.core.masks.cu_seqlens`), so a padding
position attends to the padding before it in its run rather than only to itself as in the other
backends. Real tokens never see padding either way, so their outputs are the same.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import warnings
from typing import Any, Callable

import torch

from slimtrain.core.documents import Documents

from .base import cannot_slide, is_plain_causal, over_flat_batch, require_cuda_half

_DISTRIBUTIONS = {"fa2": "flash-attn", "fa4": "flash-attn-4"}
Kernels = tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]


@functools.cache
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


def _forced() -> str | None:
    return os.environ.get("SLIMTRAIN_FLASH") or None


def check_flash_available() -> None:
    """Raise a clear error when no flash-attn package is installed, or SLIMTRAIN_FLASH names a missing one."""
    forced = _forced()
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
    """'fa4' or 'fa2': the package the flash backend calls on `device` (a CUDA device)."""
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    impl = _forced() or ("fa4" if _installed("fa4") and (hopper or not _installed("fa2")) else "fa2")
    if impl == "fa4" and not hopper:
        raise RuntimeError(
            f"model.attention='flash' would run flash-attn-4, whose backward needs Hopper or newer, on "
            f"{torch.cuda.get_device_name(device)}; install flash-attn (FA2) "
            "or choose attention 'varlen' or 'flex' (and unset SLIMTRAIN_FLASH)"
        )
    return impl


def flash_usable(device: torch.device) -> bool:
    """True when FA2 is installed and can train on `device` (what `auto` asks). `auto` leaves FA4 out:
    on an H100 its gradients disagreed with SDPA's in our test (`_FA4_GRADIENTS`)."""
    try:
        check_flash_available()
        return flash_impl(device) == "fa2"
    except RuntimeError:
        return False


_FA4_GRADIENTS = (
    "model.attention='flash' runs flash-attn-4: on an H100 (flash-attn-4 4.0.0b36, torch 2.11) its forward "
    "matched SDPA's but its parameter gradients did not (tests/model/test_model_attention.py::"
    "test_fused_backends_train_like_sdpa_on_cuda, head dim 16, 2 kv heads); run that test on your stack "
    "before training with it, or choose attention 'varlen' (or 'auto')"
)


@functools.cache
def _kernels(impl: str) -> Kernels:
    """(dense causal call, varlen causal call), each returning the attention output alone."""
    if impl == "fa4":
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

        warnings.warn(_FA4_GRADIENTS, stacklevel=2)  # once: _kernels is cached

        # FA4 launches CUTLASS-DSL kernels from Python, which Dynamo cannot trace: inside a compiled
        # block (train.compile) the call runs eagerly between the block's compiled parts.
        @torch.compiler.disable
        def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            require_cuda_half(q, "flash")
            return flash_attn_func(q, k, v, causal=True)[0]  # FA4 returns (out, lse)

        @torch.compiler.disable
        def varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
            require_cuda_half(q, "flash")
            return flash_attn_varlen_func(
                q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len, causal=True
            )[0]

        return dense, varlen
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    def dense2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
        require_cuda_half(q, "flash")
        return flash_attn_func(q, k, v, causal=True, window_size=window_size)

    def varlen2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
        require_cuda_half(q, "flash")
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True, window_size=window_size)

    return dense2, varlen2


def _kernels_for(device: torch.device) -> Kernels:
    """The kernels for `device`, after checking that a package that can train there is installed."""
    check_flash_available()
    if device.type != "cuda":
        raise RuntimeError(
            f"model.attention='flash' runs on CUDA only, got {device.type}; choose attention 'sdpa' (or 'auto')"
        )
    return _kernels(flash_impl(device))


class FlashAttention:
    """flash_attn_func for plain causal rows, flash_attn_varlen_func for packed rows."""

    name = "flash"

    def prepare(self, docs: Documents | None, seq_len: int, device: torch.device,
                window: int | None = None) -> tuple[Any, ...]:
        dense, varlen = _kernels_for(device)
        if window is not None:
            if flash_impl(device) != "fa2":
                raise cannot_slide("flash", "flash-attn-4 is not wired for windows here; install flash-attn 2")
            # flash-attn 2's window (left, right): keys i - left .. i + right, so a window of w is w - 1 back
            dense, varlen = (functools.partial(k, window_size=(window - 1, 0)) for k in (dense, varlen))
        return dense, varlen, None if is_plain_causal(docs) else docs.varlen_args()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: tuple[Any, ...]) -> torch.Tensor:
        dense, varlen, mask = prepared
        if mask is None:
            return dense(q, k, v)
        return over_flat_batch(varlen, q, k, v, *mask)
