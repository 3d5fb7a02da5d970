"""What `slimtrain reproduce` shows and writes: the pass/fail table on the console, and `reproduce.md` in the run
directory with the table, the loss curve over the reference curve, and the run's fingerprints."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimtrain.trainer.logging import finish_plot
from slimtrain.trainer.reproduce.check import Outcome
from slimtrain.trainer.reproduce.run_data import RunMetrics

REPORT_FILE = "reproduce.md"
CURVE_FILE = "reproduce_curve.png"


def _value(outcome: Outcome) -> str:
    if outcome.value is None:
        return "—"
    return f"{outcome.value:.2%}" if outcome.percent else f"{outcome.value:.4g}"


def print_table(outcomes: list[Outcome], title: str, console: Console | None = None) -> None:
    """The pass/fail table: target, value, expected, verdict, by how much it missed, source."""
    table = Table(title=title, show_lines=False)
    for col in ("target", "value", "expected", "result", "miss", "source"):
        table.add_column(col, overflow="fold")
    for o in outcomes:
        table.add_row(o.label, _value(o), o.expected, "[green]pass[/]" if o.passed else "[red]MISS[/]", o.miss,
                      o.source)
    # A log file or a pipe gets the whole table unwrapped; rich would fold it to 80 columns.
    (console or Console(width=None if sys.stdout.isatty() else 200)).print(table)


def plot_curve(run: RunMetrics, reference: RunMetrics | None, metric: str, out: Path) -> Path | None:
    """`metric`'s curve of the run over the reference run's (PNG); None when neither logged it."""
    ours = run.series(metric)
    theirs = reference.series(metric) if reference is not None else []
    if not ours and not theirs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if theirs:
        ax.plot(*zip(*theirs), label=f"reference {metric}", linewidth=1.5, color="0.55")
    if ours:
        ax.plot(*zip(*ours), label=f"this run {metric}", linewidth=1)
    return finish_plot(fig, ax, out, metric)


def write_report(run_dir: Path, recipe_path: str, outcomes: list[Outcome], fingerprints: dict[str, str],
                 curve: Path | None, reference: Path | None) -> Path:
    """reproduce.md in the run directory."""
    met = sum(o.passed for o in outcomes)
    lines = [f"# Reproduction of `{recipe_path}`", "",
             f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}: **{met} of {len(outcomes)} targets met**"
             + ("" if met == len(outcomes) else f", {len(outcomes) - met} missed") + ".", "",
             "| target | value | expected | result | miss | source |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        cells = [o.label, _value(o), o.expected, "pass" if o.passed else "**MISS**", o.miss, o.source]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    if curve is not None:
        what = f"over the reference run's (`{reference}`)" if reference is not None else "(no reference run ships)"
        lines += ["", f"## Loss curve {what}", "", f"![loss curve]({curve.name})"]
    lines += ["", "## Fingerprints", "", "What to compare first when a target is missed.", "",
              "| what | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in fingerprints.items()]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
