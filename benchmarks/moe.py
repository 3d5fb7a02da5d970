"""What MoE buys on the quickstart corpus, and what it costs: quality against dense models, balancing, speed.

    python benchmarks/moe.py                      # quality + balancing (5 runs of the quickstart, 2 CPU ranks) + speed
    python benchmarks/moe.py --steps 60           # shorter runs
    python benchmarks/moe.py --speed              # speed only: one process, dense vs MoE steps, grouped GEMM vs loop
    python benchmarks/moe.py --speed --size 1b    # GPU: ~1B total, 64 fine-grained experts top-8, bf16

Quality (same tokens, seed and steps; eval loss on the same held-out batches at the end):
  dense          the quickstart model (MLP width 688)
  moe-active     8 experts of width 232, top-2, plus one gated shared expert: 3 x 232 = 696 of MLP width
                 per token, the dense model's active parameters (plus 8 router columns per layer)
  dense-total    a dense model with the MoE's total parameters (MLP width 9 x 232 = 2088): the ceiling
Balancing (MaxVio over training, from moe/maxvio in metrics.jsonl; drawn into OUT/maxvio.png): the moe-active
model with no balancing, with the aux loss (= moe-active), and with the aux-loss-free bias (sigmoid router, no
aux loss; rate 0.01, larger than DeepSeek-V3's 0.001, for runs of a hundred steps).
Speed: tokens/s of one training step (forward + backward, one process, no engine) of the MoE against the
dense model of equal active parameters, in the same run; and the MoE layer's grouped GEMM against the
per-expert loop. Ends with one JSON line.
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
WIDTH = 232  # 3 x 232 = 696 ~ the dense 688; 232 x 4 bytes is 16-byte aligned (torch's grouped GEMM)
MOE = {"type": "moe", "num_experts": 8, "top_k": 2, "expert_intermediate_size": WIDTH, "num_shared_experts": 1,
       "shared_expert_gate": True, "router": "softmax", "aux_loss_weight": 0.01, "z_loss_weight": 0.001}
RUNS = {  # name -> overrides of the quickstart recipe
    "dense": [],
    "moe-active": [f"plugins=[{json.dumps(MOE)}]"],
    "dense-total": [f"model.intermediate_size={9 * WIDTH}"],
    "moe-no-balancing": [f"plugins=[{json.dumps({**MOE, 'aux_loss_weight': 0.0})}]"],
    "moe-bias": [f"plugins=[{json.dumps({**MOE, 'router': 'sigmoid', 'aux_loss_weight': 0.0, 'bias_update_rate': 0.01})}]"],
}


def train(name: str, args: argparse.Namespace) -> list[dict]:
    """`slimtrain train` of the quickstart with this run's overrides; returns its metrics records."""
    run_dir = Path(args.out) / name
    overrides = [*RUNS[name], f"train.steps={args.steps}", f"checkpoint.every={args.steps}", "eval.every=0",
                 f"eval.batches={args.eval_batches}", f"run.output_dir={run_dir}", "logging.progress=false",
                 "checkpoint.resume=never"]
    cmd = [sys.executable, "-m", "slimtrain.trainer.cli", "train", str(REPO / "recipes" / "quickstart.yaml"),
           f"--nproc={args.nproc}", *overrides]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"training {name} failed:\n{proc.stdout[-4000:]}")
    print(f"trained {name} ({args.steps} steps) in {time.monotonic() - start:.0f}s", flush=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(records: list[dict]) -> dict:
    """Final eval loss, MaxVio at a few points of training, mean tokens/s after the first tenth."""
    train_recs = [r for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    skip = len(train_recs) // 10
    out = {"eval_loss": round(evals[-1], 4), "tokens_per_s": round(sum(r["tokens_per_s"] for r in train_recs[skip:])
                                                                   / max(1, len(train_recs) - skip), 1)}
    maxvio = [(r["step"], r["moe/maxvio"]) for r in train_recs if "moe/maxvio" in r]
    if maxvio:
        tail = [v for _, v in maxvio[-max(1, len(maxvio) // 4):]]
        out["maxvio_last_quarter"] = round(sum(tail) / len(tail), 3)
        out["maxvio_at"] = {s: round(v, 3) for s, v in maxvio[:: max(1, len(maxvio) // 6)]}
    return out


def plot_maxvio(records: dict[str, list[dict]], out: Path) -> Path:
    """MaxVio over training (mean over layers) of the MoE runs, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimtrain.trainer.logging import finish_plot

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    labels = {"moe-no-balancing": "no balancing", "moe-active": "aux loss 0.01", "moe-bias": "aux-loss-free bias"}
    for name, label in labels.items():
        points = [(r["step"], r["moe/maxvio"]) for r in records.get(name, []) if "moe/maxvio" in r]
        if points:
            ax.plot(*zip(*points), label=label, linewidth=1)
    return finish_plot(fig, ax, out, "MaxVio (global batch, mean over layers)")


def quality(args: argparse.Namespace) -> dict:
    records = {name: train(name, args) for name in RUNS}
    print(f"maxvio plot: {plot_maxvio(records, Path(args.out) / 'maxvio.png')}", flush=True)
    results = {name: summary(recs) for name, recs in records.items()}
    dense, moe, total = (results[n]["eval_loss"] for n in ("dense", "moe-active", "dense-total"))
    return {"steps": args.steps, "runs": results, "moe_minus_dense_active": round(moe - dense, 4),
            "moe_minus_dense_total": round(moe - total, 4), "moe_beats_equal_active": moe < dense}


SIZES = {  # vocab, hidden, layers, heads, kv heads, dense MLP width, experts, top-k, expert width, shared, rows x seq
    "quickstart": (8192, 256, 6, 4, 2, 688, 8, 2, WIDTH, 1, (8, 256)),
    "1b": (32768, 2048, 16, 16, 4, 5632, 64, 8, 704, 0, (4, 2048)),  # dense equal-active: 8 x 704 = 5632
}


def _step_time(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Seconds per forward + backward (the median of `repeats` after two warm-ups)."""
    times = []
    for i in range(repeats + 2):
        if ids.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(ids).logits.float().logsumexp(-1).mean().backward()
        if ids.is_cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def speed(args: argparse.Namespace) -> dict:
    from slimtrain.modules.plugin_registry import validate_plugin_config
    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.modules.transformer import ModelConfig
    from slimtrain.trainer.backends.build import ModelInit, build_model

    vocab, h, layers, heads, kv, width, experts, k, ew, shared, (rows, seq) = SIZES[args.size]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig(vocab_size=vocab, hidden_size=h, intermediate_size=width, num_layers=layers, num_heads=heads,
                      num_kv_heads=kv, max_seq_len=seq, attention="sdpa")
    ids = torch.randint(0, cfg.vocab_size, (rows, seq), device=device)
    block = {"type": "moe", "num_experts": experts, "top_k": k, "expert_intermediate_size": ew,
             "num_shared_experts": shared}
    contenders = {"dense": PluginStack()}
    for impl in ("grouped_mm", "triton", "loop"):
        stack = PluginStack.from_configs([validate_plugin_config({**block, "experts_impl": impl})])
        contenders[f"moe-{impl}"] = stack
    out: dict = {"size": args.size, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "dtype": str(dtype).removeprefix("torch."), "tokens_per_step": rows * seq}
    for name, stack in contenders.items():
        model = build_model(cfg, stack, ModelInit(seed=0), device).to(dtype)
        try:
            seconds = _step_time(model, ids, args.repeats)
        except ValueError as exc:  # an implementation that cannot run on this device / dtype
            out[name] = f"n/a: {exc}"
            continue
        finally:
            del model
        out[name] = {"tokens_per_s": round(rows * seq / seconds, 1), "params_total": stack.counts(cfg, seq).total_params,
                     "params_active": stack.counts(cfg, seq).active_params}
        print(name, out[name], flush=True)
    base = out["dense"]["tokens_per_s"]
    for name in contenders:
        if isinstance(out[name], dict):
            out[name]["vs_dense"] = round(out[name]["tokens_per_s"] / base, 3)
    if isinstance(out["moe-loop"], dict) and isinstance(out["moe-grouped_mm"], dict):
        out["grouped_mm_vs_loop"] = round(out["moe-grouped_mm"]["tokens_per_s"] / out["moe-loop"]["tokens_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of every quality run")
    parser.add_argument("--nproc", type=int, default=1 if torch.cuda.is_available() else 2)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-moe"))
    parser.add_argument("--speed", action="store_true", help="speed only")
    parser.add_argument("--size", choices=list(SIZES), default="quickstart")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    result = {"speed": speed(args)}
    if not args.speed:
        result["quality"] = quality(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
