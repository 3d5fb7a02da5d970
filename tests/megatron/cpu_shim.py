"""Test-only: let megatron-core run on CPU tensors over gloo (../shared/reference/megatron-cpu.md). Never imported by
the library. megatron-core calls `torch.cuda.current_device()` for its buffers, `torch.cuda.synchronize()` and
streams around communication, makes some tensors with `device="cuda"` and checks gradients' types by their CUDA
names; on a machine without CUDA these become the CPU, no-ops and the CPU tensors' CUDA names.

`install()` patches this process; `sitecustomize/` holds a sitecustomize.py that installs it in every process a
test starts with that directory on PYTHONPATH (the ranks of `slimtrain train`)."""

from __future__ import annotations

import functools

import torch


class _Stream:
    """A stream that runs everything in order (the CPU has one)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc) -> bool:
        return False


def _cpu_device(factory):
    @functools.wraps(factory)
    def wrapped(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and str(device).startswith("cuda"):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return wrapped


def _cuda_type_names(original):
    @functools.wraps(original)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return original(self, *args, **kwargs)
        name = original(self)
        return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name

    return type_


def install() -> None:
    """Patch torch's CUDA calls that megatron-core makes, when no GPU is present."""
    if torch.cuda.is_available() or getattr(torch, "_slimtrain_cpu_shim", False):
        return
    torch._slimtrain_cpu_shim = True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.Stream = _Stream
    torch.cuda.current_stream = lambda *args, **kwargs: _Stream()
    torch.cuda.default_stream = lambda *args, **kwargs: _Stream()
    torch.cuda.stream = lambda *args, **kwargs: _Stream()
    for name in ("empty", "zeros", "ones", "full", "tensor", "arange", "randn", "rand"):
        setattr(torch, name, _cpu_device(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _cuda_type_names(torch.Tensor.type)
