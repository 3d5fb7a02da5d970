"""Branching a DeepSpeed checkpoint into a model with more parameters (see slimtrain.trainer.lifecycle.branch).

A ZeRO checkpoint stores the optimizer state as flat partitions, whose layout changes as soon as the model
gains a parameter, so the source is converted into DeepSpeed's universal checkpoint (one directory per
parameter: fp32 weight, Adam moments, step) and every parameter the source lacks gets its entry here:
its initial value, zero moments and the source's step count. That is the state an uninterrupted run
holds for a parameter that had no gradient yet (e.g. QAT's step-size gains before fake-quant starts).
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimtrain.trainer.errors import RecipeError

FIELD = "checkpoint.branch_from"


def saved_param_shapes(ds_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter in a DeepSpeed checkpoint, from its model-states file (memory-mapped:
    the weights are not read). ZeRO-1/2/3 record `param_shapes`; ZeRO-0 holds the full module."""
    files = sorted(ds_dir.glob("*mp_rank_00_model_states.pt"))
    if not files:
        raise RecipeError(f"{FIELD}: {ds_dir} holds no DeepSpeed model states; it is not a slimtrain checkpoint")
    states = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False)
    if states.get("param_shapes"):
        return {k: tuple(v) for group in states["param_shapes"] for k, v in group.items()}
    buffers = set(states.get("buffer_names") or ())
    return {k: tuple(v.shape) for k, v in (states.get("module") or {}).items() if k not in buffers}


def fresh_parameters(saved: dict[str, tuple[int, ...]], current: dict[str, tuple[int, ...]], source: Path,
                     consumed: frozenset[str] = frozenset()) -> list[str]:
    """The parameters of the current model that the checkpoint lacks. Raises RecipeError when the checkpoint
    holds a parameter the model lacks or one of another shape: those would be dropped or cannot load. The
    `consumed` ones are the exception: a plugin initialised its parameters from them (`WeightInit.source`,
    e.g. experts upcycled from a dense MLP), so the branch drops them with their optimizer state."""
    dropped = sorted(set(saved) - set(current) - set(consumed))
    if dropped:
        raise RecipeError(f"{FIELD}={str(source)!r} holds parameters this model lacks: {_few(dropped)}; a branch "
                          "keeps every parameter of its source (same model block; plugins may add parameters, "
                          "or initialise theirs from a source parameter they take over, as upcycling does; "
                          "no plugin of this recipe takes these)")
    reshaped = sorted(k for k in saved if k in current and saved[k] != current[k])
    if reshaped:
        shown = "; ".join(f"{k}: {saved[k]} there, {current[k]} here" for k in reshaped[:3])
        raise RecipeError(f"{FIELD}={str(source)!r}: parameter shapes differ ({shown}); keep the source's model "
                          "block and tokenizer")
    return sorted(set(current) - set(saved))


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def add_fresh_entries(universal: Path, fresh: dict[str, torch.Tensor]) -> None:
    """Rank 0, into a converted universal checkpoint: an entry per new parameter with its initial value,
    zero Adam moments and the step count the source's parameters have."""
    zero = universal / "zero"
    steps = sorted(zero.glob("*/step.pt"))
    step = torch.load(steps[0], weights_only=False) if steps else None
    for name, value in fresh.items():
        entry = zero / name
        entry.mkdir(parents=True, exist_ok=True)
        full = value.detach().float().cpu().contiguous()
        torch.save({"cat_dim": 0, "param": full}, entry / "fp32.pt")
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.save({"cat_dim": 0, "param": torch.zeros_like(full)}, entry / f"{moment}.pt")
        if step is not None:
            torch.save(step.clone() if torch.is_tensor(step) else step, entry / "step.pt")


def drop_entries(universal: Path, names: frozenset[str]) -> None:
    """Rank 0, into a converted universal checkpoint: remove the entries (weight and optimizer state) of
    source parameters a plugin consumed, which the model no longer holds."""
    import shutil

    zero = universal / "zero"
    for name in names:
        shutil.rmtree(zero / name, ignore_errors=True)
