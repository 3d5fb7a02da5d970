"""Fixtures for the data tests: small synthetic corpora, a tiny trained tokenizer, synthetic shards."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from data_helpers import make_docs, synthetic_dataset, write_jsonl

from slimtrain.data.dataset import TokenDataset


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE trained on the synthetic corpus (shared by the session)."""
    from slimtrain.data.tokenizer import train_bpe

    out = tmp_path_factory.mktemp("tok") / "bpe"
    return train_bpe(make_docs(300), 320, out, progress=False)


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




@pytest.fixture
def unique_dataset(tmp_path: Path) -> Callable[..., TokenDataset]:
    """Factory: synthetic_dataset(lengths_per_source) under tmp_path."""
    counter = iter(range(1000))
    return lambda lengths, split="train": synthetic_dataset(tmp_path / f"ds{next(counter)}", lengths, split)
