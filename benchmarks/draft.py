"""What draft heads buy on the quickstart model and corpus: acceptance, tau, the base's loss, decoding speed.

    python benchmarks/draft.py                 # 4 runs of the quickstart on 2 CPU ranks, then decoding speed
    python benchmarks/draft.py --steps 60      # shorter runs
    python benchmarks/draft.py --speed-only    # decoding speed of the runs already in --out
    python benchmarks/draft.py --only joint-heads frozen-heads   # train these again, read the others

Runs (same corpus, seed and data order):
  dense         the quickstart model (the baseline, and the frozen base)
  joint-mtp     the quickstart with one MTP module trained jointly (is the base's eval loss any worse?)
  joint-heads   the quickstart with mtp (depth 2), medusa, hydra (3 heads each) and eagle3 (3 steps) jointly
  joint-detached  the same, medusa, hydra and eagle3 with detach_base (only MTP's loss reaches the model's layers)
  frozen-heads  the same heads on the frozen dense model (branched at its last step), self-distilled, as many steps
Acceptance per draft position and tau (tokens per base forward) come from each run's last evaluation (chains of
each head's own length on held-out prompts). Decoding speed: batch-1 greedy tokens/s of plain KV-cache decoding
against speculative decoding with each head (chains; trees for medusa and hydra), on held-out prompts, in the
same process; every speculative output is checked equal to plain greedy. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
KINDS = ("mtp", "medusa", "hydra", "eagle3")
HEADS = [{"kind": "mtp", "depth": 2}, {"kind": "medusa", "num_heads": 3}, {"kind": "hydra", "num_heads": 3},
         {"kind": "eagle3", "steps": 3, "draft_vocab_size": 4096}]
# MTP shapes the model, the other heads follow it without shaping its layers (detach_base).
DETACHED = [HEADS[0], *({**h, "detach_base": True} for h in HEADS[1:])]
EVAL = {"eval_prompts": 8, "eval_rounds": 16}
TREES = {"medusa": [3, 2, 2], "hydra": [3, 2, 2]}


def runs(steps: int, out: Path) -> dict[str, list[str]]:
    """name -> overrides of the quickstart recipe."""
    dense_ckpt = out / "dense" / "checkpoints" / f"step_{steps:08d}"
    return {
        "dense": [],
        "joint-mtp": [f"plugins=[{json.dumps({'type': 'draft', **EVAL, 'heads': [{'kind': 'mtp', 'depth': 1}]})}]"],
        "joint-heads": [f"plugins=[{json.dumps({'type': 'draft', **EVAL, 'heads': HEADS})}]"],
        "joint-detached": [f"plugins=[{json.dumps({'type': 'draft', **EVAL, 'heads': DETACHED})}]"],
        "frozen-heads": [f"plugins=[{json.dumps({'type': 'draft', 'mode': 'frozen', 'targets': 'self_distill', **EVAL, 'heads': HEADS})}]",
                         f"checkpoint.branch_from={dense_ckpt}", f"train.steps={2 * steps}"],
    }


def train(name: str, overrides: list[str], args: argparse.Namespace) -> list[dict]:
    """`slimtrain train` of the quickstart with `overrides`; returns its metrics records."""
    run_dir = Path(args.out) / name
    cmd = [sys.executable, "-m", "slimtrain.trainer.cli", "train", str(REPO / "recipes" / "quickstart.yaml"),
           f"--nproc={args.nproc}", f"train.steps={args.steps}", f"checkpoint.every={args.steps}",
           f"eval.every={args.steps}", f"eval.batches={args.eval_batches}", f"run.output_dir={run_dir}",
           "logging.progress=false", "checkpoint.resume=never", *overrides]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"training {name} failed:\n{proc.stdout[-4000:]}")
    print(f"trained {name} in {time.monotonic() - start:.0f}s", flush=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _records(run_dir: Path) -> list[dict]:
    """The metrics records of a run trained earlier (--only)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def acceptance(records: list[dict]) -> dict:
    """Eval loss, and per head: tau, acceptance and top-1 accuracy per position, from the last evaluation."""
    last = [r for r in records if "eval_loss" in r][-1]
    out = {"eval_loss": round(last["eval_loss"], 4)}
    for kind in KINDS:
        if f"eval/draft/{kind}/tau" not in last:
            continue
        positions = sorted(int(k.rsplit("accept", 1)[1]) for k in last if k.startswith(f"eval/draft/{kind}/accept"))
        out[kind] = {"tau": round(last[f"eval/draft/{kind}/tau"], 3),
                     "accept": [round(last[f"eval/draft/{kind}/accept{j}"], 3) for j in positions],
                     "acc": [round(last[f"eval/draft/{kind}/acc{j}"], 3) for j in positions]}
    return out


def plot_acceptance(quality: dict, out: Path) -> Path:
    """Acceptance per draft position of every head, joint and frozen side by side (tau in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, run in zip(axes, ("joint-heads", "frozen-heads")):
        for kind in KINDS:
            if kind in quality.get(run, {}):
                accept = quality[run][kind]["accept"]
                ax.plot(range(1, len(accept) + 1), accept, marker="o",
                        label=f"{kind} (tau {quality[run][kind]['tau']:.2f})")
        ax.set_title(f"{run} (base eval loss {quality[run]['eval_loss']:.3f})")
        ax.set_xlabel("draft position")
        ax.set_xticks(range(1, 4))
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("rounds accepting drafts 1..k")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _model(run_dir: Path):
    """The run's last checkpoint as our fp32 model with its heads (eval mode), and the run's held-out prompts."""
    from slimtrain.data import prepare
    from slimtrain.modules.plugin_registry import build_plugins
    from slimtrain.modules.transformer import Transformer
    from slimtrain.trainer.export.consolidate import load_checkpoint_for_export
    from slimtrain.trainer.lifecycle.checkpoint import find_resumable
    from slimtrain.trainer.lifecycle.branch import source_weights

    ckpt = load_checkpoint_for_export(run_dir)
    model = Transformer(ckpt.model_cfg.model_copy(update={"attention": "sdpa"}))
    for plugin in build_plugins(ckpt.recipe.plugins):
        plugin.apply(model)
    model.load_state_dict(source_weights(find_resumable(run_dir / "checkpoints")), strict=False)
    val = prepare(ckpt.recipe.data, progress=False).val
    return model.eval(), val


def speed(args: argparse.Namespace) -> dict:
    """Batch-1 decoding tokens/s, plain KV-cache greedy against each head's speculative decoding."""
    from slimtrain.modules.draft.speculate import SpeculativeDecoder
    from slimtrain.modules.transformer.generate import cached_greedy_generate

    torch.set_num_threads(args.threads)
    results = {}
    for run in ("joint-heads", "frozen-heads"):
        model, val = _model(Path(args.out) / run)
        docs = [val.document(i) for i in range(len(val)) if len(val.document(i)) >= args.prompt_tokens]
        prompts = [torch.tensor(d[: args.prompt_tokens], dtype=torch.long)[None] for d in docs[: args.prompts]]
        plain_s, outputs = 0.0, []
        with torch.no_grad():
            for p in prompts:
                start = time.perf_counter()
                outputs.append(cached_greedy_generate(model, p, args.new_tokens))
                plain_s += time.perf_counter() - start
        made = sum(o.shape[1] - p.shape[1] for o, p in zip(outputs, prompts))
        row = {"plain_tokens_per_s": round(made / plain_s, 1)}
        for kind in KINDS:
            head = model.draft[kind]
            for shape, widths in (("chain", None), ("tree", TREES.get(kind))):
                if shape == "tree" and widths is None:
                    continue
                spec_s, tokens, rounds = 0.0, 0, 0
                for p, want in zip(prompts, outputs):
                    decoder = SpeculativeDecoder(model, head.drafter(model), head.positions, widths,
                                                 getattr(head, "hidden_layers", ()))
                    start = time.perf_counter()
                    got, stats = decoder.generate(p, args.new_tokens)
                    spec_s += time.perf_counter() - start
                    if not torch.equal(got, want):
                        raise SystemExit(f"{run} {kind} {shape}: speculative output differs from plain greedy")
                    tokens, rounds = tokens + stats.tokens, rounds + stats.rounds
                row[f"{kind}_{shape}"] = {"tokens_per_s": round(made / spec_s, 1),
                                          "speedup": round(plain_s / spec_s, 3), "tau": round(tokens / rounds, 3)}
        results[run] = row
        print(f"decoding {run}: {json.dumps(row)}", flush=True)
    return {"prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "threads": args.threads, "runs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of every run (and of the frozen heads)")
    parser.add_argument("--nproc", type=int, default=1 if torch.cuda.is_available() else 2)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-draft"))
    parser.add_argument("--speed-only", action="store_true", help="decoding speed of the runs already in --out")
    parser.add_argument("--skip-speed", action="store_true", help="no decoding-speed measurement")
    parser.add_argument("--only", nargs="+", choices=["dense", "joint-mtp", "joint-heads", "joint-detached",
                                                      "frozen-heads"],
                        help="train these runs only; the others' results are read from --out")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result: dict = {"steps": args.steps, "device": "cpu"}
    if not args.speed_only:
        quality = {name: acceptance(train(name, overrides, args) if not args.only or name in args.only
                                    else _records(Path(args.out) / name))
                   for name, overrides in runs(args.steps, Path(args.out)).items()}
        result["quality"] = quality
        result["mtp_eval_loss_minus_dense"] = round(quality["joint-mtp"]["eval_loss"] - quality["dense"]["eval_loss"], 4)
        print(f"plot: {plot_acceptance(quality, Path(args.out) / 'acceptance.png')}", flush=True)
    if not args.skip_speed:
        result["speed"] = speed(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
