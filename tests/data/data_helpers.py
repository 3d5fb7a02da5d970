"""Helpers shared by the data tests (imported by conftest.py and by test modules)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from slimtrain.data.dataset import TokenDataset
from slimtrain.data.shards import write_shard

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda def class return import from".split()


def make_docs(n: int, seed: int = 0, max_words: int = 120) -> list[str]:
    """`n` documents of varied length (some long, some one word), with some non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
        if i % 7 == 0:
            words.append("naïve café — 東京 🙂")
        docs.append(f"doc {i}: " + " ".join(words))
    return docs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def synthetic_dataset(directory: Path, lengths_per_source: list[list[int]], split: str = "train") -> TokenDataset:
    """A TokenDataset whose tokens are globally unique (1, 2, 3, ...): every token occurrence is traceable."""
    pairs = []
    next_token = 1
    for s, lengths in enumerate(lengths_per_source):
        d = directory / f"source{s}"
        d.mkdir(parents=True)
        lengths_arr = np.asarray(lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths_arr)[:-1]]).astype(np.int64)
        tokens = np.arange(next_token, next_token + int(lengths_arr.sum()), dtype=np.uint32)
        next_token += len(tokens)
        docs = np.stack([starts, lengths_arr, np.full(len(lengths), int(split == "val"))], axis=1)
        pairs.append((d, {"shards": [write_shard(d, 0, tokens, docs, {})]}))
    return TokenDataset(pairs, split)  # type: ignore[arg-type]
