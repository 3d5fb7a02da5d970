"""What the context compressor buys on the quickstart model and corpus: gap closed, reconstruction, prefill FLOPs.

    python benchmarks/compressor.py                    # 6 branches of a trained quickstart on 2 CPU ranks
    python benchmarks/compressor.py --steps 60         # shorter branches
    python benchmarks/compressor.py --only pf4-joint   # train this run again, read the others from --out

Every run branches from the same dense quickstart checkpoint (`--base`, trained first when missing) and trains
`--steps` more steps on the same corpus, seed and data order (contexts of 64 tokens, continuations of 64, 20 %
reconstruction, the encoder its first 4 of 6 layers):
  pf2, pf4, pf8, pf16   mean-pooled queries at that pooling factor, frozen decoder (ARC-Encoder's setting)
  pf4-joint             PF 4 with the decoder trained jointly
  memory16              16 ICAE memory tokens per 64-token span (PF 4's vector count), frozen decoder
From each run's last evaluation: the continuation loss without context, with the full context and with the
compressed one, the gap closed, the zeroed- and shuffled-vector controls, reconstruction accuracy (teacher-forced)
and exact match (greedy). Prefill FLOPs: the forward FLOPs of reading a 64-token context through the encoder and
its vectors through the decoder, against reading the 64 tokens through the decoder. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 64
BLOCK = {"type": "compressor", "encoder": {"source": "truncate", "layers": 4}, "context_tokens": CONTEXT,
         "continuation_tokens": 64, "reconstruction_fraction": 0.2}
RUNS = {
    "pf2": {"pooling_factor": 2}, "pf4": {"pooling_factor": 4}, "pf8": {"pooling_factor": 8},
    "pf16": {"pooling_factor": 16}, "pf4-joint": {"pooling_factor": 4, "decoder": "joint"},
    "memory16": {"pooling": "memory", "num_memory_tokens": 16},
}
KEYS = ("loss_none", "loss_full", "loss_comp", "gap_closed", "loss_zeroed", "loss_shuffled", "rec_acc", "rec_exact")


def train(name: str, overrides: list[str], steps: int, args: argparse.Namespace) -> list[dict]:
    """`slimtrain train` of the quickstart with `overrides` up to step `steps`; returns its metrics records."""
    run_dir = Path(args.out) / name
    cmd = [sys.executable, "-m", "slimtrain.trainer.cli", "train", str(REPO / "recipes" / "quickstart.yaml"),
           f"--nproc={args.nproc}", f"train.steps={steps}", f"checkpoint.every={steps}", f"eval.every={steps}",
           f"eval.batches={args.eval_batches}", f"run.output_dir={run_dir}", "logging.progress=false",
           "checkpoint.resume=never", *overrides]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"training {name} failed:\n{proc.stdout[-4000:]}")
    print(f"trained {name} in {time.monotonic() - start:.0f}s", flush=True)
    return _records(run_dir)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def base_checkpoint(args: argparse.Namespace) -> Path:
    """The dense quickstart checkpoint every run branches from (trained here when --base does not exist)."""
    base = Path(args.base)
    if not base.is_dir():
        train("dense", [], args.base_steps, args)
        base = Path(args.out) / "dense" / "checkpoints" / f"step_{args.base_steps:08d}"
    return base


def quality(records: list[dict]) -> dict:
    last = [r for r in records if "eval/compressor/gap_closed" in r][-1]
    return {k: round(last[f"eval/compressor/{k}"], 4) for k in KEYS}


def prefill_flops(pooling_factor: int | None, memory: int | None) -> dict:
    """Forward FLOPs of reading one 64-token context: encoder + the decoder over its vectors (and task vector),
    against the decoder over the 64 tokens (2 x parameters per token plus attention, the quickstart's shapes)."""
    from slimtrain.modules.transformer import ModelConfig
    from slimtrain.trainer.recipe.schema import load_recipe

    recipe = load_recipe(str(REPO / "recipes" / "quickstart.yaml"), ["model.vocab_size=8192"])
    cfg: ModelConfig = recipe.model
    h, q_width, kv_width = cfg.hidden_size, cfg.num_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    params = 2 * h * q_width + 2 * h * kv_width + 3 * h * cfg.intermediate_size  # one layer's matrices

    def forward(tokens: int, layers: int, causal: bool = True) -> float:
        attention = 4 * q_width * tokens * tokens / (2 if causal else 1)  # QK^T and AV
        return layers * (2 * params * tokens + attention)

    vectors = memory if memory is not None else -(-CONTEXT // pooling_factor)
    encoder = forward(CONTEXT + (memory or 0), BLOCK["encoder"]["layers"], causal=False)  # bidirectional
    compressed = encoder + forward(vectors + 1, cfg.num_layers)
    full = forward(CONTEXT, cfg.num_layers)
    return {"vectors": vectors, "decoder_flops_saved": round(1 - forward(vectors + 1, cfg.num_layers) / full, 3),
            "with_encoder_ratio": round(compressed / full, 3)}


def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    factors = [2, 4, 8, 16]
    frozen = [results[f"pf{f}"] for f in factors]
    axes[0].plot(factors, [r["gap_closed"] for r in frozen], marker="o", label="mean pooling, frozen decoder")
    axes[1].plot(factors, [r["rec_acc"] for r in frozen], marker="o", label="mean pooling, frozen decoder")
    for name, marker, label in (("pf4-joint", "s", "PF 4, joint decoder"), ("memory16", "^", "16 memory tokens")):
        axes[0].plot([4], [results[name]["gap_closed"]], marker=marker, linestyle="", label=label)
        axes[1].plot([4], [results[name]["rec_acc"]], marker=marker, linestyle="", label=label)
    shuffled = [(r["loss_none"] - r["loss_shuffled"]) / (r["loss_none"] - r["loss_full"]) for r in frozen]
    axes[0].plot(factors, shuffled, linestyle="--", color="grey", label="shuffled vectors (control)")
    for ax, title in zip(axes, ("gap closed (continuation loss)", "reconstruction accuracy (teacher-forced)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(factors, [str(f) for f in factors])
        ax.set_xlabel("pooling factor")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of every branch")
    parser.add_argument("--base", default=str(REPO / "runs" / "bench-draft" / "dense" / "checkpoints" /
                                               "step_00000120"), help="the dense checkpoint to branch from")
    parser.add_argument("--base-steps", type=int, default=120, help="steps of the dense run when --base is missing")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-compressor"))
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="train these runs only; read the others")
    args = parser.parse_args()
    base = base_checkpoint(args)
    start = int(base.name.rsplit("_", 1)[1])
    results = {}
    for name, changes in RUNS.items():
        block = json.dumps({**BLOCK, **changes})
        overrides = [f"plugins=[{block}]", f"checkpoint.branch_from={base}"]
        trained = not args.only or name in args.only
        records = train(name, overrides, start + args.steps, args) if trained else _records(Path(args.out) / name)
        results[name] = {**quality(records), **prefill_flops(changes.get("pooling_factor"),
                                                              changes.get("num_memory_tokens"))}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(f"plot: {plot(results, Path(args.out) / 'compressor.png')}", flush=True)
    print(json.dumps({"steps": args.steps, "base": str(base), "device": "cpu", "runs": results}))


if __name__ == "__main__":
    main()
