"""Tokenize one shard's documents and write the shard: the work each prepare worker process does.

Everything here is importable without side effects (spawn-safe): a worker process receives the
serialised tokenizer once through `init_worker`, then one `ShardTask` per shard.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimtrain.data.shards import write_shard

_TOKENIZER: Any = None


@dataclass(frozen=True)
class EncodeSettings:
    """What every shard of a source shares: ids to add, dtype, validation split."""

    eos_id: int
    bos_id: int | None  # None: no BOS
    dtype: str
    val_fraction: float
    tokenizer_hash: str


@dataclass(frozen=True)
class ShardTask:
    """One unit of parallel work: the documents of shard `index`."""

    directory: str
    index: int
    texts: list[str]
    settings: EncodeSettings


def init_worker(tokenizer_json: str, single_thread: bool = True) -> None:
    """Process initializer: one single-threaded tokenizer per worker (the workers are the parallelism)."""
    global _TOKENIZER
    if single_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_str(tokenizer_json)


def is_validation(text: str, val_fraction: float) -> bool:
    """Held out iff the document's 64-bit blake2b hash falls below `val_fraction`: stable across runs and workers."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


def encode_documents(texts: list[str], s: EncodeSettings) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, docs[n, 3] = start, length, is_val) for `texts`, each ending with EOS (and starting with BOS)."""
    encodings = _TOKENIZER.encode_batch_fast(texts, add_special_tokens=False)
    head = 0 if s.bos_id is None else 1
    lengths = np.fromiter((len(e.ids) + head + 1 for e in encodings), dtype=np.int64, count=len(texts))
    starts = np.zeros(len(texts), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    tokens = np.empty(int(lengths.sum()), dtype=s.dtype)
    for start, length, enc in zip(starts.tolist(), lengths.tolist(), encodings):
        tokens[start + head : start + length - 1] = enc.ids
    tokens[starts + lengths - 1] = s.eos_id
    if head:
        tokens[starts] = s.bos_id
    val = np.fromiter((is_validation(t, s.val_fraction) for t in texts), dtype=np.int64, count=len(texts))
    return tokens, np.stack([starts, lengths, val], axis=1)


def encode_shard(task: ShardTask) -> dict:
    """Tokenize and write one shard; returns its manifest entry."""
    tokens, docs = encode_documents(task.texts, task.settings)
    extra = {"tokenizer_hash": task.settings.tokenizer_hash, "text_chars": sum(len(t) for t in task.texts)}
    return write_shard(Path(task.directory), task.index, tokens, docs, extra)
