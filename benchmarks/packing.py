"""Packing benchmark on the python-stdlib corpus: concat vs bfd vs pad, side by side in one run.

For seq_len 2048 and 8192 it prints, per packer, slot utilization (real tokens / slots), the fraction
of documents split across rows, and packing throughput (tokens/s, one core: the packers are numpy plus
a Python loop over (size, room) groups, no threads). It also times `prepare` (tokenizing the corpus
into shards with 1 and with N worker processes) and building batches, and ends with one JSON line.

    python benchmarks/packing.py [--workers N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from slimtrain.data.config import DataConfig
from slimtrain.data.packing import pack

# The loader and pipeline (torch, transformers) are imported inside the functions: prepare's spawn
# workers re-import this module, and should not pay for them.

PACKERS = ("concat", "bfd", "pad")
SEQ_LENS = (2048, 8192)


def _config(**kw: object) -> DataConfig:
    # The quickstart's data block: the shards and tokenizer are shared with it through the cache.
    base = {"sources": [{"type": "python-stdlib"}], "tokenizer": {"train": {"vocab_size": 8192}}, "seq_len": 2048}
    return DataConfig(**{**base, **kw})


def time_prepare(tokenizer_dir: Path, workers: int, fast: bool = True) -> dict:
    """Tokenize the whole corpus into a fresh cache with `workers` processes; tokens/s overall and per worker.
    `fast=False` uses HF's encoder instead of slimtrain's exact fast path (the baseline)."""
    from slimtrain.data.pipeline import prepare

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = {"path": str(tokenizer_dir), "fast_encode": fast}
        cfg = _config(tokenizer=tokenizer, cache_dir=tmp, num_workers=workers, shard_size_mb=2.0)
        start = time.perf_counter()
        prepared = prepare(cfg, progress=False)
        seconds = time.perf_counter() - start
    tokens = prepared.manifest["counts"]["tokens"]
    # The shard phase (worker start-up, reading, tokenizing, writing) without the one-off tokenizer load and
    # source listing: what a corpus larger than this one runs at.
    shard_s = sum(s["prepare"]["seconds"] for s in prepared.manifest["sources"])
    return {"workers": workers, "encoder": "fast" if fast else "hf", "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": tokens / seconds, "shard_seconds": round(shard_s, 2),
            "shard_tokens_per_s_per_worker": tokens / shard_s / workers}


def time_packing(lengths: np.ndarray, seq_len: int, repeats: int) -> dict[str, dict]:
    """Utilization, split fraction and best-of-`repeats` throughput of every packer on one document order."""
    docs = np.random.default_rng(0).permutation(len(lengths))
    results = {}
    for name in PACKERS:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            plan = pack(name, docs, lengths[docs], seq_len, buffer_docs=1_000_000)
            best = min(best, time.perf_counter() - start)
        results[name] = {"utilization": plan.utilization, "split_fraction": plan.split_fraction,
                         "rows": plan.num_rows, "tokens_per_s": plan.num_tokens / best}
    return results


def time_batches(prepared, seq_len: int, rows: int = 512) -> float:  # noqa: ANN001
    """Tokens/s of building Batches (gather from the memory-mapped shards, labels, positions, doc ids)."""
    from slimtrain.data.loader import Loader, StreamSpec

    spec = StreamSpec(prepared.train, "bfd", seq_len, None, 0, 1_000_000)
    loader = Loader(spec, rank=0, world_size=1, micro_batch_size=8, global_batch_size=8, pad_id=0, prefetch=0)
    next(loader)  # packs epoch 0 outside the timing
    start = time.perf_counter()
    tokens = sum(next(loader).num_tokens for _ in range(rows // 8))
    return tokens / (time.perf_counter() - start)


def _table(packing: dict[int, dict[str, dict]], frac_long: dict[int, float]) -> str:
    lines = [f"{'seq_len':>7}  {'packer':<7} {'utilization':>11} {'docs split':>10} {'docs > S':>9} "
             f"{'rows':>7} {'M tokens/s':>10}"]
    for seq_len, by_packer in packing.items():
        for name, r in by_packer.items():
            lines.append(f"{seq_len:>7}  {name:<7} {r['utilization']:>11.2%} {r['split_fraction']:>10.2%} "
                         f"{frac_long[seq_len]:>9.2%} {r['rows']:>7,} {r['tokens_per_s'] / 1e6:>10,.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="prepare workers for the parallel run")
    parser.add_argument("--repeats", type=int, default=5, help="packing repeats (the best is reported)")
    parser.add_argument("--skip-prepare-timing", action="store_true", help="do not time prepare from scratch")
    args = parser.parse_args()
    from slimtrain.data.pipeline import prepare

    prepared = prepare(_config(), progress=True)  # trains the tokenizer and writes shards once (cached)
    lengths = prepared.train.doc_len.astype(np.int64)
    print(f"corpus: python-stdlib, {len(lengths):,} train documents, {int(lengths.sum()):,} tokens "
          f"(vocab {prepared.tokenizer.vocab_size})\n")
    packing = {s: time_packing(lengths, s, args.repeats) for s in SEQ_LENS}
    frac_long = {s: float((lengths > s).mean()) for s in SEQ_LENS}
    print(_table(packing, frac_long))
    batch_tps = time_batches(prepared, 2048)
    print(f"\nbatch building (bfd, S=2048, 8 rows per batch): {batch_tps / 1e6:.1f} M tokens/s")
    prep = []
    if not args.skip_prepare_timing:
        print()
        for workers in sorted({1, args.workers}):
            for fast in (False, True):
                prep.append(time_prepare(prepared.tokenizer.tokenizer_dir, workers, fast))
                r = prep[-1]
                print(f"prepare, {workers} worker(s), {'fast path ' if fast else 'HF encoder'}: {r['tokens']:,} tokens "
                      f"in {r['seconds']:.1f} s = {r['tokens_per_s'] / 1e6:.2f} M tokens/s; shard phase "
                      f"{r['shard_seconds']:.1f} s = {r['shard_tokens_per_s_per_worker'] / 1e6:.2f} M tokens/s per worker")
            print(f"  fast path / HF encoder with {workers} worker(s): "
                  f"{prep[-1]['tokens_per_s'] / prep[-2]['tokens_per_s']:.2f}x")
    print(json.dumps({
        "corpus": "python-stdlib", "documents": len(lengths), "tokens": int(lengths.sum()),
        "packing": {str(s): {n: {k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()}
                             for n, r in by_packer.items()} for s, by_packer in packing.items()},
        "fraction_docs_longer_than_S": {str(s): round(f, 6) for s, f in frac_long.items()},
        "batch_tokens_per_s": round(batch_tps), "prepare": prep,
    }))


if __name__ == "__main__":  # spawn-safe: prepare's worker processes re-import this module
    main()
