"""Fixtures for the data tests: small synthetic corpora, a tiny trained tokenizer, synthetic shards."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

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


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE trained on the synthetic corpus (shared by the session)."""
    from slimtrain.data.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok") / "bpe"
    return train_bpe(make_docs(300), 400, out, progress=False)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A jsonl corpus of 240 documents plus 3 empty ones."""
    records = [{"text": t, "id": i} for i, t in enumerate(make_docs(240))]
    records[10:10] = [{"text": "", "id": -1}, {"text": "   \n", "id": -2}, {"text": None, "id": -3}]
    return write_jsonl(tmp_path / "corpus" / "docs.jsonl", records)


@pytest.fixture
def data_config(tmp_path: Path, corpus: Path, tokenizer_dir: Path) -> Callable[..., "object"]:
    """Factory of DataConfigs over `corpus` with the session tokenizer; keyword arguments override fields."""
    from slimtrain.data.config import DataConfig

    def make(**overrides: object) -> DataConfig:
        base = {
            "sources": [{"type": "files", "paths": [str(corpus)]}],
            "tokenizer": {"path": str(tokenizer_dir)},
            "seq_len": 64,
            "cache_dir": str(tmp_path / "cache"),
            "val_fraction": 0.1,
            "num_workers": 1,
            "shard_size_mb": 0.004,  # ~4 kB of text per shard: several shards from a tiny corpus
        }
        return DataConfig(**{**base, **overrides})

    return make


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


@pytest.fixture
def unique_dataset(tmp_path: Path) -> Callable[..., TokenDataset]:
    """Factory: synthetic_dataset(lengths_per_source) under tmp_path."""
    counter = iter(range(1000))
    return lambda lengths, split="train": synthetic_dataset(tmp_path / f"ds{next(counter)}", lengths, split)
