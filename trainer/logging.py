"""Run output on rank 0: metrics.jsonl (always), a console progress bar, wandb, and the loss plot."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slimtrain.trainer.recipe.schema import Recipe

console = Console(stderr=True)


class MetricsLog:
    """Appends one JSON object per line; on resume, lines past the resumed step are dropped first."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Forget lines logged after `step` by a run that crashed before its next checkpoint."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step]
        tmp = self.path.with_suffix(".jsonl.part")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All records (used for the plot and by tests)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", -1))
    except ValueError:
        return 1 << 62  # an unreadable (half-written) line is dropped


class ProgressBar:
    """Loss, lr, tokens/s, MFU and ETA on one line; a no-op off rank 0 or when disabled."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            refresh_per_second=4,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")
        self.progress.start()

    def update(self, step: int, stats: str) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=step, stats=stats)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's wandb run id, made on its first online start: every resumed job logs into the same
    wandb run (wandb keeps only steps past the ones it has, so steps repeated after a crash are not doubled)."""
    path = run_dir / WANDB_ID_FILE
    if not path.is_file():
        import uuid

        part = path.with_suffix(".part")
        part.write_text(uuid.uuid4().hex[:16] + "\n", encoding="utf-8")
        os.replace(part, path)
    return path.read_text(encoding="utf-8").strip()


class Wandb:
    """Thin wrapper: offline unless a key is set (mode auto), never fatal when wandb is unavailable."""

    def __init__(self, recipe: Recipe, run_dir: Path, enabled: bool) -> None:
        self.run = None
        if not (enabled and recipe.logging.wandb.enabled):
            return
        import wandb

        mode = recipe.logging.wandb.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        # Online, every job of the run logs into one wandb run. Offline, each job keeps its own run: `wandb sync`
        # of two offline directories under one id would keep only the later one's history.
        same_run = {"id": wandb_run_id(run_dir), "resume": "allow"} if mode == "online" else {}
        self.run = wandb.init(
            project=recipe.logging.wandb.project, name=recipe.run.name, dir=str(run_dir), mode=mode,
            config=recipe.model_dump(mode="json"), **same_run,
        )

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            import wandb

            values = {k: wandb.Histogram(v) if isinstance(v, list) else v for k, v in record.items() if k != "step"}
            self.run.log(values, step=record.get("step"))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def plot_losses(records: list[dict[str, Any]], out: Path) -> Path | None:
    """loss_curve.png: training loss per step, eval loss as markers."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    return finish_plot(fig, ax, out, "loss (nats/token)")


def finish_plot(fig, ax, out: Path, ylabel: str, xlabel: str = "step") -> Path:
    """Label, grid and legend a one-panel line plot, save it to `out` and close it (every curve plot we write)."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


class Throughput:
    """Tokens/s and MFU over a sliding window of steps."""

    PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}

    def __init__(self, flops_per_token: float) -> None:
        self.flops_per_token = flops_per_token
        self.window: list[tuple[float, int, float]] = []  # (time, tokens, FLOPs) of the last steps
        self.peak = _device_peak_flops()

    def add(self, tokens: int, flops_per_token: float | None = None) -> None:
        """A step of `tokens`; `flops_per_token` is the step's own when it differs from the run's (rows whose
        length changes from step to step change the attention's share)."""
        per_token = self.flops_per_token if flops_per_token is None else flops_per_token
        self.window = (self.window + [(time.perf_counter(), tokens, tokens * per_token)])[-20:]

    def _rate(self, index: int) -> float:
        if len(self.window) < 2:
            return 0.0
        dt = self.window[-1][0] - self.window[0][0]
        return sum(w[index] for w in self.window[1:]) / dt if dt > 0 else 0.0

    def tokens_per_s(self) -> float:
        return self._rate(1)

    def mfu(self, world_size: int) -> float | None:
        if self.peak is None:
            return None
        return self._rate(2) / (self.peak * world_size)


def _device_peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in Throughput.PEAK_BF16.items():
        if key in name:
            return peak
    return None
