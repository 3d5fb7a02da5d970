"""Packers: turn document lengths into rows of at most `seq_len` tokens (a `PackPlan`).

Packers see document *lengths* only; tokens are gathered lazily when a batch is built. A plan is a
CSR table: row r holds pieces row_ptr[r]:row_ptr[r+1], piece p = tokens [start, start+len) of
document doc[p].

  concat  concatenate in order and cut every seq_len tokens (the common baseline; cuts freely)
  bfd     best-fit decreasing (Ding et al. 2024, "Fewer Truncations Improve Language Modeling"):
          a document longer than seq_len is cut into full rows plus one remainder; nothing else is cut
  pad     one document (or one seq_len piece of a long document) per row
  buckets dataset decomposition (Pouransari et al. 2024): every document cut into pieces whose lengths are
          powers of two (after full rows of seq_len), one piece per row. This plan is the decomposition
          only; training batches rows of one length per step (slimtrain.data.bucket_loader)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from slimtrain.core.registry import Registry
from slimtrain.data.decompose import decompose, split_documents

Packer = Callable[[np.ndarray, np.ndarray, int], "PackPlan"]
PACKERS: Registry = Registry("packer")


@dataclass(frozen=True)
class PackPlan:
    """Rows of pieces, plus what the packer did (for utilization and truncation statistics)."""

    seq_len: int
    row_ptr: np.ndarray  # int64 [rows + 1]
    doc: np.ndarray  # int64 [pieces] document index (into the dataset)
    start: np.ndarray  # int64 [pieces] first token of the piece within its document
    length: np.ndarray  # int64 [pieces]
    num_docs: int
    num_split_docs: int

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.length.sum())

    @property
    def utilization(self) -> float:
        """Real tokens / token slots."""
        return self.num_tokens / max(1, self.num_rows * self.seq_len)

    @property
    def split_fraction(self) -> float:
        """Fraction of documents that were cut across rows."""
        return self.num_split_docs / max(1, self.num_docs)

    def stats(self) -> dict[str, float]:
        """Utilization, split-document fraction and counts, for logs and benchmarks."""
        return {
            "rows": self.num_rows, "documents": self.num_docs, "tokens": self.num_tokens,
            "utilization": self.utilization, "split_fraction": self.split_fraction,
        }


def concat_plans(plans: list[PackPlan]) -> PackPlan:
    """One plan with the rows of `plans` in order."""
    if len(plans) == 1:
        return plans[0]
    offsets = np.cumsum([0] + [len(p.doc) for p in plans[:-1]])
    row_ptr = np.concatenate([[0]] + [p.row_ptr[1:] + off for p, off in zip(plans, offsets)])
    return PackPlan(
        seq_len=plans[0].seq_len, row_ptr=row_ptr,
        doc=np.concatenate([p.doc for p in plans]), start=np.concatenate([p.start for p in plans]),
        length=np.concatenate([p.length for p in plans]),
        num_docs=sum(p.num_docs for p in plans), num_split_docs=sum(p.num_split_docs for p in plans),
    )


def _cut_long(docs: np.ndarray, lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of every document cut at multiples of seq_len: (doc, start, length), in document order."""
    pieces = -(-lengths // seq_len)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    k = np.arange(int(pieces.sum()), dtype=np.int64) - first
    owner = np.repeat(np.arange(len(docs)), pieces)
    start = k * seq_len
    return docs[owner], start, np.minimum(seq_len, lengths[owner] - start)


@PACKERS.register("pad")
def pack_pad(docs: np.ndarray, lengths: np.ndarray, seq_len: int) -> PackPlan:
    """One document per row; a longer document fills consecutive rows."""
    doc, start, length = _cut_long(docs, lengths, seq_len)
    return PackPlan(seq_len, np.arange(len(doc) + 1, dtype=np.int64), doc, start, length,
                    num_docs=len(docs), num_split_docs=int((lengths > seq_len).sum()))


@PACKERS.register("concat")
def pack_concat(docs: np.ndarray, lengths: np.ndarray, seq_len: int) -> PackPlan:
    """Concatenate documents in the given order and cut the stream into rows of seq_len (last row padded)."""
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    doc_starts = ends - lengths
    cuts = np.union1d(doc_starts, np.arange(0, total, seq_len, dtype=np.int64))  # every piece begins at a cut
    owner = np.searchsorted(ends, cuts, side="right")
    length = np.diff(np.append(cuts, total))
    row = cuts // seq_len
    row_ptr = np.searchsorted(row, np.arange(-(-total // seq_len) + 1), side="left").astype(np.int64)
    split = int((np.bincount(owner, minlength=len(docs)) > 1).sum())
    return PackPlan(seq_len, row_ptr, docs[owner], cuts - doc_starts[owner], length, len(docs), split)


@PACKERS.register("buckets")
def pack_buckets(docs: np.ndarray, lengths: np.ndarray, seq_len: int) -> PackPlan:
    """One power-of-two piece per row (rows shorter than seq_len are not padded in this view)."""
    pieces, _ = decompose(docs, lengths, seq_len)
    return PackPlan(seq_len, np.arange(len(pieces) + 1, dtype=np.int64), pieces.doc, pieces.start, pieces.length,
                    num_docs=len(docs), num_split_docs=split_documents(lengths, seq_len))


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Bin of every item under best-fit decreasing; `sizes` must be sorted non-increasing, in [1, capacity].

    Items of equal size are handled as a group: the best-fitting bin (smallest room >= size) takes
    as many as fit, c // size, because what it has left is then smaller than any other room >= size
    -- exactly what item-by-item BFD does. So the Python loop runs once per (size, room) pair, not
    per item, and free rooms are found with one bit scan: bit c of `rooms` is set while some bin
    has exactly c slots free. Ties between bins with equal room go to the most recent one.
    """
    n = len(sizes)
    out = np.empty(n, dtype=np.int64)
    free: dict[int, list[int]] = {}
    rooms = 0
    nbins = 0

    def push(room: int, bins: list[int]) -> None:
        nonlocal rooms
        if room > 0 and bins:
            free.setdefault(room, []).extend(bins)
            rooms |= 1 << room

    if n == 0:
        return out, 0
    group_starts = np.flatnonzero(np.diff(sizes)) + 1
    for lo, hi in zip(np.r_[0, group_starts].tolist(), np.r_[group_starts, n].tolist()):
        size = int(sizes[lo])
        pos = lo
        while pos < hi:
            above = rooms >> size
            if above:  # the tightest existing bin with room >= size
                room = size + (above & -above).bit_length() - 1
                per_bin = room // size
                stack = free[room]
                take = min(len(stack), -(-(hi - pos) // per_bin))
                chosen = stack[len(stack) - take :][::-1]
                del stack[len(stack) - take :]
                if not stack:
                    del free[room]
                    rooms ^= 1 << room
            else:  # no bin fits: open new ones, each taking capacity // size items
                room = capacity
                per_bin = capacity // size
                take = -(-(hi - pos) // per_bin)
                chosen = list(range(nbins, nbins + take))
                nbins += take
            count = min(take * per_bin, hi - pos)
            out[pos : pos + count] = np.repeat(np.asarray(chosen, dtype=np.int64), per_bin)[:count]
            last = count - (take - 1) * per_bin  # items the last chosen bin received
            push(room - per_bin * size, chosen[:-1])
            push(room - last * size, chosen[-1:])
            pos += count
    return out, nbins


@PACKERS.register("bfd")
def pack_bfd(docs: np.ndarray, lengths: np.ndarray, seq_len: int) -> PackPlan:
    """Best-fit decreasing: full rows of long documents, then remainders and short documents binned by BFD."""
    doc, start, length = _cut_long(docs, lengths, seq_len)
    full = length == seq_len
    rest = np.flatnonzero(~full)
    order = rest[np.argsort(-length[rest], kind="stable")]  # ties keep the (seeded) document order
    bins, nbins = best_fit_decreasing(length[order], seq_len)
    num_full = int(full.sum())
    row_of = np.empty(len(doc), dtype=np.int64)
    row_of[np.flatnonzero(full)] = np.arange(num_full)
    row_of[order] = num_full + bins
    by_row = np.argsort(row_of, kind="stable")
    row_ptr = np.searchsorted(row_of[by_row], np.arange(num_full + nbins + 1), side="left").astype(np.int64)
    return PackPlan(seq_len, row_ptr, doc[by_row], start[by_row], length[by_row],
                    num_docs=len(docs), num_split_docs=int((lengths > seq_len).sum()))


def pack(name: str, docs: np.ndarray, lengths: np.ndarray, seq_len: int, buffer_docs: int) -> PackPlan:
    """Pack `docs` (in this order) with the packer `name`, `buffer_docs` documents at a time."""
    packer = PACKERS.get(name)
    docs = np.asarray(docs, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    plans = [packer(docs[i : i + buffer_docs], lengths[i : i + buffer_docs], seq_len)
             for i in range(0, max(1, len(docs)), buffer_docs)]
    return concat_plans(plans)
