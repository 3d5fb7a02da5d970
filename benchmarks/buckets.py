"""Dataset decomposition (`data.packer: buckets`) against `bfd` and `concat` on the quickstart corpus.

    python benchmarks/buckets.py                          # CPU: 3 runs of 60 steps at seq_len 256, 2 ranks
    python benchmarks/buckets.py --steps 300 --eval-every 25 --seq-len 1024 --min-len 64 --nproc 1   # GPU

Each packer trains recipes/buckets-cpu.yaml (the quickstart model; --seq-len sets data.seq_len and
model.max_seq_len) for the same steps, so the same token slots per step (global_batch_size x seq_len),
and is evaluated every --eval-every steps on the same held-out rows (data.val_packer=bfd for all three,
so the eval losses are comparable). Training wall-clock is the run's `time_s` minus the evaluations'
`eval_s`; training FLOPs count 6N plus causal attention over each step's row length (seq_len for bfd and
concat, the bucket's for buckets), as the trainer's MFU does.

Prints one JSON line per packer, then one with every packer's figures without curves (what `expect:` targets
read): eval loss at equal token slots (the last evaluation), at equal real tokens
and at equal wall-clock (each curve interpolated at the smallest run's tokens and the fastest run's
training time), wall-clock and FLOPs to reach the target eval loss
(the worst run's final one, which every run reaches), and the attention FLOPs per token against bfd at the
longest length, both as counted (full causal rows of the step's length) and with document masking (the
query-key pairs a document-masked kernel computes, from epoch 0's packing). A plot goes to --plot.

Wall-clock on a shared machine measures the other load as much as the packers: --repeats trains every
packer several times, interleaved, and keeps the median; and the compute time of every step is also
modelled from forward + backward times of each packer's micro-batches timed side by side in one process
(`compute_s`, `compute_s_to_target`), which other load slows alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "buckets-cpu.yaml"
PACKERS = ("buckets", "bfd", "concat")


def train(packer: str, args: argparse.Namespace) -> list[dict]:
    """`slimtrain train` of the buckets recipe with `packer`; returns its metrics records."""
    run_dir = Path(args.out) / packer
    overrides = [f"data.packer={packer}", "data.val_packer=bfd", f"data.seq_len={args.seq_len}",
                 f"model.max_seq_len={args.seq_len}", f"data.buckets.min_len={args.min_len}",
                 f"data.buckets.curriculum={args.curriculum}", f"data.buckets.cycles={args.cycles}",
                 f"train.steps={args.steps}", f"train.global_batch_size={args.global_batch}",
                 f"train.micro_batch_size={args.micro_batch}", f"checkpoint.every={args.steps}",
                 f"eval.every={args.eval_every}", f"eval.batches={args.eval_batches}", f"run.output_dir={run_dir}",
                 "train.log_every=1", "logging.progress=false", "logging.plot=false", "checkpoint.resume=never",
                 *args.override]
    cmd = [sys.executable, "-m", "slimtrain.trainer.cli", "train", str(RECIPE), f"--nproc={args.nproc}", *overrides]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"training {packer} failed:\n{proc.stdout[-4000:]}")
    print(f"trained {packer} ({args.steps} steps) in {time.monotonic() - start:.0f}s", flush=True)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def flops_per_token(run_dir: Path) -> Callable[[int], float]:
    """Row length -> training FLOPs per token of the run's model (from its last checkpoint's model config)."""
    from slimtrain.modules.transformer.config import ModelConfig

    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    cfg = ModelConfig(**json.loads((ckpts[-1] / "trainer_state.json").read_text())["model_config"])
    return lambda row_len: cfg.flops_per_token(row_len)


def curve(records: list[dict], seq_len: int, fpt: Callable[[int], float]) -> list[dict]:
    """The evaluations as points (step, tokens, training seconds, training FLOPs, eval loss)."""
    steps = {r["step"]: r for r in records if "loss" in r}
    evals = [r for r in records if "eval_loss" in r]
    flops, total, eval_s_before, before = {}, 0.0, {}, 0
    for s in sorted(steps):  # every step is logged (train.log_every=1): `tokens` is the running total
        total += (steps[s]["tokens"] - before) * fpt(steps[s].get("row_len", seq_len))
        before = steps[s]["tokens"]
        flops[s] = total
    spent = 0.0
    for e in evals:  # an evaluation after step s is counted in the time_s of step s + 1 onwards
        eval_s_before[e["step"]] = spent
        spent += e.get("eval_s", 0.0)
    return [{"step": e["step"], "tokens": steps[e["step"]]["tokens"],
             "train_s": round(steps[e["step"]]["time_s"] - eval_s_before[e["step"]], 3),
             "flops": flops[e["step"]], "eval_loss": e["eval_loss"]} for e in evals]


def at(points: list[dict], x_key: str, x: float) -> float | None:
    """The eval loss interpolated at x_key = x (None beyond the curve)."""
    xs, ys = [p[x_key] for p in points], [p["eval_loss"] for p in points]
    return None if x > xs[-1] or x < xs[0] else float(np.interp(x, xs, ys))


def reach(points: list[dict], x_key: str, target: float) -> float | None:
    """The first x_key at which the eval loss curve (linear between evaluations) falls to `target`."""
    for a, b in zip([None, *points], points):
        if b["eval_loss"] <= target:
            if a is None or a["eval_loss"] == b["eval_loss"]:
                return float(b[x_key])
            f = (a["eval_loss"] - target) / (a["eval_loss"] - b["eval_loss"])
            return float(a[x_key] + f * (b[x_key] - a[x_key]))
    return None


def attention_pairs(packer: str, args: argparse.Namespace, row_lens: list[int]) -> float:
    """Query-key pairs per token a document-masked causal kernel computes: epoch 0's packed rows for bfd and
    concat (a document piece of n tokens: n(n+1)/2), the trained steps' row lengths for buckets (L(L+1)/2)."""
    if packer == "buckets":
        return float(np.mean([(L + 1) / 2 for L in row_lens]))
    from slimtrain.data.packing import pack
    from slimtrain.data.pipeline import prepare
    from slimtrain.trainer.recipe.schema import load_recipe

    data = load_recipe(RECIPE, [f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}"]).data
    lengths = prepare(data, progress=False).train.doc_len.astype(np.int64)
    docs = np.random.default_rng([0, 0]).permutation(len(lengths))
    plan = pack(packer, docs, lengths[docs], args.seq_len, data.pack_buffer_docs)
    n = plan.length.astype(np.float64)
    return float((n * (n + 1) / 2).sum() / n.sum())


def step_costs(args: argparse.Namespace, row_lens: dict[str, list[int]], per_length: int) -> dict[str, dict[int, float]]:
    """Seconds of one micro-batch's forward + backward on one thread, by packer and row length, timed in one process
    with the packers interleaved (A/B/C, A/B/C, ...), so that other load on the machine slows them alike. Each
    length gets `per_length` micro-batches of the packer's own stream (rank 0 of --nproc); the median is kept."""
    import torch

    from slimtrain.data.pipeline import build_loader, prepare
    from slimtrain.modules.transformer.model import Transformer
    from slimtrain.trainer.loss.lm import lm_loss
    from slimtrain.trainer.recipe.schema import load_recipe

    torch.set_num_threads(1)
    recipe = load_recipe(RECIPE, [f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}",
                                  f"data.buckets.min_len={args.min_len}", *args.override])
    prepared = prepare(recipe.data, progress=False)
    torch.manual_seed(0)
    model = Transformer(recipe.model.model_copy(update={"vocab_size": prepared.tokenizer.vocab_size}))
    samples: dict[str, dict[int, list]] = {}
    for packer, lengths in row_lens.items():
        data = recipe.data.model_copy(update={"packer": packer})
        loader = build_loader(prepared.__class__(data, *[getattr(prepared, f) for f in
                                                         ("tokenizer", "manifest", "train", "val", "directories")]),
                              "train", rank=0, world_size=args.nproc, micro_batch_size=args.micro_batch,
                              global_batch_size=args.global_batch, seed=recipe.run.seed, prefetch=0)
        wanted = {L: per_length for L in set(lengths)}
        samples[packer] = {L: [] for L in wanted}
        while any(wanted.values()):  # the first micro-batches of each length in the stream
            batch = next(loader)
            L = batch.input_ids.shape[1]
            if wanted.get(L):
                samples[packer][L].append(batch)
                wanted[L] -= 1
        loader.close()
    times: dict[str, dict[int, list[float]]] = {p: {L: [] for L in by} for p, by in samples.items()}
    for i in range(per_length):
        for packer, by_len in samples.items():
            for L, batches in by_len.items():
                start = time.perf_counter()
                loss, _, _ = lm_loss(model, batches[i], 1.0)
                loss.backward()
                times[packer][L].append(time.perf_counter() - start)
    return {p: {L: float(np.median(t)) for L, t in by.items()} for p, by in times.items()}


def plot(results: dict[str, list[dict]], out: Path) -> Path:
    """Eval loss against training seconds and against training FLOPs, one line per packer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"train_s": "training wall-clock (s, evaluations excluded)",
              "compute_s": "compute (s, micro-batches timed side by side)",
              "flops": "training FLOPs (6N + causal attention at the row length)"}
    keys = [k for k in labels if all(k in p for points in results.values() for p in points)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), dpi=110, sharey=True)
    for name, points in results.items():
        for ax, key in zip(axes, keys):
            ax.plot([p[key] for p in points], [p["eval_loss"] for p in points], marker="o", markersize=3,
                    linewidth=1, label=name)
    for ax, key in zip(axes, keys):
        ax.set_xlabel(labels[key])
    axes[0].set_ylabel("eval loss (same bfd rows for all)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of every run")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out micro-batches per rank per evaluation")
    parser.add_argument("--seq-len", type=int, default=256, help="the longest length (data.seq_len, a power of two)")
    parser.add_argument("--min-len", type=int, default=16, help="data.buckets.min_len")
    parser.add_argument("--curriculum", default="grow", choices=["grow", "short_to_long", "weighted"])
    parser.add_argument("--cycles", type=int, default=1, help="data.buckets.cycles")
    parser.add_argument("--global-batch", type=int, default=16, help="rows of seq_len per step")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows of seq_len per micro-batch")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="train every packer this many times, interleaved, and "
                        "keep the median time of every evaluation (the losses are identical)")
    parser.add_argument("--cost-batches", type=int, default=6, help="micro-batches per row length timed side by side "
                        "in one process (0: skip)")
    parser.add_argument("--override", action="append", default=[], help="more recipe overrides a.b=c (repeatable)")
    parser.add_argument("--only", action="append", choices=PACKERS, help="run these packers only (repeatable)")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-buckets"))
    parser.add_argument("--plot", default=str(REPO / "runs" / "bench-buckets" / "buckets.png"))
    args = parser.parse_args()

    packers = args.only or list(PACKERS)
    runs: dict[str, list[list[dict]]] = {p: [] for p in packers}
    row_lens, loads = {}, {p: [] for p in packers}
    for _ in range(args.repeats):  # interleaved, so that other load on the machine falls on every packer alike
        for packer in packers:
            before = os.getloadavg()[0]
            records = train(packer, args)
            loads[packer].append((round(before, 2), round(os.getloadavg()[0], 2)))
            fpt = flops_per_token(Path(args.out) / packer)
            runs[packer].append(curve(records, args.seq_len, fpt))
            row_lens[packer] = [r.get("row_len", args.seq_len) for r in records if "loss" in r]
    # The runs are deterministic: only their times differ between repeats; keep the median time of each point.
    curves = {p: [{**pts[0], "train_s": round(float(np.median([r[i]["train_s"] for r in rs])), 3)}
                  for i, pts in enumerate(zip(*rs))] for p, rs in runs.items()}
    costs = step_costs(args, row_lens, args.cost_batches) if args.cost_batches else {}
    target = max(points[-1]["eval_loss"] for points in curves.values())
    equal_s = min(points[-1]["train_s"] for points in curves.values())
    # Token slots per step are equal; real tokens are not quite (bfd's row ends, buckets' padded short remainders).
    equal_tokens = min(points[-1]["tokens"] for points in curves.values())
    pairs = {p: attention_pairs(p, args, row_lens[p]) for p in packers}
    base = "bfd" if "bfd" in packers else packers[0]
    # The trainer's count (ModelConfig.flops_per_token): causal attention over the whole row, linear in its length.
    counted = {p: float(np.mean([L / args.seq_len for L in row_lens[p]])) for p in packers}
    lines = []
    for packer in packers:
        points = curves[packer]
        line = {
            "benchmark": "buckets", "packer": packer, "seq_len": args.seq_len, "min_len": args.min_len,
            "curriculum": args.curriculum, "steps": args.steps, "nproc": args.nproc,
            "token_slots_per_step": args.global_batch * args.seq_len, "tokens": points[-1]["tokens"],
            "mean_row_len": round(float(np.mean(row_lens[packer])), 1),
            "eval_loss_equal_slots": round(points[-1]["eval_loss"], 4), "equal_tokens": equal_tokens,
            "eval_loss_equal_tokens": _round(at(points, "tokens", equal_tokens)),
            "train_s": points[-1]["train_s"], "train_flops": points[-1]["flops"],
            "equal_wallclock_s": equal_s, "eval_loss_equal_wallclock": _round(at(points, "train_s", equal_s)),
            "target_eval_loss": round(target, 4), "seconds_to_target": _round(reach(points, "train_s", target), 2),
            "flops_to_target": reach(points, "flops", target),
            "attention_flops_per_token_vs_bfd": {
                "counted_full_rows": round(counted[packer] / counted[base], 4),
                "document_masked": round(pairs[packer] / pairs[base], 4)},
            "repeats": args.repeats, "load_average_before_after": loads[packer],
            "curve": points,
        }
        if costs:  # the same comparison from per-micro-batch compute timed side by side, immune to machine load
            cost = costs[packer]
            accum = args.global_batch // (args.nproc * args.micro_batch)  # micro-batches per rank per step
            modeled = np.cumsum([accum * cost[L] for L in row_lens[packer]])
            for p in points:
                p["compute_s"] = round(float(modeled[p["step"] - 1]), 3)
            line["micro_batch_s_by_row_len"] = {str(L): round(c, 4) for L, c in sorted(cost.items())}
            line["compute_s"] = points[-1]["compute_s"]
            line["compute_s_to_target"] = _round(reach(points, "compute_s", target), 2)
        line["curve"] = line.pop("curve")
        lines.append(line)
    print(f"plot: {plot(curves, Path(args.plot))}", flush=True)
    print_lines(lines, target)


def print_lines(lines: list[dict], target: float) -> None:
    """One JSON line per packer, then every packer's figures without curves in one line (what `expect:` targets
    read with `file:`)."""
    for line in lines:
        print(json.dumps(line), flush=True)
    print(json.dumps({"benchmark": "buckets", "target_eval_loss": round(target, 4), "by_packer": {
        line["packer"]: {k: v for k, v in line.items() if k != "curve"} for line in lines}}), flush=True)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


if __name__ == "__main__":
    main()
