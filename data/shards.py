"""The on-disk token shard format: write one shard atomically, read and verify shards and manifests.

A source directory holds, per shard `shard-NNNNN`:
  `.tokens.npy`  1-D uint16/uint32 token ids of all its documents back to back (memory-mapped when read);
  `.docs.npy`    int64 [n_docs, 3]: (start offset, length, is_validation) per document;
  `.json`        the shard's counts, byte sizes and sha256 checksums, written LAST.
and, once every shard is complete, `manifest.json` (see `write_manifest`). Files are written under a
temporary name and renamed, and the `.json` comes after both arrays: a shard without its `.json`, or
whose sizes disagree with it, is incomplete and is rebuilt; nothing half-written ever looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

from slimtrain.data.errors import ShardError, TokenizerError

FORMAT = "slimtrain-shards/1"
MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 24


def shard_name(index: int) -> str:
    """File stem of shard `index`."""
    return f"shard-{index:05d}"


def token_dtype(vocab_size: int, choice: str) -> np.dtype:
    """The token array dtype for `vocab_size` ids; a choice too small for the vocabulary is an error."""
    if choice == "auto":
        return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
    dtype = np.dtype(choice)
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise TokenizerError(
            f"data.token_dtype={choice!r} cannot hold token ids up to {vocab_size - 1} (vocabulary of {vocab_size}); "
            "set token_dtype: auto or uint32"
        )
    return dtype


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tmp_name(path: Path) -> Path:
    """A temporary sibling of `path`, unique per host and process."""
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename."""
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_shard(directory: Path, index: int, tokens: np.ndarray, docs: np.ndarray, extra: dict[str, Any]) -> dict:
    """Write shard `index` (tokens, docs, then its .json) atomically; returns its manifest entry."""
    stem = directory / shard_name(index)
    meta = {
        "name": shard_name(index),
        "documents": int(len(docs)),
        "tokens": int(len(tokens)),
        "val_documents": int(docs[:, 2].sum()) if len(docs) else 0,
        "val_tokens": int(docs[docs[:, 2] == 1, 1].sum()) if len(docs) else 0,
        "tokens_file": _save_npy(stem.with_name(stem.name + ".tokens.npy"), tokens),
        "docs_file": _save_npy(stem.with_name(stem.name + ".docs.npy"), docs),
        **extra,
    }
    atomic_write_bytes(stem.with_name(stem.name + ".json"), json.dumps(meta, indent=1).encode())
    return meta


def _files(directory: Path, meta: dict) -> list[tuple[Path, dict]]:
    return [
        (directory / f"{meta['name']}.tokens.npy", meta["tokens_file"]),
        (directory / f"{meta['name']}.docs.npy", meta["docs_file"]),
    ]


def shard_problem(directory: Path, meta: dict, checksums: bool) -> str | None:
    """Why the shard described by `meta` is not intact (missing, truncated, corrupted), or None."""
    for path, expect in _files(directory, meta):
        if not path.exists():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expect["bytes"]:
            return f"{path} has {size} bytes, the manifest records {expect['bytes']} (truncated or modified)"
        if checksums and sha256_file(path) != expect["sha256"]:
            return f"{path} does not match its sha256 in the manifest (corrupted or modified)"
    return None


def complete_shard(directory: Path, index: int) -> dict | None:
    """The manifest entry of shard `index` if it was completely written (checksums verified), else None."""
    meta_path = directory / f"{shard_name(index)}.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    return meta if shard_problem(directory, meta, checksums=True) is None else None


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write `manifest.json` atomically: its presence means every listed shard is complete."""
    atomic_write_bytes(directory / MANIFEST, json.dumps({"format": FORMAT, **manifest}, indent=1).encode())


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a source directory, or None when prepare has not completed there."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e}); delete {directory} and run `slimtrain data prepare` again") from e
    if manifest.get("format") != FORMAT:
        raise ShardError(
            f"{path}: format {manifest.get('format')!r}, this version reads {FORMAT!r}; delete {directory} and run "
            "`slimtrain data prepare` again"
        )
    return manifest


def verify_shards(directory: Path, manifest: dict, checksums: bool) -> None:
    """Raise ShardError naming the first shard that is missing, truncated or corrupted."""
    for meta in manifest["shards"]:
        problem = shard_problem(directory, meta, checksums)
        if problem is not None:
            raise ShardError(
                f"{problem}. Fix: delete {directory / MANIFEST} and that shard's files "
                f"({meta['name']}.*), then run `slimtrain data prepare` again (intact shards are kept)"
            )


def open_shard(directory: Path, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """(tokens memmap, docs array) of one shard."""
    tokens = np.load(directory / f"{meta['name']}.tokens.npy", mmap_mode="r")
    docs = np.load(directory / f"{meta['name']}.docs.npy")
    return tokens, docs


def remove_stale_tmp(directory: Path) -> None:
    """Delete temporary files left by an interrupted prepare (call only while holding the directory lock)."""
    for path in directory.glob("*.tmp-*"):
        path.unlink(missing_ok=True)
