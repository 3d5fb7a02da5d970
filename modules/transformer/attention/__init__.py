"""Attention backends, chosen by `ModelConfig.attention` and bound once per forward.

`eager` is the reference; `sdpa` runs everywhere; `flex`, `varlen` and `flash` are the fast CUDA
paths for packed rows. `auto` picks flash when FA2 is installed (CUDA, bf16/fp16; not FA4, see
flash.py), else torch's varlen (CUDA Ampere+, bf16/fp16, torch >= 2.10), else flex on CUDA, else sdpa. On an H100 varlen ran the 1B model's
training step 8% faster than flex on rows packed with 1k-token documents (docs/model.md). sdpa, flex and varlen send rows of one unpadded document each to SDPA's fused causal kernel,
flash to its own dense causal kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from slimtrain.core.documents import Documents, as_documents
from slimtrain.core.registry import Registry

from .base import AttentionBackend
from .eager import EagerAttention
from .flash import FlashAttention, check_flash_available, flash_usable
from .flex import FlexAttention, check_flex_available
from .sdpa import SdpaAttention
from .varlen import VarlenAttention, check_varlen_available, varlen_available

# Named as `model.attention` names them; "auto" is a choice too, resolved to one of them before lookup.
BACKENDS: Registry[AttentionBackend] = Registry("model.attention", also_valid=("auto",))
for _backend in (EagerAttention(), SdpaAttention(), FlexAttention(), FlashAttention(), VarlenAttention()):
    BACKENDS.register(_backend.name)(_backend)


def check_backend(name: str) -> None:
    """Fail at model build, not at the first step, when the named backend cannot run here."""
    if name == "flash":
        check_flash_available()
    elif name == "flex":
        check_flex_available()
    elif name == "varlen":
        check_varlen_available()
    elif name != "auto":
        BACKENDS.get(name)  # an unknown name: the registry's error lists every choice, 'auto' first


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for `name` ('auto' resolved for this device and dtype)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        half = dtype in (torch.bfloat16, torch.float16)
        if half and flash_usable(device):
            return "flash"
        if half and varlen_available() and _sm80_or_newer(device):
            return "varlen"
        if torch.__version__ >= "2.5":  # a TorchVersion: compares as a version, not as a string
            return "flex"
    return "sdpa"


def _sm80_or_newer(device: torch.device) -> bool:
    """torch's flash-attention kernels (behind varlen_attn) need Ampere or newer."""
    return torch.cuda.get_device_capability(device)[0] >= 8


class BoundAttention:
    """A backend with its mask prepared for one forward; the layers call it as `attend(q, k, v)`."""

    def __init__(self, backend: AttentionBackend, mask: Any) -> None:
        self.backend = backend
        self.mask = mask

    @property
    def name(self) -> str:
        return self.backend.name

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.backend(q, k, v, self.mask)


def bind_attention(
    name: str, doc_ids: torch.Tensor | Documents | None, seq_len: int, device: torch.device, dtype: torch.dtype,
    window: int | None = None,
) -> BoundAttention:
    """Resolve `name` and prepare its mask once, for all layers of one forward (with the sliding `window`, the
    layers that slide). A window that covers the whole row changes nothing and is dropped."""
    backend = BACKENDS.get(resolve_backend(name, device, dtype))
    if window is not None and window >= seq_len:
        window = None
    return BoundAttention(backend, backend.prepare(as_documents(doc_ids), seq_len, device, window))


__all__ = ["BACKENDS", "AttentionBackend", "BoundAttention", "bind_attention", "check_backend", "resolve_backend"]
