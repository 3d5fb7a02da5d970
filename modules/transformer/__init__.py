"""The Llama-family decoder (single-device PyTorch) and its configuration."""

from .config import ModelConfig
from .model import Transformer, TransformerOutput

__all__ = ["ModelConfig", "Transformer", "TransformerOutput"]
