"""Export to Hugging Face format: per-architecture adapters (registered by name) and the writer."""

from . import llama  # noqa: F401  (registers the "llama" adapter)
from .adapters import ADAPTERS, Adapter, get_adapter, register_adapter

__all__ = ["ADAPTERS", "Adapter", "get_adapter", "register_adapter"]
