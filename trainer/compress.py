"""`slimtrain compress EXPORT_DIR --text FILE`: turn a context into the embeddings an exported decoder reads in its
place (`modules/compressor/export.py::compress_text`), save them as the `[seq, hidden]` tensor vLLM takes as
`prompt_embeds`, say how many context tokens became how many vectors, and optionally decode greedily from them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from slimtrain.trainer.errors import CheckpointError, SlimtrainError

if TYPE_CHECKING:  # imported where used: the CLI starts without torch
    from slimtrain.modules.transformer import Transformer

VARIANT = "compressor"
TASKS = ("cont", "rec")


def load_decoder(export_dir: Path) -> "Transformer":
    """The plain export (a dense LlamaForCausalLM directory) as our decoder, fp32, eval."""
    from slimtrain.trainer.export.importer import load_dense_export

    return load_dense_export(export_dir, "compress")


def _task(args: argparse.Namespace, trained_with_tasks: bool) -> str | None:
    """The task vector to put after the context: the one asked for, `cont` by default, none for a compressor
    trained without task vectors."""
    if trained_with_tasks:
        return args.task or "cont"
    if args.task is not None:
        raise SlimtrainError(f"--task {args.task}: this compressor was trained without task vectors (config.json "
                             "task_vectors: false); drop --task")
    return None


def _context_ids(tokenizer, path: Path, limit: int) -> list[int]:
    """FILE's tokens, the last `limit` of them when longer (the prompt continues the context's end, as the
    continuation followed the context in training)."""
    if not path.is_file():
        raise SlimtrainError(f"--text {path}: no such file; give a text file holding the context to compress")
    ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
    if not ids:
        raise SlimtrainError(f"--text {path} holds no tokens; give a non-empty context")
    if len(ids) > limit:
        print(f"warning: {path} has {len(ids)} tokens; the compressor trained on contexts of at most {limit} "
              f"(config.json context_tokens): compressing its last {limit}, dropping the first {len(ids) - limit}",
              file=sys.stderr)
        ids = ids[-limit:]
    return ids


def cmd_compress(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from slimtrain.modules.compressor.evaluation import greedy_after
    from slimtrain.modules.compressor.export import compress_text, load_compressor, read_compressor_config

    # Loading, tokenizing, compressing and saving, in that order: every check fails before the output is written.
    export_dir = Path(args.export)
    variant = export_dir / VARIANT
    if not (variant / "config.json").is_file():
        raise CheckpointError(f"{export_dir} has no {VARIANT}/ directory; export a checkpoint of a run trained with "
                              "the compressor plugin (`slimtrain export CKPT OUT`) and point at OUT")
    try:
        config = read_compressor_config(variant)
        compressor = load_compressor(variant, dtype=torch.float32)  # fp32, as the imported decoder
    except (ValueError, FileNotFoundError) as exc:  # not our format, edited, or its tensors missing
        raise CheckpointError(f"{variant}: {exc}") from None
    decoder = load_decoder(_decoder_dir(args, export_dir, config))
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    context = _context_ids(tokenizer, Path(args.text), int(config["context_tokens"]))
    before = tokenizer.encode(args.prefix, add_special_tokens=False) if args.prefix else []
    after = tokenizer.encode(args.prompt, add_special_tokens=False) if args.prompt else []
    task = _task(args, bool(config["task_vectors"]))
    try:
        embeds = compress_text(compressor, decoder, context, before, after, task=task, decoder_name=args.decoder)
    except ValueError as exc:  # a token id outside the decoder's vocabulary, a span the encoder cannot take
        raise SlimtrainError(str(exc)) from None
    slots = embeds.shape[0] - len(before) - len(after)  # the context's vectors and its task vector
    vectors = slots - (task is not None)
    torch.save(embeds.cpu(), args.out)
    extra = f" + 1 <{task.capitalize()}> vector" if task else ""
    print(f"{len(context)} context tokens -> {vectors} vectors{extra} ({len(context) / vectors:.2f}x compression); "
          f"wrote {args.out}: [{embeds.shape[0]}, {embeds.shape[1]}] ({len(before)} prefix + {slots} compressed + "
          f"{len(after)} prompt positions)")
    if args.generate:
        with torch.no_grad():
            tokens = greedy_after(decoder, embeds, args.generate).tolist()
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        print(tokenizer.decode(tokens))
    return 0


def _decoder_dir(args: argparse.Namespace, export_dir: Path, config: dict) -> Path:
    """The decoder the embeddings are for: the export's own, or an extra decoder the compressor trained for."""
    names = list(config["projectors"])
    if args.decoder not in names:
        raise SlimtrainError(f"--decoder {args.decoder}: the compressor has projectors for {names}")
    if args.decoder == "main":
        return export_dir
    if not args.decoder_path:
        raise SlimtrainError(f"--decoder {args.decoder} needs --decoder-path: that decoder's Hugging Face directory "
                             "(the recipe's decoders entry of that name)")
    return Path(args.decoder_path)


def _count(text: str) -> int:
    value = int(text) if text.isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of tokens (0 or more)")
    return value


def add_compress_parser(sub) -> None:
    """`slimtrain compress` on the CLI's subparsers."""
    p = sub.add_parser("compress", help="turn a context into prompt embeddings with an exported compressor")
    p.add_argument("export", help="a directory written by `slimtrain export` of a run with the compressor plugin")
    p.add_argument("--text", required=True, help="a text file: the context to compress")
    p.add_argument("--out", default="compressed.pt", help="where to torch.save the [seq, hidden] embeddings")
    p.add_argument("--prompt", default="", help="text after the compressed context (what the decoder continues)")
    p.add_argument("--decoder", default="main", help="which decoder the embeddings are for: main (the export's "
                   "own) or the name of one of the recipe's extra decoders")
    p.add_argument("--decoder-path", default="", help="with --decoder NAME: that decoder's Hugging Face directory")
    p.add_argument("--prefix", default="", help="uncompressed text before the compressed context (trained with "
                   "the recipe's prefix_tokens > 0: config.json prefix_tokens)")
    p.add_argument("--task", choices=TASKS, default=None, help="the task vector after the context: cont (continue "
                   "it, the default) or rec (rewrite it)")
    p.add_argument("--generate", type=_count, default=0, metavar="N", help="print the decoder's greedy "
                   "continuation of N tokens from the embeddings")
    p.set_defaults(func=cmd_compress)
