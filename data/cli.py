"""`slimtrain data ...` subcommands: tokenizer, prepare, stats. Wired into the main CLI by `add_commands`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from slimtrain.data.config import DataConfig, FilesSource, PythonStdlibSource

LoadDataConfig = Callable[[str, list[str]], DataConfig]


def _source_configs(specs: list[str], text_field: str) -> list[PythonStdlibSource | FilesSource]:
    """`python-stdlib` becomes the built-in source; every other argument is a file path or glob."""
    sources: list[PythonStdlibSource | FilesSource] = []
    paths = [s for s in specs if s != "python-stdlib"]
    if "python-stdlib" in specs:
        sources.append(PythonStdlibSource(type="python-stdlib"))
    if paths:
        sources.append(FilesSource(type="files", paths=paths, text_field=text_field))
    return sources


def cmd_tokenizer(args: argparse.Namespace) -> int:
    """Train a byte-level BPE on the given sources and save it to OUT."""
    from slimtrain.data.pipeline import _training_texts
    from slimtrain.data.sources import open_source
    from slimtrain.data.tokenizer import load_tokenizer, train_bpe

    sources = [open_source(s, i) for i, s in enumerate(_source_configs(args.source, args.text_field))]
    for src in sources:
        src.check()
    out = Path(args.out)
    if (out / "tokenizer.json").exists() and not args.overwrite:
        print(f"{out} already holds a tokenizer; pass --overwrite to replace it")
        return 1
    if args.overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    train_bpe(_training_texts(sources, args.max_train_bytes), args.vocab_size, out,
              min_frequency=args.min_frequency, progress=not args.no_progress)
    info = load_tokenizer(out, cache_dir=out / ".cache")
    print(f"saved a byte-level BPE with {info.vocab_size} tokens to {out} (eos={info.eos_id}, bos={info.bos_id}, "
          f"pad={info.pad_id}); load it with transformers.AutoTokenizer.from_pretrained({str(out)!r})")
    return 0


def _summary(prepared) -> str:  # noqa: ANN001 -- PreparedData, imported lazily
    lines = [f"tokenizer  {prepared.tokenizer.tokenizer_dir} ({prepared.tokenizer.vocab_size} tokens)"]
    for s in prepared.manifest["sources"]:
        c, p = s["counts"], s["prepare"]
        rate = p["tokens_tokenized"] / p["seconds"] / 1e6 if p["seconds"] and p["tokens_tokenized"] else 0.0
        lines.append(
            f"{s['source']['label']:<24} {c['documents']:>10,} docs {c['tokens']:>14,} tokens "
            f"(val {c['val_documents']:,} docs), skipped {c['skipped_empty']} empty + "
            f"{c['skipped_undecodable']} undecodable, {s['dtype']}, {len(s['shards'])} shards"
            + (f", {rate:.2f} M tok/s with {p['workers']} workers" if rate else "")
            + f"\n{'':<24} {s['directory']}"
        )
    return "\n".join(lines)


def cmd_prepare(args: argparse.Namespace, load: LoadDataConfig) -> int:
    """Tokenize the recipe's sources into shards (skips complete shards; --rebuild starts over)."""
    from slimtrain.data.pipeline import prepare

    cfg = load(args.recipe, args.overrides)
    prepared = prepare(cfg, progress=not args.no_progress, rebuild=args.rebuild)
    print(_summary(prepared))
    return 0


def cmd_stats(args: argparse.Namespace, load: LoadDataConfig) -> int:
    """Print the manifests' counts and the packing statistics of epoch 0 (prepares first if needed)."""
    from slimtrain.data.pipeline import build_loader, prepare

    cfg = load(args.recipe, args.overrides)
    prepared = prepare(cfg, progress=not args.no_progress)
    print(_summary(prepared))
    batch = args.global_batch_size  # only buckets depend on it: a step holds batch x seq_len token slots
    loader = build_loader(prepared, "train", rank=0, world_size=1, micro_batch_size=batch, global_batch_size=batch,
                          seed=args.seed, prefetch=0)
    stats = loader.packing_stats()
    print(f"packing    {cfg.packer} at seq_len {cfg.seq_len}: {stats['rows']:,} rows, utilization "
          f"{stats['utilization']:.2%}, documents split {stats['split_fraction']:.2%}")
    if "buckets" in stats:
        per = ", ".join(f"{n}: {b['steps']:,} steps {b['tokens'] / max(1, stats['tokens']):.1%} of tokens"
                        for n, b in stats["buckets"].items())
        print(f"buckets    {stats['steps']:,} steps of {batch} x {cfg.seq_len} token slots per epoch ({per}); padded "
              f"{stats['padded_fraction']:.2%}, dropped {stats['dropped_fraction']:.2%}")
    if args.json:
        print(json.dumps({"counts": prepared.manifest["counts"], "packing": stats}))
    return 0


def add_commands(subparsers: argparse._SubParsersAction, load_data_config: LoadDataConfig) -> None:
    """Register `tokenizer`, `prepare` and `stats` under `slimtrain data`."""
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer (HF tokenizers) on sources")
    p.add_argument("out", metavar="OUT", help="directory to save it to (AutoTokenizer.from_pretrained loads it)")
    p.add_argument("--source", action="append", required=True,
                   help="`python-stdlib`, or a file path / glob (jsonl, parquet, txt, arrow); repeatable")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet/arrow files")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size including 3 special tokens")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    p.add_argument("--max-train-bytes", type=int, default=200_000_000, help="train on at most this much text")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tokenizer)

    for name, fn, text in (("prepare", cmd_prepare, "tokenize a recipe's sources into token shards"),
                           ("stats", cmd_stats, "print shard counts and packing statistics of a recipe")):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("recipe", metavar="RECIPE", help="recipe YAML")
        p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.seq_len=1024")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "prepare":
            p.add_argument("--rebuild", action="store_true", help="delete existing shards and tokenize again")
        else:
            p.add_argument("--seed", type=int, default=0, help="seed of the epoch to pack")
            p.add_argument("--global-batch-size", type=int, default=1,
                           help="rows of seq_len per optimizer step (train.global_batch_size: buckets' steps)")
            p.add_argument("--json", action="store_true", help="also print one JSON line")
        p.set_defaults(func=lambda args, fn=fn: fn(args, load_data_config))
