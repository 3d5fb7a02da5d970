"""Fixtures shared by the trainer tests."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One shard/tokenizer cache for the whole session: prepare runs once."""
    return tmp_path_factory.mktemp("data-cache")
