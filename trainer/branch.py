"""Branching: a new run that continues another run from one of its checkpoints, under a new recipe.

The common case is a compression phase started from a dense run without retraining it: QAT (or a draft
head, or any plugin that adds parameters) from step N of a dense pretraining run. Everything the checkpoint
holds carries over as in a resume (weights, optimizer moments, step, schedule position, RNG, and the data
position when the data block is unchanged); what the recipe adds starts fresh. The source run's files are
only read: the branch writes its checkpoints into its own run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from slimtrain.trainer.checkpoint import STATE, STEP_RE, find_resumable, verify_checkpoint
from slimtrain.trainer.errors import RecipeError

FIELD = "checkpoint.branch_from"


def resolve_branch_source(path: str | Path) -> Path:
    """The step directory `checkpoint.branch_from` names: a step directory itself, or the newest complete
    checkpoint of a run directory (or of its `checkpoints/`)."""
    p = Path(path)
    if STEP_RE.match(p.name):
        problem = verify_checkpoint(p) if p.is_dir() else "no such directory"
        if problem:
            raise RecipeError(f"{FIELD}={str(path)!r} is not a complete checkpoint ({problem}); name a complete "
                              "step directory or the run directory")
        return p
    for root in (p / "checkpoints", p):
        found = find_resumable(root) if root.is_dir() else None
        if found is not None:
            return found
    raise RecipeError(f"{FIELD}={str(path)!r} holds no complete checkpoint; name a run directory, its "
                      "checkpoints/ directory or one of its step_XXXXXXXX directories")


def source_state(step_dir: Path) -> dict[str, Any]:
    """The trainer state the source checkpoint saved (step, tokens, loader position, ...)."""
    return json.loads((step_dir / STATE).read_text(encoding="utf-8"))


def check_branch(recipe, step_dir: Path) -> None:
    """Before any process starts: the branch must keep the source's model and have steps left to train."""
    saved = yaml.safe_load((step_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}
    ours = recipe.model.model_dump(mode="json")
    theirs = {**ours, **(saved.get("model") or {})}
    diff = sorted(k for k in ours if ours[k] != theirs[k])
    if diff:
        shown = ", ".join(f"model.{k}={theirs[k]!r} there, {ours[k]!r} here" for k in diff)
        raise RecipeError(f"{FIELD}={str(step_dir)!r}: the model differs ({shown}); a branch keeps the source's "
                          "model block (plugins may add to it). Set the same values, or start a new run")
    step = int(source_state(step_dir)["step"])
    if recipe.train.steps <= step:
        raise RecipeError(f"{FIELD}={str(step_dir)!r} is at step {step} and train.steps={recipe.train.steps}: "
                          f"nothing left to train; set train.steps above {step}")
