"""README.md model card of an exported checkpoint: what was trained, how far, and how well."""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimtrain.trainer.recipe.loading import dump_recipe

if TYPE_CHECKING:
    from slimtrain.trainer.export.consolidate import LoadedCheckpoint


def model_card(ckpt: "LoadedCheckpoint", architecture: str) -> str:
    """Markdown with Hub front matter, the training progress, last eval metrics and the full recipe."""
    st = ckpt.trainer_state
    counts = ckpt.plugins.counts(ckpt.model_cfg, ckpt.recipe.data.seq_len)  # what the plugins add or route
    evals = st.get("last_eval") or {}
    eval_lines = "\n".join(f"| {k} | {v:.4f} |" for k, v in evals.items()) or "| (no evaluation yet) | |"
    return f"""---
library_name: transformers
tags: [slimtrain, {architecture}]
---
# {ckpt.recipe.run.name}

Trained with slimtrain; exported from `{ckpt.path.name}`.

| | |
|---|---|
| architecture | {architecture} |
| parameters | {counts.total_params:,} |
| active parameters per token | {counts.active_params:,} |
| step | {st["step"]} of {ckpt.recipe.train.steps} |
| tokens seen | {st["tokens_seen"]:,} |
| world size | {st.get("world_size")} |

## Last evaluation (held-out split)

| metric | value |
|---|---|
{eval_lines}

## Recipe

```yaml
{dump_recipe(ckpt.recipe)}```
"""
