"""`slimtrain compare RUN_DIR...`: several runs' loss and metric curves overlaid in one PNG, a table of their final
figures, and a one-line summary per figure (which run is best, by how much), for terminals without a display."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimtrain.trainer.reproduce.run_data import RunMetrics

ALWAYS = ("loss", "eval_loss")
LOWER_IS_BETTER = ("loss", "eval_loss", "eval_ppl", "moe/maxvio")
COMPARE_FILE = "compare.png"


def compare_runs(run_dirs: list[Path], extra: list[str], out: Path | None,
                 console: Console | None = None) -> tuple[dict[str, dict[str, float | None]], Path | None]:
    """Print the table and summary, write the PNG; returns ({run: {metric: final value}}, the PNG's path)."""
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    runs = {_name(d, run_dirs): RunMetrics.of_run(d) for d in run_dirs}
    metrics = [*ALWAYS, *(m for m in extra if m not in ALWAYS)]
    finals = {name: {m: _final(run, m) for m in [*metrics, "tokens", "time_s"]} for name, run in runs.items()}
    _print_table(finals, metrics, console)
    for line in summary(finals, metrics):
        console.print(line, soft_wrap=True)
    path = plot_runs(runs, metrics, out or _default_out(run_dirs))
    console.print(f"curves: {path}" if path else "curves: none of the runs logged these metrics")
    return finals, path


def _name(run_dir: Path, all_dirs: list[Path]) -> str:
    """A run's label: its directory name, or the path when two runs share a name."""
    names = [d.name for d in all_dirs]
    return run_dir.name if names.count(run_dir.name) == 1 else str(run_dir)


def _final(run: RunMetrics, metric: str) -> float | None:
    series = run.series(metric)
    return series[-1][1] if series else None


def _print_table(finals: dict[str, dict[str, float | None]], metrics: list[str], console: Console) -> None:
    table = Table(title="final figures")
    table.add_column("run", overflow="fold")
    columns = [*metrics, "tokens", "time_s"]
    for m in columns:
        table.add_column(m, justify="right")
    for name, values in finals.items():
        table.add_row(name, *("—" if values[m] is None else f"{values[m]:.5g}" for m in columns))
    console.print(table)


def summary(finals: dict[str, dict[str, float | None]], metrics: list[str]) -> list[str]:
    """One line per metric: the best run's final value and how far each other run is from it."""
    lines = []
    for m in metrics:
        have = {n: v[m] for n, v in finals.items() if v[m] is not None and math.isfinite(v[m])}
        if len(have) < 2:
            continue
        pick = min if m in LOWER_IS_BETTER else max
        best = pick(have, key=have.get)
        others = ", ".join(f"{n} {have[n] - have[best]:+.4g}" for n in have if n != best)
        direction = "lowest" if pick is min else "highest"
        lines.append(f"{m}: {direction} {have[best]:.5g} ({best}); others {others}")
    return lines


def plot_runs(runs: dict[str, RunMetrics], metrics: list[str], out: Path) -> Path | None:
    """One panel per metric that some run logged, every run's curve overlaid."""
    panels = [m for m in metrics if any(r.series(m) for r in runs.values())]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.2 * len(panels)), dpi=110, squeeze=False,
                             sharex=True)
    for ax, metric in zip(axes[:, 0], panels):
        for name, run in runs.items():
            series = run.series(metric)
            if series:
                ax.plot(*zip(*series), "o-" if len(series) < 8 else "-", label=name, linewidth=1, markersize=3)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _default_out(run_dirs: list[Path]) -> Path:
    """compare.png in the first run directory, or in the working directory when that one is not writable."""
    import os

    first = run_dirs[0]
    return first / COMPARE_FILE if os.access(first, os.W_OK) else Path.cwd() / COMPARE_FILE
