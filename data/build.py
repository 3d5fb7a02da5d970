"""`prepare` for one source: tokenize its documents in worker processes into shards plus a manifest.

Resumable: shards are numbered by their position in the source's document stream, so a re-run
re-reads the source, skips every shard already complete on disk and tokenizes only the rest.
Concurrent prepares of the same source serialise on a lock file; the second finds the manifest.
A prepare that fails on bad input (a value found part-way through the source) removes what it wrote, and the
directory when nothing else is in it: no shards without a manifest stay behind under a name no later
prepare will look for.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterator

from slimtrain.core.locks import lock_file, release
from slimtrain.data.config import DataConfig
from slimtrain.data.encode import EncodeSettings, ShardTask, encode_shard, init_worker
from slimtrain.data.errors import ShardError
from slimtrain.data.shards import (
    FORMAT, complete_shard, read_manifest, remove_stale_tmp, token_dtype, verify_shards, write_manifest,
)
from slimtrain.data.sources import DocumentSource, digest
from slimtrain.data.tokenizer import TokenizerInfo

LOCK = ".lock"


def source_dir(cfg: DataConfig, src: DocumentSource, tokenizer_identity: str, add_bos: bool) -> Path:
    """`cache_dir/<label>-<key>`: the key covers everything that changes the shards' content (`add_bos`: whether
    documents start with BOS, as resolved from the recipe and the tokenizer, `TokenizerInfo.add_bos`).

    The tokenizer enters by identity (its path or training spec), not by content hash, so that a
    tokenizer replaced in place is caught by the manifest check instead of silently re-tokenizing.
    """
    key = digest([
        FORMAT, src.fingerprint(), src.cfg.max_documents, tokenizer_identity, add_bos,
        cfg.val_fraction, cfg.shard_size_mb, cfg.token_dtype,
    ])
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", src.label)[:40] or "source"
    return Path(cfg.cache_dir) / f"{slug}-{key[:12]}"


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock on `directory` (a `.lock` file), held for the whole prepare of one source."""
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = lock_file(directory / LOCK)
            break
        except FileNotFoundError:  # a failed prepare removed the directory while we waited: make it again
            continue
    try:
        yield
    finally:
        release(fd)


def remove_attempt(directory: Path, before: set[str]) -> None:
    """After a failed prepare (holding the lock): remove what it wrote, every entry not in `before`; and the
    directory itself when nothing else is left in it, since its name is keyed to the input that failed."""
    for path in directory.iterdir():
        if path.name not in before and path.name != LOCK:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    remove_stale_tmp(directory)
    if [p.name for p in directory.iterdir()] == [LOCK]:
        (directory / LOCK).unlink()  # a prepare waiting on it locks a new one (slimtrain.core.locks)
        directory.rmdir()


def shard_batches(documents: Iterator[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive groups of whole documents of about `max_chars` characters each."""
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """`num_workers: 1` means one core: keep HF tokenizers off its thread pool, and restore the setting after."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def run_tasks(tasks: Iterator[ShardTask], workers: int, tokenizer_json: str, on_done: Callable[[dict], None]) -> None:
    """Run `encode_shard` over `tasks` with `workers` spawn processes (in-process when 1), at most 2 per worker queued."""
    if workers == 1:
        with _single_threaded_tokenizers():
            init_worker(tokenizer_json, single_thread=False)
            for task in tasks:
                on_done(encode_shard(task))
        return
    ctx = multiprocessing.get_context("spawn")  # fork after torch/tokenizers threads started can deadlock
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(tokenizer_json,)) as pool:
        pending: set = set()
        try:
            for task in tasks:
                pending.add(pool.submit(encode_shard, task))
                while len(pending) >= 2 * workers:  # bounded: the source is never read far ahead of the workers
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        on_done(future.result())
            for future in wait(pending).done:
                on_done(future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _check_tokenizer(directory: Path, manifest: dict, tok: TokenizerInfo) -> None:
    built = manifest["tokenizer"]
    if built["hash"] != tok.hash:
        raise ShardError(
            f"{directory / 'manifest.json'} was written with tokenizer {built['hash'][:12]} (vocab {built['vocab_size']}), "
            f"but the recipe's tokenizer has hash {tok.hash[:12]} (vocab {tok.vocab_size}, {tok.tokenizer_dir}): "
            "its token ids would not match. Fix: re-tokenize with `slimtrain data prepare RECIPE --rebuild`, or "
            "point data.tokenizer at the tokenizer these shards were built with"
        )


def _progress(enabled: bool, label: str, total: int | None):  # -> (rich Progress, task id)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]tokenize[/] {task.description}"), BarColumn(),
        TextColumn("{task.completed:,.0f} chars · {task.fields[tokens]:,} tokens · {task.fields[rate]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False,
    )
    return bar, bar.add_task(label, total=total, tokens=0, rate="")


def prepare_source(
    cfg: DataConfig, src: DocumentSource, tok: TokenizerInfo, directory: Path, *, progress: bool = True,
    rebuild: bool = False,
) -> dict:
    """Shards + manifest for one source in `directory` (built if missing); returns the manifest."""
    dtype = token_dtype(tok.vocab_size, cfg.token_dtype)
    with directory_lock(directory):
        if rebuild:
            for path in directory.iterdir():
                if path.name != ".lock":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        manifest = read_manifest(directory)
        if manifest is not None:
            _check_tokenizer(directory, manifest, tok)
            verify_shards(directory, manifest, checksums=cfg.verify_checksums)
            return manifest
        before = {p.name for p in directory.iterdir()}
        try:
            src.check()  # most bad input fails here, before any shard is written
            remove_stale_tmp(directory)
            settings = EncodeSettings(
                eos_id=tok.eos_id, bos_id=tok.bos_id if tok.add_bos else None, dtype=dtype.name,
                val_fraction=cfg.val_fraction, tokenizer_hash=tok.hash, fast_encode=cfg.tokenizer.fast_encode,
            )
            shards, timing = _write_shards(cfg, src, tok, directory, settings, progress)
            write_manifest(directory, _manifest(cfg, src, tok, settings, shards, timing))
        except Exception:
            # Bad input found part-way (a value that is not text): no orphan shards stay behind. An interruption
            # (KeyboardInterrupt, a kill) keeps the complete ones instead, so that a rerun resumes.
            remove_attempt(directory, before)
            raise
        return read_manifest(directory)  # type: ignore[return-value]


def _write_shards(
    cfg: DataConfig, src: DocumentSource, tok: TokenizerInfo, directory: Path, settings: EncodeSettings,
    progress: bool,
) -> tuple[list[dict], dict]:
    results: dict[int, dict] = {}
    total = src.approx_chars() if src.cfg.max_documents is None else None
    bar, task_id = _progress(progress, src.label, total)
    started = time.perf_counter()
    fresh_tokens = 0

    def done(meta: dict) -> None:
        nonlocal fresh_tokens
        results[int(meta["name"].split("-")[1])] = meta
        fresh_tokens += meta["tokens"] if not meta.get("_kept") else 0
        rate = fresh_tokens / max(time.perf_counter() - started, 1e-9)
        tokens = sum(m["tokens"] for m in results.values())
        bar.update(task_id, advance=meta["text_chars"], tokens=tokens, rate=f"{rate / 1e6:.2f} M tok/s")

    def tasks() -> Iterator[ShardTask]:
        max_chars = int(cfg.shard_size_mb * 1e6)
        for index, texts in enumerate(shard_batches(src.documents(), max_chars)):
            kept = complete_shard(directory, index)
            if kept is not None and kept.get("tokenizer_hash") == tok.hash and kept["documents"] == len(texts):
                done({**kept, "_kept": True})  # written by an earlier, interrupted prepare
                continue
            yield ShardTask(str(directory), index, texts, settings)

    with bar:
        run_tasks(tasks(), cfg.resolved_num_workers(), tok.to_json(), done)
    shards = [{k: v for k, v in results[i].items() if k != "_kept"} for i in sorted(results)]
    return shards, {"seconds": round(time.perf_counter() - started, 3), "tokens_tokenized": fresh_tokens,
                    "workers": cfg.resolved_num_workers()}


def _manifest(
    cfg: DataConfig, src: DocumentSource, tok: TokenizerInfo, s: EncodeSettings, shards: list[dict], timing: dict
) -> dict:
    total = lambda key: sum(m[key] for m in shards)  # noqa: E731
    return {
        "source": {"label": src.label, "config": src.cfg.model_dump(mode="json"), "fingerprint": src.fingerprint()},
        "tokenizer": {
            "hash": tok.hash, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "bos_id": s.bos_id,
            "dir": str(tok.tokenizer_dir),
        },
        "dtype": s.dtype,
        "val_fraction": s.val_fraction,
        "shard_size_mb": cfg.shard_size_mb,
        "counts": {
            "documents": total("documents"), "tokens": total("tokens"),
            "train_documents": total("documents") - total("val_documents"),
            "train_tokens": total("tokens") - total("val_tokens"),
            "val_documents": total("val_documents"), "val_tokens": total("val_tokens"),
            "skipped_empty": src.skipped["empty"], "skipped_undecodable": src.skipped["undecodable"],
        },
        "prepare": timing,
        "shards": shards,
    }
