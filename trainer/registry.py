"""The trainer's registries; the Registry class itself lives in `slimtrain.modules.registry`."""

from __future__ import annotations

from slimtrain.modules.registry import Registry, UnknownNameError

__all__ = ["BACKENDS", "Registry", "UnknownNameError"]

BACKENDS: Registry = Registry("backend")
