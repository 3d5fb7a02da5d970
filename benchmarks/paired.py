"""Two recipes over several seeds, paired: each seed trains both (`run.seed`: the same initialisation and data
order wherever the recipes allow), and the difference a - b of a metric's last value is summed up over seeds.

    python benchmarks/paired.py --a recipes/reproduce/moe-active-quickstart.yaml \\
        --b recipes/reproduce/dense-quickstart.yaml --seeds 0 1 --out runs/paired
    python benchmarks/paired.py ... --reuse b:0=runs/reproduce/dense   # a finished run of b at seed 0

At this size one seed is not evidence: two quickstart runs that differ only in the seed end 0.06 nats apart in
eval loss, more than most effects a small reproduction looks for. A run directory that already holds its final
checkpoint is read, not trained again. Ends with one JSON line: per seed a, b and a - b; the means; the
differences' standard deviation and the standard error of their mean; the smallest and largest difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def final_value(run_dir: Path, metric: str) -> float:
    """The last value of `metric` in the run's metrics.jsonl."""
    values = [r[metric] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if metric in r]
    if not values:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no {metric!r}")
    return values[-1]


def finished(run_dir: Path, steps: int) -> bool:
    latest = run_dir / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == f"step_{steps:08d}"


def train(recipe: str, seed: int, run_dir: Path, nproc: int) -> None:
    """`slimtrain train` of `recipe` at `seed` into `run_dir`, unless it already finished there."""
    from slimtrain.trainer.recipe.schema import load_recipe

    if finished(run_dir, load_recipe(recipe, []).train.steps):
        print(f"reusing {run_dir} (finished)", flush=True)
        return
    cmd = [sys.executable, "-m", "slimtrain.trainer.cli", "train", recipe, f"--nproc={nproc}", f"run.seed={seed}",
           f"run.output_dir={run_dir}", "logging.progress=false", "checkpoint.resume=never"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"training {recipe} (seed {seed}) failed:\n{proc.stdout[-4000:]}")
    print(f"trained {Path(recipe).name} seed {seed} in {time.monotonic() - start:.0f}s", flush=True)


def summary(a: dict[int, float], b: dict[int, float]) -> dict:
    diffs = {s: a[s] - b[s] for s in a}
    d = list(diffs.values())
    std = statistics.stdev(d) if len(d) > 1 else 0.0
    return {"per_seed": {str(s): {"a": round(a[s], 4), "b": round(b[s], 4), "diff": round(diffs[s], 4)} for s in a},
            "a_mean": round(statistics.fmean(a.values()), 4), "b_mean": round(statistics.fmean(b.values()), 4),
            "diff_mean": round(statistics.fmean(d), 4), "diff_std": round(std, 4),
            "diff_sem": round(std / len(d) ** 0.5, 4), "diff_min": round(min(d), 4), "diff_max": round(max(d), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="recipe a")
    parser.add_argument("--b", required=True, help="recipe b (the baseline)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--metric", default="eval_loss")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "runs" / "paired"))
    parser.add_argument("--reuse", action="append", default=[], metavar="SIDE:SEED=RUN_DIR",
                        help="a finished run to read instead of training that side at that seed (repeatable)")
    args = parser.parse_args()

    reuse = {}
    for item in args.reuse:
        key, _, path = item.partition("=")
        side, _, seed = key.partition(":")
        if side not in ("a", "b") or not seed.isdigit() or not path:
            raise SystemExit(f"--reuse {item!r}: give SIDE:SEED=RUN_DIR, SIDE a or b (e.g. b:0=runs/reproduce/dense)")
        reuse[(side, int(seed))] = Path(path)
    values: dict[str, dict[int, float]] = {"a": {}, "b": {}}
    for seed in args.seeds:
        for side, recipe in (("a", args.a), ("b", args.b)):
            run_dir = reuse.get((side, seed), Path(args.out) / f"{side}-seed{seed}")
            if (side, seed) not in reuse:
                train(recipe, seed, run_dir, args.nproc)
            values[side][seed] = final_value(run_dir, args.metric)
    result = {"benchmark": "paired", "metric": args.metric, "a": args.a, "b": args.b, "seeds": args.seeds,
              **summary(values["a"], values["b"])}
    for seed, row in result["per_seed"].items():
        print(f"seed {seed}: a {row['a']:.4f}  b {row['b']:.4f}  a - b {row['diff']:+.4f}")
    print(f"mean a - b {result['diff_mean']:+.4f} (sd {result['diff_std']:.4f}, sem {result['diff_sem']:.4f})")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
