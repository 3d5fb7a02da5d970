"""The rank-aware, resumable loader.

The global stream: epoch e's documents are chosen and ordered from (seed, e), packed, and the packed
rows shuffled from (seed, e); the epochs' rows, one epoch after the other, form one global sequence.
Global step k consumes rows [k*G, (k+1)*G) (G = global batch size); rank r takes its contiguous share
of G / world_size rows, as micro-batches in order. The stream does not depend on the world size, so a
run resumed on another number of ranks with the same G consumes the remaining rows exactly once.

The state is the count of globally consumed rows (plus the micro-batches of the current step this
rank already yielded), counted for batches *yielded* to the caller, never the prefetched ones.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np

from slimtrain.core.transforms import BatchTransform
from slimtrain.data.batch import Batch
from slimtrain.data.bucket_epoch import BucketSpec
from slimtrain.data.collate import build_batch
from slimtrain.data.dataset import Split, TokenDataset
from slimtrain.data.errors import DataError, LoaderStateError
from slimtrain.data.mixture import epoch_documents
from slimtrain.data.packing import PackPlan, pack
from slimtrain.data.sources import digest

STATE_VERSION = 1


@dataclass(frozen=True)
class StreamSpec:
    """Everything that determines the global row stream and the batches built from it."""

    dataset: TokenDataset
    packer: str
    seq_len: int
    weights: list[float] | None
    seed: int
    buffer_docs: int
    transforms: tuple[BatchTransform, ...] = ()
    """The plugins' batch transforms (slimtrain.core.transforms), run in collate in this order."""
    buckets: BucketSpec | None = None
    """`packer: buckets` only: the decomposition and curriculum settings (slimtrain.data.bucket_loader)."""

    def identity(self) -> dict[str, Any]:
        """The stream's defining settings, JSON-serialisable (stored in loader states)."""
        ident = {"data": self.dataset.fingerprint, "split": self.dataset.split, "packer": self.packer,
                 "seq_len": self.seq_len, "weights": self.weights, "seed": self.seed, "buffer_docs": self.buffer_docs}
        if self.transforms:  # absent without transforms: states saved before transforms existed still match
            ident["transforms"] = [{"name": t.name, **t.identity()} for t in self.transforms]
        if self.buckets is not None:  # absent otherwise, for the same reason
            ident["buckets"] = self.buckets.identity()
        return ident

    def fingerprint(self) -> str:
        return digest(self.identity())


class EpochPlans:
    """The packed rows of each epoch, built on demand, cached (a few epochs) and thread-safe."""

    def __init__(self, spec: StreamSpec, keep: int = 3) -> None:
        if len(spec.dataset) == 0:
            raise DataError(
                f"the {spec.dataset.split} split has no documents; add data, or for val raise data.val_fraction"
            )
        self.spec = spec
        self._keep = keep
        self._cache: OrderedDict[int, tuple[PackPlan, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, epoch: int) -> tuple[PackPlan, np.ndarray]:
        """(plan, row order) of `epoch`: global row i of the epoch is plan row order[i]."""
        with self._lock:
            if epoch in self._cache:
                self._cache.move_to_end(epoch)
                return self._cache[epoch]
        entry = self._build(epoch)
        with self._lock:
            self._cache[epoch] = entry
            while len(self._cache) > self._keep:
                self._cache.popitem(last=False)
        return entry

    def _build(self, epoch: int) -> Any:
        s = self.spec
        rng = np.random.default_rng([s.seed, epoch])
        docs = epoch_documents(s.dataset, s.weights, rng)
        plan = pack(s.packer, docs, s.dataset.doc_len[docs], s.seq_len, s.buffer_docs)
        return plan, rng.permutation(plan.num_rows)  # BFD emits rows by size: shuffle them


@dataclass(frozen=True)
class Cursor:
    """Position in the global stream; `epoch` is the epoch holding global row `consumed`, starting at `epoch_start`."""

    consumed: int = 0
    micro: int = 0
    epoch: int = 0
    epoch_start: int = 0


class _Prefetcher:
    """Runs a generator in a daemon thread, `depth` items ahead."""

    _END = object()

    def __init__(self, items: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name="slimtrain-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # surfaced in the consumer's thread
            self._put(e)

    def get(self) -> Any:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Loader:
    """Iterator of this rank's micro-batches (`Batch`, [micro_batch_size, seq_len]).

    train: infinite, epoch after epoch. val: one deterministic pass over the validation rows (the last
    global step padded with empty rows so that every rank yields the same number of batches);
    iterating it again (`iter(loader)`) starts over from the first batch.
    """

    row_lengths_vary = False
    """True for a loader whose micro-batches change row length from step to step (`packer: buckets`)."""

    def __init__(
        self, spec: StreamSpec, *, rank: int, world_size: int, micro_batch_size: int, global_batch_size: int,
        pad_id: int, mask_cross_doc_labels: bool = True, prefetch: int = 2,
    ) -> None:
        _check_sizes(rank, world_size, micro_batch_size, global_batch_size)
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.global_batch_size = micro_batch_size, global_batch_size
        self.pad_id, self.mask_cross_doc_labels, self.prefetch = pad_id, mask_cross_doc_labels, prefetch
        self.plans = EpochPlans(spec)
        self._cursor = Cursor()
        self._items: Iterator[tuple[Batch, Cursor]] | None = None
        self._prefetcher: _Prefetcher | None = None

    @property
    def split(self) -> Split:
        return self.spec.dataset.split

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches each rank yields per global step."""
        return self.global_batch_size // (self.world_size * self.micro_batch_size)

    def _rows_in_epoch(self, epoch: int) -> int:
        return self.plans.get(epoch)[0].num_rows

    def _advance(self, cursor: Cursor, consumed: int) -> Cursor:
        epoch, start = cursor.epoch, cursor.epoch_start
        while consumed >= start + self._rows_in_epoch(epoch) and self.split == "train":
            start += self._rows_in_epoch(epoch)
            epoch += 1
        return replace(cursor, epoch=epoch, epoch_start=start)

    def _row(self, cursor: Cursor, g: int) -> tuple[PackPlan, int] | None:
        at = self._advance(cursor, g)
        plan, order = self.plans.get(at.epoch)
        i = g - at.epoch_start
        return (plan, int(order[i])) if i < plan.num_rows else None  # None: padding past a val pass

    def _val_steps(self) -> int:
        return -(-self._rows_in_epoch(0) // self.global_batch_size)

    def _generate(self, cursor: Cursor) -> Iterator[tuple[Batch, Cursor]]:
        per_rank = self.global_batch_size // self.world_size
        while self.split == "train" or cursor.consumed < self._val_steps() * self.global_batch_size:
            first = cursor.consumed + self.rank * per_rank + cursor.micro * self.micro_batch_size
            keys = list(range(first, first + self.micro_batch_size))
            rows = [self._row(cursor, g) for g in keys]
            batch = build_batch(self.spec.dataset, rows, self.spec.seq_len, self.pad_id, self.mask_cross_doc_labels,
                                self.spec.transforms, [k if r is not None else None for k, r in zip(keys, rows)])
            cursor = self._next_cursor(cursor)
            yield batch, cursor

    def _next_cursor(self, cursor: Cursor) -> Cursor:
        """The position after one more micro-batch of this rank."""
        if cursor.micro + 1 < self.micro_batches_per_step:
            return replace(cursor, micro=cursor.micro + 1)
        consumed = cursor.consumed + self.global_batch_size
        return self._advance(replace(cursor, consumed=consumed, micro=0), consumed)

    def __iter__(self) -> "Loader":
        if self.split == "val":
            self._restart(Cursor())
        return self

    def __next__(self) -> Batch:
        if self._items is None:
            self._items = self._generate(self._cursor)
            if self.prefetch > 0:
                self._prefetcher = _Prefetcher(self._items, self.prefetch)
        batch, cursor = self._prefetcher.get() if self._prefetcher is not None else next(self._items)
        self._cursor = cursor
        return batch

    def __len__(self) -> int:
        """Micro-batches per rank in one pass (val only; train is infinite)."""
        if self.split != "val":
            raise TypeError("the train loader is infinite; it has no len()")
        return self._val_steps() * self.micro_batches_per_step

    def _restart(self, cursor: Cursor) -> None:
        self.close()
        self._cursor = cursor

    def close(self) -> None:
        """Stop the prefetch thread (the loader restarts it on the next batch)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._prefetcher, self._items = None, None

    def fresh(self) -> "Loader":
        """A new loader with the same settings, at the beginning of the stream."""
        return type(self)(self.spec, rank=self.rank, world_size=self.world_size,
                          micro_batch_size=self.micro_batch_size, global_batch_size=self.global_batch_size,
                          pad_id=self.pad_id, mask_cross_doc_labels=self.mask_cross_doc_labels, prefetch=self.prefetch)

    @property
    def consumed_samples(self) -> int:
        """Rows of the global stream consumed by completed global steps."""
        return self._cursor.consumed

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last batch yielded (prefetched batches do not count)."""
        c = self._cursor
        return {"version": STATE_VERSION, "fingerprint": self.spec.fingerprint(), "stream": self.spec.identity(),
                "consumed_samples": c.consumed, "micro_batches_in_step": c.micro, "epoch": c.epoch,
                "epoch_start": c.epoch_start, "world_size": self.world_size,
                "micro_batch_size": self.micro_batch_size, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (also one saved with another world size or micro-batch size)."""
        _check_state(self, state)
        self._restart(Cursor(consumed=state["consumed_samples"], micro=state["micro_batches_in_step"],
                             epoch=state["epoch"], epoch_start=state["epoch_start"]))

    def packing_stats(self) -> dict[str, float]:
        """Utilization, split-document fraction and counts of the current epoch's packing."""
        return {"epoch": self._cursor.epoch, **self.plans.get(self._cursor.epoch)[0].stats()}


def _check_sizes(rank: int, world_size: int, micro: int, global_batch: int) -> None:
    if not 0 <= rank < world_size:
        raise DataError(f"rank={rank} is outside [0, world_size={world_size})")
    if micro < 1 or global_batch % (world_size * micro):
        raise DataError(
            f"global_batch_size={global_batch} is not a multiple of world_size*micro_batch_size="
            f"{world_size}*{micro}; choose a global batch size that is"
        )


def _check_state(loader: Loader, state: dict[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
        raise LoaderStateError(f"loader state version {state.get('version')!r}, this version reads {STATE_VERSION}")
    if state["fingerprint"] != loader.spec.fingerprint():
        ours = loader.spec.identity()
        diff = {k: (v, ours.get(k)) for k, v in state["stream"].items() if ours.get(k) != v}
        raise LoaderStateError(
            f"the loader state was saved for another data stream (saved vs now: {diff}); resume with the "
            "recipe's original data, packer, seq_len and seed, or start a fresh run (a new run.output_dir, or "
            "checkpoint.resume=never, which moves the old run into previous_N/)"
        )
    layout = ("world_size", "micro_batch_size", "global_batch_size")
    if state["micro_batches_in_step"] and any(state[k] != getattr(loader, k) for k in layout):
        raise LoaderStateError(
            f"the loader state was saved in the middle of a global step ({state['micro_batches_in_step']} "
            f"micro-batches in) with {({k: state[k] for k in layout})}; it can only be resumed with the same layout "
            "(checkpoints taken after an optimizer step always can)"
        )
