"""The loader of `packer: buckets` (dataset decomposition): micro-batches of one row length per step.

The global stream is a sequence of optimizer steps; epoch e's steps are built from (seed, e) by
`build_bucket_epoch` (decomposition, buckets, curriculum). Step t of bucket L holds R = G x S / L rows
(G = global batch size in rows of seq_len S); rank r takes its contiguous R / world_size of them as
`micro_batches_per_step` micro-batches of micro_batch_size x S / L rows each. So every micro-batch holds
micro_batch_size x S token slots, whatever L, and gradient accumulation is unchanged.

Positions are those of the base loader counted in rows of seq_len: a step consumes G of them whatever its
length, so `consumed_samples`, the cursor, the state and resume (also on another world size) work as
they do for the fixed-length packers. The stream depends on G (a step's rows), unlike theirs, so a state
loads only into a loader with the same global batch size.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from slimtrain.data.batch import Batch
from slimtrain.data.bucket_epoch import BucketEpoch, build_bucket_epoch
from slimtrain.data.collate import build_batch
from slimtrain.data.errors import DataError, LoaderStateError
from slimtrain.data.loader import Cursor, EpochPlans, Loader, StreamSpec, _check_state
from slimtrain.data.mixture import epoch_documents

BUCKETS = "buckets"


class BucketEpochs(EpochPlans):
    """The `BucketEpoch` of each epoch, built on demand and cached like the packed plans."""

    def __init__(self, spec: StreamSpec, global_batch_size: int) -> None:
        super().__init__(spec)
        self.global_batch_size = global_batch_size

    def get(self, epoch: int) -> BucketEpoch:  # type: ignore[override]
        return super().get(epoch)

    def _build(self, epoch: int) -> BucketEpoch:
        s = self.spec
        assert s.buckets is not None  # BucketLoader checks it
        rng = np.random.default_rng([s.seed, epoch])
        docs = epoch_documents(s.dataset, s.weights, rng)
        return build_bucket_epoch(docs, s.dataset.doc_len[docs].astype(np.int64), s.seq_len, self.global_batch_size,
                                  s.buckets, rng)


class BucketLoader(Loader):
    """This rank's micro-batches of the buckets stream: `Batch` [micro_batch_size x seq_len / L, L], L the
    step's bucket. Training only (evaluation reads rows of seq_len, `data.val_packer`)."""

    row_lengths_vary = True

    def __init__(self, spec: StreamSpec, **kwargs: Any) -> None:
        if spec.buckets is None:
            raise DataError(f"packer {spec.packer!r} with the buckets loader needs the data.buckets settings")
        if spec.dataset.split != "train":
            raise DataError("data.packer=buckets feeds training only; evaluation reads rows of data.seq_len packed "
                            "by data.val_packer (bfd unless set)")
        if spec.transforms:
            names = [t.name for t in spec.transforms]
            raise DataError(f"data.packer=buckets gives rows of varying length, which the plugins' batch transforms "
                            f"{names} do not take; use data.packer=bfd with these plugins")
        super().__init__(spec, **kwargs)
        self.plans = BucketEpochs(spec, self.global_batch_size)

    def _rows_in_epoch(self, epoch: int) -> int:
        return self.plans.get(epoch).num_steps * self.global_batch_size

    def _generate(self, cursor: Cursor) -> Iterator[tuple[Batch, Cursor]]:
        seq_len = self.spec.seq_len
        while True:
            epoch = self.plans.get(cursor.epoch)
            step = (cursor.consumed - cursor.epoch_start) // self.global_batch_size
            row_len = epoch.row_len(step)
            per_rank = epoch.rows_per_step[int(epoch.order[step])] // self.world_size
            rows_per_micro = self.micro_batch_size * (seq_len // row_len)
            first = self.rank * per_rank + cursor.micro * rows_per_micro
            rows = [epoch.row(step, i) for i in range(first, first + rows_per_micro)]
            batch = build_batch(self.spec.dataset, rows, row_len, self.pad_id, self.mask_cross_doc_labels)
            cursor = self._next_cursor(cursor)
            yield batch, cursor

    def row_len_at(self, step: int) -> int:
        """Row length of global step `step` (0-based) of the stream (for plots and benchmarks)."""
        cursor = self._advance(Cursor(), step * self.global_batch_size)
        return self.plans.get(cursor.epoch).row_len(step - cursor.epoch_start // self.global_batch_size)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As `Loader.load_state_dict`; the global batch size must be the one the state was saved with."""
        _check_state(self, state)
        if state.get("global_batch_size") != self.global_batch_size:
            raise LoaderStateError(
                f"the loader state was saved with train.global_batch_size={state.get('global_batch_size')} and "
                f"data.packer=buckets, whose steps hold global_batch_size x seq_len tokens; resume with "
                f"train.global_batch_size={state.get('global_batch_size')} (now {self.global_batch_size})"
            )
        super().load_state_dict(state)

    def packing_stats(self) -> dict[str, Any]:
        """What the decomposition of the current epoch did (`build_bucket_epoch`'s statistics)."""
        return {"epoch": self._cursor.epoch, **self.plans.get(self._cursor.epoch).stats}
