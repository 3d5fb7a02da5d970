"""`slimtrain quickstart`: train the quickstart recipe and show what came out of it."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from slimtrain.trainer.recipe.schema import load_recipe
from slimtrain.trainer.logging import MetricsLog, console


def run_quickstart(recipe_path: Path, overrides: list[str]) -> int:
    """Train (2 CPU ranks by default), then print the loss summary and where the plot is."""
    from slimtrain.trainer.cli import main

    recipe = load_recipe(recipe_path, overrides)
    console.rule(f"[bold]slimtrain quickstart[/]: {recipe_path.name}")
    rc = main(["train", str(recipe_path), *overrides])
    if rc:
        return rc
    run_dir = Path(recipe.run.resolved_output_dir)
    summarize(run_dir)
    return export_and_generate(run_dir)


PROMPT = "class Stack:\n    def __init__(self"


def export_and_generate(run_dir: Path) -> int:
    """Export the newest checkpoint, check logits against transformers, print a transformers completion.

    The checkpoint is read once: the same loaded checkpoint feeds the writer and the check."""
    from slimtrain.trainer.export.consolidate import load_checkpoint_for_export
    from slimtrain.trainer.export.hf import read_hf_config, write_export
    from slimtrain.trainer.export.verify import TOLERANCE, generate_text, verify_export

    ckpt = load_checkpoint_for_export(run_dir)
    out = write_export(ckpt, run_dir / "hf", overwrite=True)
    diff = verify_export(out, ckpt)
    architecture = ", ".join(read_hf_config(out).get("architectures") or [])
    console.print(f"exported {ckpt.path.name} -> {out} ({architecture}); "
                  f"max |logit diff| vs transformers = {diff:.1e}")
    completion = generate_text(out, PROMPT)
    console.rule("transformers.AutoModelForCausalLM.from_pretrained(" + str(out) + ").generate(...)")
    console.print(PROMPT + completion, markup=False, highlight=False)
    console.rule()
    return 0 if diff <= TOLERANCE else 1


def summarize(run_dir: Path) -> dict[str, float]:
    """First/last training loss and final eval loss, as a table; returns the figures."""
    records = MetricsLog(run_dir, enabled=True).read()
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    figures = {
        "first_loss": train[0]["loss"],
        "last_loss": train[-1]["loss"],
        "final_eval_loss": evals[-1]["eval_loss"] if evals else float("nan"),
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
    }
    table = Table(title=f"run {run_dir}")
    for key in ("steps", "tokens", "first_loss", "last_loss", "final_eval_loss"):
        value = figures[key]
        table.add_row(key, f"{value:,}" if isinstance(value, int) else f"{value:.4f}")
    console.print(table)
    plot = run_dir / "loss_curve.png"
    if plot.is_file():
        console.print(f"loss curve: {plot}")
    return figures
