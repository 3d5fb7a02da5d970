"""Branching: a new run that continues another run from one of its checkpoints, under a new recipe.

The common case is a compression phase started from a dense run without retraining it: QAT (or a draft
head, or any plugin that adds parameters) from step N of a dense pretraining run. Everything the checkpoint
holds carries over as in a resume (weights, optimizer moments, step, schedule position, RNG, and the data
position when the data block is unchanged); what the recipe adds starts fresh. The source run's files are
only read: the branch writes its checkpoints into its own run directory.

A plugin may also take over source parameters the model no longer holds: the build offers them
(`WeightInit.source`, read here by `lacking_parameters`) and the plugin initialises its own from them, e.g.
an MoE recipe branched from a dense run starts every expert as the dense MLP (upcycling). The backend's
branch then drops the consumed ones, with their optimizer state, instead of refusing them.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from slimtrain.trainer.lifecycle.checkpoint import STATE, STEP_RE, find_resumable, verify_checkpoint
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


# The model fields that shape parameters; the others (attention kernel, RoPE theta, sequence length,
# init) may change in a branch, e.g. a long-context phase. null (derived) values are compared at load
# time, where every parameter's shape is checked.
SHAPING = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
           "tie_embeddings")


def resume_mode(recipe) -> str:
    """`checkpoint.resume`, except that a job SLURM requeued (preempted, or a node failed) always resumes:
    `never` starts the run over once, not on every requeue."""
    import os

    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        return "auto"
    return recipe.checkpoint.resume


def check_fresh_start(recipe) -> None:
    """checkpoint.resume=never moves the run directory's checkpoints aside: a branch source among them would go."""
    if resume_mode(recipe) != "never" or not recipe.checkpoint.branch_from:
        return
    run_dir = Path(recipe.run.resolved_output_dir).resolve()
    source = Path(recipe.checkpoint.branch_from).resolve()
    if source == run_dir or run_dir in source.parents:
        raise RecipeError(f"{FIELD}={recipe.checkpoint.branch_from!r} is inside this run's directory, which "
                          "checkpoint.resume=never moves into previous_N/ first; branch from "
                          f"{run_dir / 'previous_N'} after a first start, or set another run.output_dir")


def model_differences(recipe, step_dir: Path) -> str:
    """The parameter-shaping model fields where `recipe` and the checkpoint's recipe differ ('' if none)."""
    saved = (yaml.safe_load((step_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("model") or {}
    ours = recipe.model.model_dump(mode="json")
    diff = [k for k in SHAPING if k in saved and None not in (saved[k], ours[k]) and saved[k] != ours[k]]
    return ", ".join(f"model.{k}={saved[k]!r} there, {ours[k]!r} here" for k in diff)


def check_resume(recipe, step_dir: Path) -> None:
    """Before the backend loads anything: a resume continues the same model."""
    shown = model_differences(recipe, step_dir)
    if shown:
        raise RecipeError(
            f"run.output_dir holds a checkpoint ({step_dir}) of another model ({shown}); a resume continues "
            "the same model. Set the same values, or train the new model from step 0 in a new run.output_dir "
            "(or with checkpoint.resume=never, which moves the old run into previous_N/)"
        )


def check_branch(recipe, step_dir: Path) -> None:
    """Before any process starts: the branch must keep the source's model and have steps left to train."""
    shown = model_differences(recipe, step_dir)
    if shown:
        raise RecipeError(f"{FIELD}={str(step_dir)!r}: the model differs ({shown}); a branch keeps the source's "
                          "parameters (plugins may add to them). Set the same values, or start a new run")
    step = int(source_state(step_dir)["step"])
    if recipe.train.steps <= step:
        raise RecipeError(f"{FIELD}={str(step_dir)!r} is at step {step} and train.steps={recipe.train.steps}: "
                          f"nothing left to train; set train.steps above {step}")


def check_same_tokenizer(step_dir: Path, tokenizer_hash_now: str) -> None:
    """The token ids must mean what they meant to the source's embedding (a new tokenizer of the same size
    would pass every shape check)."""
    from slimtrain.data.tokenizer import tokenizer_hash_of

    saved = step_dir / "tokenizer"
    if saved.is_dir() and tokenizer_hash_of(saved, FIELD) != tokenizer_hash_now:
        raise RecipeError(f"{FIELD}={str(step_dir)!r} was trained with another tokenizer than this recipe's "
                          "data.tokenizer gives; a branch must keep it: set data.tokenizer.path to "
                          f"{str(saved)!r}")


def check_model_sources(sources: list[tuple[str, Path]], tokenizer_hash_now: str) -> None:
    """Every model a plugin reads weights from (`Plugin.model_sources`) was trained with this run's tokenizer: an
    export directory's tokenizer files, or a checkpoint step directory's `tokenizer/`."""
    from slimtrain.data.tokenizer import tokenizer_hash_of

    for field, path in sources:
        saved = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        if not ((saved / "tokenizer.json").is_file() or (saved / "tokenizer_config.json").is_file()):
            raise RecipeError(f"{field}={str(path)!r} holds no tokenizer, so nothing shows that its token ids mean "
                              "what this run's data's do; copy the tokenizer it was trained with into it")
        if tokenizer_hash_of(saved, field) != tokenizer_hash_now:
            raise RecipeError(f"{field}={str(path)!r} was trained with another tokenizer than this recipe's "
                              "data.tokenizer gives; use a model of the same tokenizer, or set data.tokenizer.path "
                              f"to {str(saved)!r}")


def pinned_source(recipe, ckpt_root: Path, is_main: bool, barrier, again: bool = False) -> Path:
    """Collective: the step directory this run branches from, resolved once by rank 0 and recorded in
    `ckpt_root/branch.json`, so that every rank, and a restart before the branch's first checkpoint, uses
    the same one even while the source run goes on writing checkpoints. `again`: resolve it anew (a fresh
    start, checkpoint.resume=never, does not continue an earlier start's record)."""
    record = ckpt_root / "branch.json"
    wanted = str(recipe.checkpoint.branch_from)
    if is_main:
        known = json.loads(record.read_text(encoding="utf-8")) if record.is_file() and not again else {}
        if known.get("branch_from") != wanted:
            source = resolve_branch_source(wanted).resolve()
            ckpt_root.mkdir(parents=True, exist_ok=True)
            part = record.with_suffix(".part")
            part.write_text(json.dumps({"branch_from": wanted, "source": str(source)}), encoding="utf-8")
            part.replace(record)
    barrier()
    return Path(json.loads(record.read_text(encoding="utf-8"))["source"])


def source_at_build(recipe, ckpt_root: Path, is_main: bool, barrier: Callable[[], None],
                    any_rank: Callable[[bool], bool]) -> Path | None:
    """Collective, before the model is built: the step directory this run will branch from (pinned, as the
    loop pins it), or None when it does not branch or will resume a checkpoint of its own. `any_rank(flag)`:
    whether the flag is set on some rank (the loop itself refuses ranks that see different checkpoints)."""
    from slimtrain.trainer.errors import CheckpointError
    from slimtrain.trainer.lifecycle.checkpoint import find_resume_point

    if not recipe.checkpoint.branch_from:
        return None
    fresh_start = resume_mode(recipe) == "never"
    try:
        resumes = not fresh_start and find_resume_point(ckpt_root) is not None
    except CheckpointError:
        resumes = True  # the loop reports it
    if any_rank(resumes):
        return None
    return pinned_source(recipe, ckpt_root, is_main, barrier, again=fresh_start)


def source_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every parameter of the source checkpoint (full, fp32, CPU; a tied output head under both names)."""
    from slimtrain.trainer.backends import BACKENDS
    from slimtrain.trainer.export.consolidate import checkpoint_recipe

    recipe, model_cfg, _ = checkpoint_recipe(step_dir)
    read_weights = BACKENDS.get(recipe.backend.type).read_weights
    if read_weights is None:
        raise RecipeError(f"{FIELD}={str(step_dir)!r}: a plugin initialises from the source's weights, which its "
                          f"backend {recipe.backend.type!r} cannot read offline; branch from a run of a backend that can")
    with contextlib.redirect_stderr(io.StringIO()):  # DeepSpeed's reader draws a progress bar per file
        weights = {n: t.float() for n, t in read_weights(step_dir, recipe, model_cfg).items()}
    if model_cfg.tie_embeddings and "embed.weight" in weights:
        weights.setdefault("lm_head.weight", weights["embed.weight"])
    return weights


def lacking_parameters(step_dir: Path, held: set[str]) -> dict[str, torch.Tensor]:
    """The source checkpoint's parameters that a model holding the tensors `held` lacks: full, fp32, on the
    CPU. The names come from the source's model skeleton (its recipe and model config, no weights read);
    the weights are read, through its backend's offline reader, only when some are lacking."""
    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.trainer.backends import BACKENDS
    from slimtrain.trainer.export.consolidate import checkpoint_recipe

    recipe, model_cfg, _ = checkpoint_recipe(step_dir)
    skeleton = PluginStack.from_configs(recipe.plugins).skeleton(model_cfg)
    lacking = sorted({n for n, _ in skeleton.named_parameters()} - held)
    if not lacking:
        return {}
    read_weights = BACKENDS.get(recipe.backend.type).read_weights
    if read_weights is None:
        raise RecipeError(f"{FIELD}={str(step_dir)!r} holds parameters this model lacks ({', '.join(lacking[:3])}) "
                          f"and its backend {recipe.backend.type!r} cannot read its weights offline for the plugins "
                          "to take them over; branch from a run of a backend that can")
    with contextlib.redirect_stderr(io.StringIO()):  # DeepSpeed's reader draws a progress bar per file
        weights = read_weights(step_dir, recipe, model_cfg)
    return {n: weights[n].float() for n in lacking if n in weights}
