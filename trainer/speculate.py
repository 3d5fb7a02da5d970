"""`slimtrain speculate EXPORT KIND`: decode a prompt with an exported model and one of its draft heads, and say
what speculation bought: the text, tau, acceptance per draft position, and tokens/s against plain KV-cache
greedy decoding of the same prompt (whose output the speculative one must equal, token for token)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from slimtrain.trainer.errors import CheckpointError

if TYPE_CHECKING:  # imported where used: the CLI starts without torch
    import torch

    from slimtrain.modules.transformer import Transformer

KINDS = ("mtp", "eagle3", "medusa", "hydra")


def load_exported(export_dir: Path, kind: str) -> tuple["Transformer", "torch.nn.Module"]:
    """The plain export as our model (fp32, eval) and its `kind` variant's heads."""
    from slimtrain.modules.draft.export import load_heads
    from slimtrain.trainer.export.importer import load_dense_export

    variant = export_dir / kind
    if not (variant / "config.json").is_file():
        found = [k for k in KINDS if (export_dir / k / "config.json").is_file()]
        raise CheckpointError(f"{export_dir} has no {kind}/ variant; it holds {found or 'no draft heads'} (export a "
                              "checkpoint trained with that head kind)")
    model = load_dense_export(export_dir, "speculate")
    return model, load_heads(variant, kind, model)


def cmd_speculate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from slimtrain.modules.draft.speculate import SpeculativeDecoder
    from slimtrain.modules.transformer.generate import cached_greedy_generate

    export_dir = Path(args.export)
    model, head = load_exported(export_dir, args.kind)
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    ids = torch.tensor([tokenizer.encode(args.prompt)])
    tree = [int(w) for w in args.tree.split(",")] if args.tree else None
    with torch.no_grad():
        start = time.perf_counter()
        plain = cached_greedy_generate(model, ids, args.max_new_tokens)
        plain_s = time.perf_counter() - start
        decoder = SpeculativeDecoder(model, head.drafter(model), head.positions, tree,
                                     getattr(head, "hidden_layers", ()))
        start = time.perf_counter()
        out, stats = decoder.generate(ids, args.max_new_tokens)
        spec_s = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    print(tokenizer.decode(out[0, ids.shape[1]:].tolist()))
    print(f"\n{args.kind}: tau {stats.tau:.2f} tokens per forward over {stats.rounds} rounds; acceptance per draft "
          f"position {', '.join(f'{a:.2f}' for a in stats.acceptance())}")
    print(f"plain KV-cache greedy {new / plain_s:.1f} tokens/s, speculative {new / spec_s:.1f} tokens/s "
          f"({plain_s / spec_s:.2f}x); output identical to greedy: {'yes' if torch.equal(out, plain) else 'NO'}")
    return 0 if torch.equal(out, plain) else 1


def add_speculate(sub) -> None:
    p = sub.add_parser("speculate", help="decode a prompt with an exported model's draft heads (tau, speed)")
    p.add_argument("export", help="a directory written by `slimtrain export` of a run with draft heads")
    p.add_argument("kind", choices=KINDS, help="which head variant drafts")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tree", default=None, help="medusa/hydra: candidates per draft position, e.g. 3,2,2")
    p.set_defaults(func=cmd_speculate)
