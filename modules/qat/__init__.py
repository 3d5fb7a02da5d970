"""Quantization-aware training: quantizers, gradient estimators, QATLinear, Triton kernels, export (docs/qat.md)."""

from .config import QATConfig, QuantSpec
from .linear import QATLinear

__all__ = ["QATConfig", "QATLinear", "QuantSpec"]
