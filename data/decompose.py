"""Dataset decomposition (Pouransari et al. 2024): documents cut into pieces whose lengths are powers of two.

A document of n tokens is first cut into chunks of `max_len` (the longest bucket); what is left, r < max_len,
is cut along the binary expansion of r, longest piece first (r = 100: 64 + 32 + 4). The bits of r below
`min_len` make one last piece of r mod min_len tokens (at most one per document), which is either kept --
the loader pads it into a row of `min_len` -- or dropped. Every piece holds tokens of one document only,
and the pieces of a document tile it in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Remainder = Literal["pad", "drop"]


@dataclass(frozen=True)
class Pieces:
    """Document pieces: piece p is tokens [start[p], start[p] + length[p]) of document doc[p] (int64 arrays)."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray

    def __len__(self) -> int:
        return len(self.doc)

    def take(self, index: np.ndarray) -> "Pieces":
        """The pieces at `index` (a boolean mask or positions), in that order."""
        return Pieces(self.doc[index], self.start[index], self.length[index])

    @staticmethod
    def concat(parts: list["Pieces"]) -> "Pieces":
        """The pieces of `parts`, one part after the other."""
        if not parts:
            return Pieces(*(np.zeros(0, dtype=np.int64) for _ in range(3)))
        return Pieces(*(np.concatenate([getattr(p, f) for p in parts]).astype(np.int64)
                        for f in ("doc", "start", "length")))

    def halves(self) -> "Pieces":
        """Every piece cut into two of half its length (lengths must be even): what does not fill a whole
        step of one bucket moves to the next shorter bucket without losing or padding a token."""
        half = self.length // 2
        return Pieces(np.repeat(self.doc, 2), np.stack([self.start, self.start + half], 1).ravel(),
                      np.repeat(half, 2))


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def bucket_lengths(min_len: int, max_len: int) -> list[int]:
    """Row lengths of the buckets, shortest first: min_len, 2 min_len, ..., max_len (powers of two)."""
    if not (is_power_of_two(min_len) and is_power_of_two(max_len) and min_len <= max_len):
        raise ValueError(f"bucket lengths need powers of two min_len={min_len} <= max_len={max_len}")
    return [min_len << k for k in range((max_len // min_len).bit_length())]


def decompose(docs: np.ndarray, lengths: np.ndarray, max_len: int, min_len: int = 1,
              remainder: Remainder = "pad") -> tuple[Pieces, int]:
    """(pieces in document order, tokens dropped) of documents `docs` with `lengths` tokens.

    Chunks of `max_len` (which need not be a power of two: the `buckets` packer's plan view accepts any
    seq_len), then the set bits of r = n mod max_len from min_len up, longest first, then r mod min_len as
    one short piece (`pad`) or nothing (`drop`, counted in the tokens dropped)."""
    docs = np.asarray(docs, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    base = (lengths // max_len) * max_len  # where the chunks end and r begins
    rest = lengths - base
    owner = [np.repeat(np.arange(len(docs)), lengths // max_len)]
    first = np.repeat(np.cumsum(lengths // max_len) - lengths // max_len, lengths // max_len)
    start = [(np.arange(len(owner[0])) - first) * max_len]
    size = [np.full(len(owner[0]), max_len, dtype=np.int64)]
    bit = 1 << max(0, (max_len - 1).bit_length() - 1) if max_len > 1 else 0
    while bit >= min_len and bit > 0:  # the pieces of r longest first: bit k starts after the higher set bits
        has = np.flatnonzero(rest & bit)
        owner.append(has)
        start.append(base[has] + (rest[has] & ~(2 * bit - 1)))
        size.append(np.full(len(has), bit, dtype=np.int64))
        bit >>= 1
    tail = rest % min_len
    dropped = 0
    if remainder == "pad":
        has = np.flatnonzero(tail)
        owner.append(has)
        start.append(lengths[has] - tail[has])
        size.append(tail[has])
    else:
        dropped = int(tail.sum())
    owner_all, start_all = np.concatenate(owner), np.concatenate(start)
    order = np.lexsort((start_all, owner_all))  # document order, then position in the document
    return Pieces(docs[owner_all[order]], start_all[order].astype(np.int64),
                  np.concatenate(size)[order].astype(np.int64)), dropped


def split_documents(lengths: np.ndarray, max_len: int, min_len: int = 1) -> int:
    """How many of the documents `decompose` cuts into more than one piece."""
    n = np.asarray(lengths, dtype=np.int64)
    single = (n == max_len) | ((n < max_len) & ((n < min_len) | ((n & (n - 1)) == 0)))
    return int((~single).sum())
