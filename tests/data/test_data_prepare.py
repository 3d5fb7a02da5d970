"""prepare: shards and manifest, resumability, parallel workers, and every bad input with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slimtrain.data import shards as shards_mod
from slimtrain.data.errors import ShardError, SourceError, TokenizerError
from slimtrain.data.pipeline import prepare
from slimtrain.data.shards import token_dtype
from slimtrain.data.tokenizer import train_bpe

from data_helpers import make_docs, write_jsonl


def _npy_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.npy")) if root.exists() else []


def test_prepare_writes_shards_manifest_and_splits(data_config) -> None:
    cfg = data_config()
    prepared = prepare(cfg, progress=False)
    src = prepared.manifest["sources"][0]
    counts = src["counts"]
    assert counts["documents"] == 240 and counts["skipped_empty"] == 3
    assert counts["train_documents"] + counts["val_documents"] == 240
    assert 5 <= counts["val_documents"] <= 45  # val_fraction 0.1, chosen by document hash
    assert src["dtype"] == "uint16" and len(src["shards"]) > 3
    assert src["tokenizer"]["hash"] == prepared.tokenizer.hash
    for meta in src["shards"]:
        tokens = np.load(Path(src["directory"]) / f"{meta['name']}.tokens.npy", mmap_mode="r")
        assert len(tokens) == meta["tokens"] and tokens.dtype == np.uint16
    assert len(prepared.train) == counts["train_documents"] and prepared.train.num_tokens == counts["train_tokens"]
    # Every document ends with EOS and decodes back to its text.
    texts = set(make_docs(240))
    tok = prepared.tokenizer
    for i in range(0, len(prepared.train), 37):
        doc = prepared.train.document(i)
        assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]
        assert tok.decode(doc[:-1]) in texts


def test_validation_split_is_stable_across_shard_sizes_and_workers(data_config) -> None:
    a = prepare(data_config(), progress=False)
    b = prepare(data_config(shard_size_mb=0.05, num_workers=2, cache_dir=str(Path(a.directories[0]).parent / "b")),
                progress=False)
    decode = lambda ds, tok: sorted(tok.decode(ds.document(i)) for i in range(len(ds)))  # noqa: E731
    assert decode(a.val, a.tokenizer) == decode(b.val, b.tokenizer)
    np.testing.assert_array_equal(np.sort(a.train.doc_len), np.sort(b.train.doc_len))


def test_rerun_skips_complete_work(data_config) -> None:
    cfg = data_config()
    first = prepare(cfg, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in _npy_files(first.directories[0])}
    second = prepare(cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in _npy_files(second.directories[0])} == stamps
    assert second.manifest == first.manifest


def test_interrupted_prepare_leaves_no_complete_looking_shard_and_resumes(data_config, monkeypatch) -> None:
    cfg = data_config()
    real = shards_mod.atomic_write_bytes

    def crash_on_shard_3(path: Path, data: bytes) -> None:
        if path.name == "shard-00003.json":
            raise KeyboardInterrupt  # killed after the arrays, before the shard's .json
        real(path, data)

    monkeypatch.setattr(shards_mod, "atomic_write_bytes", crash_on_shard_3)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    monkeypatch.undo()
    directory = next(Path(cfg.cache_dir).glob("docs-*"))
    assert not (directory / "manifest.json").exists()
    assert sorted(p.name for p in directory.glob("shard-*.json")) == [f"shard-0000{i}.json" for i in range(3)]
    kept = {p: p.stat().st_mtime_ns for p in directory.glob("shard-0000[012].*")}
    prepared = prepare(cfg, progress=False)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # complete shards were not redone
    clean = prepare(cfg.model_copy(update={"cache_dir": Path(cfg.cache_dir).parent / "clean"}), progress=False)
    strip = lambda m: [(s["name"], s["tokens_file"]["sha256"]) for s in m["sources"][0]["shards"]]  # noqa: E731
    assert strip(prepared.manifest) == strip(clean.manifest)


def test_truncated_or_corrupted_shard_is_detected_through_the_manifest(data_config) -> None:
    cfg = data_config()
    prepared = prepare(cfg, progress=False)
    path = prepared.directories[0] / "shard-00001.tokens.npy"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ShardError, match=r"shard-00001.tokens.npy has \d+ bytes.*truncated.*slimtrain data prepare"):
        prepare(cfg, progress=False)
    path.write_bytes(data[:-2] + bytes([data[-2] ^ 1]) + data[-1:])
    with pytest.raises(ShardError, match="shard-00001.tokens.npy does not match its sha256"):
        prepare(cfg, progress=False)


def test_manifest_from_another_tokenizer_is_refused(data_config, tmp_path) -> None:
    tok_dir = train_bpe(make_docs(100, seed=1), 300, tmp_path / "tok", progress=False)
    cfg = data_config(tokenizer={"path": str(tok_dir)})
    prepare(cfg, progress=False)
    import shutil

    shutil.rmtree(tok_dir)
    train_bpe(make_docs(100, seed=2), 290, tok_dir, progress=False)  # retrained in place
    with pytest.raises(ShardError, match=r"written with tokenizer .* --rebuild"):
        prepare(cfg, progress=False)
    rebuilt = prepare(cfg, progress=False, rebuild=True)
    assert rebuilt.manifest["sources"][0]["tokenizer"]["hash"] == rebuilt.tokenizer.hash
    assert rebuilt.tokenizer.vocab_size == 290


def test_vocab_too_large_for_dtype() -> None:
    assert token_dtype(65536, "auto") == np.uint16 and token_dtype(65537, "auto") == np.uint32
    with pytest.raises(TokenizerError, match=r"token_dtype='uint16' cannot hold token ids up to 69999.*uint32"):
        token_dtype(70000, "uint16")


def test_invalid_utf8_names_file_and_line_and_writes_nothing(data_config, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    cfg = data_config(sources=[{"type": "files", "paths": [str(bad)]}])
    with pytest.raises(SourceError, match=r"bad.jsonl: line 3, byte 14 is not valid UTF-8.*iconv"):
        prepare(cfg, progress=False)
    assert _npy_files(Path(cfg.cache_dir)) == []


def test_missing_text_field_lists_the_fields(data_config, tmp_path) -> None:
    path = write_jsonl(tmp_path / "other.jsonl", [{"content": "x", "id": 1}])
    cfg = data_config(sources=[{"type": "files", "paths": [str(path)]}])
    with pytest.raises(SourceError, match=r"no field 'text'.*\['content', 'id'\].*text_field"):
        prepare(cfg, progress=False)
    ok = prepare(data_config(sources=[{"type": "files", "paths": [str(path)], "text_field": "content"}]), progress=False)
    assert ok.manifest["counts"]["documents"] == 1


def test_unmatched_glob_and_unknown_extension(data_config, tmp_path) -> None:
    with pytest.raises(SourceError, match=r"paths: '.*nothing-\*.jsonl' matches no file"):
        prepare(data_config(sources=[{"type": "files", "paths": [str(tmp_path / "nothing-*.jsonl")]}]), progress=False)
    odd = tmp_path / "x.csv"
    odd.write_text("a,b\n")
    with pytest.raises(SourceError, match=r"extension '.csv'.*set `format`"):
        prepare(data_config(sources=[{"type": "files", "paths": [str(odd)]}]), progress=False)


def test_parquet_text_and_arrow_files(data_config, tmp_path) -> None:
    import datasets

    docs = make_docs(30, seed=3)
    ds = datasets.Dataset.from_dict({"body": docs, "n": list(range(30))})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "arrow"))
    (tmp_path / "d.txt").write_text("\n".join(d.replace("\n", " ") for d in docs) + "\n\n", encoding="utf-8")
    cfg = data_config(sources=[
        {"type": "files", "paths": [str(tmp_path / "d.parquet")], "text_field": "body"},
        {"type": "files", "paths": [str(tmp_path / "d.txt")]},
        {"type": "files", "paths": [str(tmp_path / "arrow" / "*.arrow")], "text_field": "body"},
    ])
    prepared = prepare(cfg, progress=False)
    assert [s["counts"]["documents"] for s in prepared.manifest["sources"]] == [30, 30, 30]
    assert prepared.manifest["sources"][1]["counts"]["skipped_empty"] == 1  # the trailing blank line


def test_add_bos_starts_every_document(data_config, tokenizer_dir) -> None:
    prepared = prepare(data_config(tokenizer={"path": str(tokenizer_dir), "add_bos": True}), progress=False)
    bos, eos = prepared.tokenizer.bos_id, prepared.tokenizer.eos_id
    assert bos is not None and all(
        prepared.train.document(i)[0] == bos and prepared.train.document(i)[-1] == eos for i in range(len(prepared.train))
    )


def test_manifest_is_json_with_counts_and_checksums(data_config) -> None:
    prepared = prepare(data_config(), progress=False)
    manifest = json.loads((prepared.directories[0] / "manifest.json").read_text())
    assert manifest["format"] == "slimtrain-shards/1"
    assert {"hash", "vocab_size", "eos_id"} <= set(manifest["tokenizer"])
    assert manifest["source"]["fingerprint"] and manifest["counts"]["tokens"] > 0
    assert all(len(s["tokens_file"]["sha256"]) == 64 and s["tokens_file"]["bytes"] > 0 for s in manifest["shards"])


def test_hub_source_reads_a_dataset_repository_layout(data_config, tmp_path) -> None:
    # The `hub` source goes through datasets.load_dataset(name, ...); a local directory laid out like a
    # Hub dataset repository exercises the same path without network access.
    repo = tmp_path / "repo"
    write_jsonl(repo / "train.jsonl", [{"text": t} for t in make_docs(25, seed=4)])
    cfg = data_config(sources=[{"type": "hub", "name": str(repo), "split": "train", "streaming": True}])
    assert prepare(cfg, progress=False).manifest["counts"]["documents"] == 25
    missing = data_config(sources=[{"type": "hub", "name": str(repo), "text_field": "body"}])
    with pytest.raises(SourceError, match=r"no field 'body'.*\['text'\]"):
        prepare(missing, progress=False)


def test_tokenizer_workers_outlive_the_preemption_warning() -> None:
    """SLURM's SIGUSR1 reaches every process of the job step: a pool worker it killed would break prepare."""
    import subprocess
    import sys

    script = (
        "import os, signal\n"
        "from tokenizers import Tokenizer, models\n"
        "from slimtrain.data.encode import init_worker\n"
        "init_worker(Tokenizer(models.BPE()).to_str())\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "print('alive')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc.stderr


def test_token_counts_cover_the_split_documents_only(tmp_path) -> None:
    """Frequencies for a draft vocabulary: every token of the split's documents counted once; a cap
    stops after that many tokens in document order."""
    import numpy as np
    from data_helpers import synthetic_dataset

    train = synthetic_dataset(tmp_path, [[3, 5], [4]], split="train")
    wanted = np.concatenate([train.document(i) for i in range(len(train))])
    counts = train.token_counts(vocab_size=int(wanted.max()) + 5)
    assert counts.sum() == len(wanted) == train.num_tokens
    assert (counts[wanted] == 1).all()
    capped = train.token_counts(vocab_size=int(wanted.max()) + 5, max_tokens=4)
    assert capped.sum() == 4 and (capped[wanted[:4]] == 1).all()
