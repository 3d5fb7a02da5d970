"""`TokenDataset`: the documents of one split (train or val) over the shards of every source.

Only per-document index arrays live in memory (shard, start, length: 20 bytes a document); tokens
stay in the memory-mapped shard files and are read when a batch is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from slimtrain.data.shards import open_shard
from slimtrain.data.sources import digest

Split = Literal["train", "val"]


class TokenDataset:
    """Documents of `split` from prepared sources, grouped by source in source order."""

    def __init__(self, sources: list[tuple[Path, dict]], split: Split) -> None:
        self.split = split
        self.shards: list[np.ndarray] = []
        shard_ids, starts, lengths, bounds = [], [], [], [0]
        want = 1 if split == "val" else 0
        for directory, manifest in sources:
            count = 0
            for meta in manifest["shards"]:
                tokens, docs = open_shard(directory, meta)
                keep = docs[docs[:, 2] == want]
                shard_ids.append(np.full(len(keep), len(self.shards), dtype=np.int32))
                starts.append(keep[:, 0])
                lengths.append(keep[:, 1])
                self.shards.append(tokens)
                count += len(keep)
            bounds.append(bounds[-1] + count)
        empty = np.zeros(0, dtype=np.int64)
        self.doc_shard = np.concatenate(shard_ids) if shard_ids else empty.astype(np.int32)
        self.doc_start = np.concatenate(starts) if starts else empty
        self.doc_len = np.concatenate(lengths) if lengths else empty
        self.source_bounds = np.asarray(bounds, dtype=np.int64)
        checksums = [[m["tokens_file"]["sha256"] for m in manifest["shards"]] for _, manifest in sources]
        self.fingerprint = digest([split, checksums])

    def __len__(self) -> int:
        return len(self.doc_len)

    @property
    def num_sources(self) -> int:
        """Number of sources (documents of source i are indices source_bounds[i]:source_bounds[i+1])."""
        return len(self.source_bounds) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens in all documents of the split."""
        return int(self.doc_len.sum())

    def source_tokens(self) -> np.ndarray:
        """Tokens per source, int64 [num_sources]."""
        cum = np.concatenate([[0], np.cumsum(self.doc_len)])
        return cum[self.source_bounds[1:]] - cum[self.source_bounds[:-1]]

    def token_counts(self, vocab_size: int, max_tokens: int = 100_000_000) -> np.ndarray:
        """How often each token id occurs in the split's documents, int64 [vocab_size]: over its first
        `max_tokens` tokens in document order (ranking tokens by frequency needs no more)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        pending, held, seen = [], 0, 0
        for i in range(len(self)):
            doc = self.document(i)[: max_tokens - seen]
            pending.append(doc)
            held, seen = held + len(doc), seen + len(doc)
            if held >= 1 << 22 or seen >= max_tokens:  # bincount a few million tokens at a time
                counts += np.bincount(np.concatenate(pending).astype(np.int64), minlength=vocab_size)[:vocab_size]
                pending, held = [], 0
            if seen >= max_tokens:
                break
        if pending:
            counts += np.bincount(np.concatenate(pending).astype(np.int64), minlength=vocab_size)[:vocab_size]
        return counts

    def document(self, index: int) -> np.ndarray:
        """The tokens of document `index` (a read-only view into its shard)."""
        start = int(self.doc_start[index])
        return self.shards[int(self.doc_shard[index])][start : start + int(self.doc_len[index])]
