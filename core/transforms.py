"""Batch transforms: extra per-row fields a plugin needs, built by the data path (DESIGN.md, seam 2).

A plugin declares its transforms (`Plugin.batch_transforms`); the loader runs them in collate, on the
host, after a micro-batch's rows are packed. A transform reads the batch's fields and returns the
fields to set: new names become `Batch.extras` (moved with the batch), and `labels` may be replaced
(masked or re-targeted) there, where the loss's token count is taken. Its `identity()` is part of
the loader's resume fingerprint, so a resumed run sees exactly the fields it would have seen.

Transforms are registered by name like packers (`TRANSFORMS`), and must be deterministic in the
row: seed any randomness from `identity()` and the row's key (its index in the global row stream,
the same whatever the number of ranks and whether the run was resumed).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch

from slimtrain.core.registry import Registry

REPLACEABLE = frozenset({"labels"})
"""The batch's own fields a transform may replace; any other name it returns becomes an extra field."""


@runtime_checkable
class BatchTransform(Protocol):
    """One data-side transform. `name` is its registered name."""

    name: str

    def identity(self) -> dict[str, Any]:
        """Its settings, JSON-serialisable: part of the loader state's fingerprint."""
        ...

    def __call__(self, fields: Mapping[str, torch.Tensor], rows: Sequence[int | None]) -> dict[str, torch.Tensor]:
        """Fields to set for one micro-batch.

        fields: input_ids, labels, position_ids, doc_ids ([B, S] int64, on the CPU) and the extras of the
        transforms before this one. rows: each row's key in the global row stream (None: a padding row).
        Returns [B, ...] tensors: `labels` (replacing the batch's) and/or new extra fields.
        """
        ...


TRANSFORMS: Registry = Registry("batch transform")
