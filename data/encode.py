"""Tokenize one shard's documents and write the shard: the work each prepare worker process does.

Everything here is importable without side effects (spawn-safe): a worker process receives the
serialised tokenizer once through `init_worker`, then one `ShardTask` per shard.
"""

from __future__ import annotations

import hashlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimtrain.data.fast_bpe import FastByteLevelEncoder, supports
from slimtrain.data.shards import write_shard

_TOKENIZER: Any = None
_FAST: FastByteLevelEncoder | None = None  # set when the tokenizer is one the exact fast path reproduces


@dataclass(frozen=True)
class EncodeSettings:
    """What every shard of a source shares: ids to add, dtype, validation split."""

    eos_id: int
    bos_id: int | None  # None: no BOS
    dtype: str
    val_fraction: float
    tokenizer_hash: str
    fast_encode: bool = True  # use data.fast_bpe where it applies (same ids as HF, ~4x faster)


@dataclass(frozen=True)
class ShardTask:
    """One unit of parallel work: the documents of shard `index`."""

    directory: str
    index: int
    texts: list[str]
    settings: EncodeSettings


def init_worker(tokenizer_json: str, single_thread: bool = True) -> None:
    """Process initializer: one single-threaded tokenizer per worker (the workers are the parallelism)."""
    global _TOKENIZER, _FAST
    # SLURM's preemption warning (SIGUSR1) reaches every process of the job step; it is for the training
    # process, which checkpoints. Its default action would kill this worker and break the whole pool.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if single_thread:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_str(tokenizer_json)
    _TOKENIZER.no_truncation()  # a tokenizer.json saved with either would silently cut or pad documents
    _TOKENIZER.no_padding()
    _FAST = FastByteLevelEncoder(_TOKENIZER) if supports(_TOKENIZER.to_str()) else None


def encode_ids(texts: list[str], fast: bool = True) -> list[Any]:
    """Token ids of each text without special tokens: the exact fast path where it applies, else HF's encoder."""
    if fast and _FAST is not None:
        return _FAST.encode_batch(texts)
    return [e.ids for e in _TOKENIZER.encode_batch_fast(texts, add_special_tokens=False)]


def is_validation(text: str, val_fraction: float) -> bool:
    """Held out iff the document's 64-bit blake2b hash falls below `val_fraction`: stable across runs and workers."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


def encode_documents(texts: list[str], s: EncodeSettings) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, docs[n, 3] = start, length, is_val) for `texts`, each ending with EOS (and starting with BOS)."""
    encodings = encode_ids(texts, s.fast_encode)
    head = 0 if s.bos_id is None else 1
    lengths = np.fromiter((len(ids) + head + 1 for ids in encodings), dtype=np.int64, count=len(texts))
    starts = np.zeros(len(texts), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    tokens = np.empty(int(lengths.sum()), dtype=s.dtype)
    for start, length, ids in zip(starts.tolist(), lengths.tolist(), encodings):
        tokens[start + head : start + length - 1] = ids
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
