"""One epoch of `packer: buckets`: the epoch's documents decomposed into power-of-two pieces, grouped by
length into buckets, and the order in which optimizer steps draw from them.

Every step carries the same token slots, `global_batch_size x seq_len`: a step of bucket L holds
global_batch_size x seq_len / L rows of L tokens, one piece per row. Buckets are filled longest first;
the pieces of a bucket that do not fill a whole step are cut in half and join the next shorter bucket,
so that no token is lost or padded on the way. Only the shortest bucket can end the epoch with a
partial step, whose missing rows are padding (and rows of short remainders are padded within the row,
`remainder: pad`). So every token of every document appears exactly once per epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from slimtrain.data.curriculum import Curriculum, schedule
from slimtrain.data.decompose import Pieces, Remainder, bucket_lengths, decompose, split_documents
from slimtrain.data.packing import PackPlan


@dataclass(frozen=True)
class BucketSpec:
    """The settings of `data.buckets` that shape the stream (the longest bucket is the stream's seq_len)."""

    min_len: int
    curriculum: Curriculum = "grow"
    weights: tuple[float, ...] | None = None
    cycles: int = 1
    remainder: Remainder = "pad"

    def identity(self) -> dict[str, Any]:
        """JSON-serialisable settings (part of the loader state's fingerprint)."""
        ident = asdict(self)
        ident["weights"] = list(self.weights) if self.weights is not None else None
        return ident


@dataclass(frozen=True)
class BucketEpoch:
    """The buckets of one epoch and its step schedule.

    lengths[b]: row length of bucket b (shortest first); plans[b]: its pieces in their shuffled order, one per
    row; order[t]: the bucket of step t; first[t]: the plan row where step t's rows begin; rows_per_step[b]:
    rows of one step of bucket b."""

    lengths: tuple[int, ...]
    plans: tuple[PackPlan, ...]
    order: np.ndarray
    first: np.ndarray
    rows_per_step: tuple[int, ...]
    stats: dict[str, float]

    @property
    def num_steps(self) -> int:
        return len(self.order)

    def row_len(self, step: int) -> int:
        return self.lengths[int(self.order[step])]

    def row(self, step: int, i: int) -> tuple[PackPlan, int] | None:
        """(plan, row) of row i of step `step`; None past the bucket's last piece (padding of a partial step)."""
        plan = self.plans[int(self.order[step])]
        r = int(self.first[step]) + i
        return (plan, r) if r < plan.num_rows else None


def _plan(pieces: Pieces, row_len: int, num_docs: int) -> PackPlan:
    return PackPlan(row_len, np.arange(len(pieces) + 1, dtype=np.int64), pieces.doc, pieces.start, pieces.length,
                    num_docs=num_docs, num_split_docs=0)


def build_bucket_epoch(docs: np.ndarray, lengths: np.ndarray, seq_len: int, global_batch_size: int,
                       spec: BucketSpec, rng: np.random.Generator) -> BucketEpoch:
    """The epoch of documents `docs` (in their seeded order, with `lengths` tokens) cut into buckets from
    spec.min_len to seq_len; shuffles and the curriculum draw from `rng`."""
    pieces, dropped = decompose(docs, lengths, seq_len, spec.min_len, spec.remainder)
    row_lens = bucket_lengths(spec.min_len, seq_len)
    slots = global_batch_size * seq_len
    # A remainder shorter than min_len (remainder: pad) lives in the shortest bucket, padded within its row.
    bucket_of = np.searchsorted(row_lens, pieces.length)
    members: list[Pieces] = [pieces] * len(row_lens)
    carried = Pieces.concat([])
    halved = 0
    for b in range(len(row_lens) - 1, -1, -1):  # longest first: what is left over moves down, halved
        mine = Pieces.concat([pieces.take(bucket_of == b), carried])
        mine = mine.take(rng.permutation(len(mine)))
        per_step = slots // row_lens[b]
        keep = len(mine) if b == 0 else len(mine) // per_step * per_step
        members[b] = mine.take(np.arange(keep))
        left = mine.take(np.arange(keep, len(mine)))
        halved += int(left.length.sum())
        carried = left.halves()
    rows_per_step = tuple(slots // L for L in row_lens)
    counts = [-(-len(m) // r) for m, r in zip(members, rows_per_step)]
    order = schedule(counts, spec.curriculum, spec.cycles, rng, spec.weights)
    first = np.zeros(len(order), dtype=np.int64)
    for b, per_step in enumerate(rows_per_step):
        at = np.flatnonzero(order == b)
        first[at] = np.arange(len(at)) * per_step
    plans = tuple(_plan(m, L, len(docs)) for m, L in zip(members, row_lens))
    split = split_documents(lengths, seq_len, spec.min_len) / max(1, len(docs))
    stats = _stats(members, row_lens, counts, order, slots, seq_len, int(lengths.sum()), dropped, halved, split)
    return BucketEpoch(tuple(row_lens), plans, order, first, rows_per_step, {"documents": len(docs), **stats})


def _stats(members: list[Pieces], row_lens: list[int], counts: list[int], order: np.ndarray, slots: int,
           seq_len: int, total_tokens: int, dropped: int, halved: int, split_fraction: float) -> dict[str, Any]:
    """What the decomposition did: how many steps, rows and tokens each length got, what was padded or dropped
    and the attention cost of the epoch's rows against rows of seq_len."""
    tokens = sum(int(m.length.sum()) for m in members)
    steps = len(order)
    # Causal attention of a full row of L: L(L+1)/2 query-key pairs, so per token slot (L+1)/2; a step's slots
    # are constant, so the epoch's mean is that of (L+1)/2 over steps, against (seq_len+1)/2 for a row of seq_len.
    attention = float(np.mean([(row_lens[b] + 1) / (seq_len + 1) for b in order])) if steps else 0.0
    return {
        "steps": steps, "rows": sum(len(m) for m in members), "tokens": tokens,
        "tokens_per_step": slots, "utilization": tokens / max(1, steps * slots),
        "split_fraction": split_fraction,
        "padded_fraction": 1.0 - tokens / max(1, steps * slots),
        "dropped_fraction": dropped / max(1, total_tokens), "halved_fraction": halved / max(1, total_tokens),
        "attention_vs_full_rows": attention,
        "buckets": {str(L): {"steps": c, "rows": len(m), "tokens": int(m.length.sum())}
                    for L, c, m in zip(row_lens, counts, members)},
    }
