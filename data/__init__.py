"""slimtrain.data: sources, tokenizer, token shards, packing and the resumable loader.

The entry points are imported lazily: prepare's worker processes import `slimtrain.data.encode`,
and should not pay for torch and transformers on the way.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batch": "slimtrain.data.batch",
    "DataConfig": "slimtrain.data.config",
    "DataError": "slimtrain.data.errors",
    "Loader": "slimtrain.data.loader",
    "PreparedData": "slimtrain.data.pipeline",
    "prepare": "slimtrain.data.pipeline",
    "check_inputs": "slimtrain.data.pipeline",
    "build_loader": "slimtrain.data.pipeline",
    "PACKERS": "slimtrain.data.packing",
    "document_causal_mask": "slimtrain.core.masks",
    "cu_seqlens": "slimtrain.core.masks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'slimtrain.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
