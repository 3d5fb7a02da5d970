"""A prepare that fails part-way through a source removes what it wrote: no shards without a manifest stay behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import make_docs, write_jsonl

from slimtrain.data import prepare
from slimtrain.data.errors import SourceError


def test_a_bad_value_in_the_middle_of_a_source_leaves_no_shard(data_config, tmp_path: Path) -> None:
    records = [{"text": t} for t in make_docs(400)]
    records[200] = {"text": 12345}
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    cfg = data_config(sources=[{"type": "files", "paths": [str(path)]}])
    with pytest.raises(SourceError, match=r"mixed.jsonl: field 'text' holds int, not text"):
        prepare(cfg, progress=False)
    assert not list(Path(cfg.cache_dir).glob("mixed-*")), "the failed prepare left its shards"
    records[200] = {"text": "fixed"}
    write_jsonl(path, records)
    prepared = prepare(cfg, progress=False)  # the fixed file prepares, into a directory of its own
    assert prepared.manifest["counts"]["documents"] == 400
    assert [p.name for p in Path(cfg.cache_dir).glob("mixed-*")] == [prepared.directories[0].name]
