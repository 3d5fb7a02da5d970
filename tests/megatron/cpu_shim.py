"""Test-only: let megatron-core run on CPU tensors over gloo (../shared/reference/megatron-cpu.md). Never imported by
the library. megatron-core calls `torch.cuda.current_device()` for its buffers and `torch.cuda.synchronize()` and
streams around communication; on a machine without CUDA these become the CPU and no-ops."""

from __future__ import annotations

import torch


class _Stream:
    """A stream that runs everything in order (the CPU has one)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc) -> bool:
        return False


def install() -> None:
    """Patch torch.cuda's calls megatron-core makes when no GPU is present."""
    if torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Stream = _Stream
    torch.cuda.current_stream = lambda *args, **kwargs: _Stream()
    torch.cuda.stream = lambda *args, **kwargs: _Stream()
