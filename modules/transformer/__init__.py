"""The Llama-family decoder (single-device PyTorch) and its configuration."""

from .config import ModelConfig
from .io import ModelInputs, Splice, TransformerOutput
from .model import Transformer

__all__ = ["ModelConfig", "ModelInputs", "Splice", "Transformer", "TransformerOutput"]
