"""Resuming a DeepSpeed checkpoint on another number of ranks (or in another precision).

DeepSpeed's sharded optimizer files load only into the data-parallel world size that wrote them: a job
requeued on fewer nodes, or moved to more, would stop on DeepSpeed's "Automatic adjustment of ZeRO's
optimizer state partitioning with a new world size is not currently supported".
Here such a checkpoint is converted once with DeepSpeed's own universal-checkpoint tool
(`deepspeed.checkpoint.ds_to_universal`: one file per parameter holding its fp32 weight and Adam moments)
into `step_X/.reshard/`, loaded from there, and the conversion is removed; the original files are
never modified.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from slimtrain.trainer.errors import RecipeError

RESHARD_DIR = ".reshard"  # inside the step directory; holds only derived files and is removed after loading
UNIVERSAL_TAG = "ds_universal"  # the converted checkpoint, under RESHARD_DIR


@dataclass(frozen=True)
class Layout:
    """How a DeepSpeed checkpoint holds its optimizer state: kind, ranks sharding it, precision."""

    optimizer: str  # "zero12" (ZeRO-1/2 partitions) | "zero3" | "replicated" (ZeRO-0: one full copy)
    world_size: int
    precision: str | None  # "bf16" | "fp32"; None: not known (a ZeRO-0 checkpoint without its recipe)

    def describe(self) -> str:
        names = {"zero12": "ZeRO-1/2", "zero3": "ZeRO-3", "replicated": "ZeRO-0"}
        ranks = "any number of ranks" if self.optimizer == "replicated" else f"{self.world_size} rank(s)"
        return " ".join(filter(None, [names[self.optimizer], self.precision, "on", ranks]))


def current_layout(zero_stage: int, precision: str, world_size: int) -> Layout:
    """The layout a backend with these settings writes."""
    return Layout({0: "replicated", 1: "zero12", 2: "zero12", 3: "zero3"}[zero_stage], world_size, precision)


def saved_layout(ds_dir: Path) -> Layout:
    """The layout of a checkpoint, from the file names DeepSpeed wrote under `ds_dir`:
    `[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt` per rank at ZeRO-1/2/3, plus per-rank model states
    at ZeRO-3; at ZeRO-0 only `mp_rank_00_model_states.pt`, which holds the whole optimizer (its precision
    then comes from the recipe saved beside it)."""
    optim = sorted(ds_dir.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"))
    if not optim:
        return Layout("replicated", 1, _recipe_precision(ds_dir.parent / "recipe.yaml"))
    precision = "bf16" if optim[0].name.startswith("bf16_") else "fp32"
    if any(ds_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")):
        return Layout("zero3", len(optim), precision)
    return Layout("zero12", len(optim), precision)


def _recipe_precision(recipe: Path) -> str | None:
    import yaml

    if not recipe.is_file():
        return None
    return ((yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("backend") or {}).get("precision")


def needs_conversion(saved: Layout, current: Layout) -> bool:
    """True when DeepSpeed cannot load `saved` directly but its universal checkpoint can (ZeRO-1/2 or
    ZeRO-3 on another world size or in another precision); raises RecipeError with the setting to use
    when neither can."""
    if saved.optimizer != current.optimizer:
        raise RecipeError(
            f"the checkpoint was written by {saved.describe()} and this run uses {current.describe()}; "
            "its optimizer state converts between numbers of ranks, not between ZeRO-0, ZeRO-1/2 and ZeRO-3. "
            f"Resume with {_settings(saved)} on any number of ranks"
        )
    if saved.optimizer == "replicated":
        if saved.precision and saved.precision != current.precision:
            raise RecipeError(
                f"the checkpoint was written by {saved.describe()} and this run uses {current.describe()}; "
                f"a ZeRO-0 optimizer state loads only in its own precision: resume with "
                f"backend.precision={saved.precision} (any number of ranks)"
            )
        return False
    return (saved.world_size, saved.precision) != (current.world_size, current.precision)


def _settings(layout: Layout) -> str:
    return {"zero12": "backend.zero_stage=1 or 2", "zero3": "backend.zero_stage=3",
            "replicated": "backend.zero_stage=0"}[layout.optimizer]


def universal_on_every_rank(step_dir: Path, ds_tag: str, rank: int, barrier: Callable[[], None],
                            root: Path | None = None, finish: Callable[[Path], None] | None = None) -> Path:
    """Collective: rank 0 converts step_dir/ds_tag into `root` (default step_dir/RESHARD_DIR), then runs
    `finish` on the conversion before publishing it, while the others wait for the result on the shared filesystem. They
    poll instead of waiting in a collective, whose timeout a large checkpoint's conversion can outlast.
    Returns `root`, the directory to load UNIVERSAL_TAG from."""
    root = root or step_dir / RESHARD_DIR
    failed = root / "FAILED"
    if rank == 0:
        failed.unlink(missing_ok=True)
    barrier()  # so that no rank reads a FAILED left by an earlier attempt
    if rank == 0:
        try:
            convert_to_universal(step_dir, ds_tag, root, finish)
        except Exception as exc:
            root.mkdir(parents=True, exist_ok=True)
            failed.write_text(str(exc), encoding="utf-8")
            raise
    else:
        done = root / UNIVERSAL_TAG / "zero" / "optimizer_state.pt"
        while not done.is_file():
            if failed.is_file():
                raise RuntimeError(f"rank 0 could not convert {step_dir / ds_tag}: {failed.read_text()}")
            time.sleep(1.0)
    barrier()
    return root


def convert_to_universal(step_dir: Path, ds_tag: str, root: Path | None = None,
                         finish: Callable[[Path], None] | None = None) -> Path:
    """Rank 0 only: write root/UNIVERSAL_TAG (root defaults to step_dir/RESHARD_DIR) from step_dir/ds_tag,
    atomically (a complete earlier conversion is reused), after `finish(conversion)` added to it. Returns
    root, the directory to load UNIVERSAL_TAG from.

    One process: the tool's worker pool would fork a process that already runs communication threads.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    root = root or step_dir / RESHARD_DIR
    out = root / UNIVERSAL_TAG
    if (out / "zero" / "optimizer_state.pt").is_file():
        return root
    tmp = root / (UNIVERSAL_TAG + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(step_dir / ds_tag), output_folder=str(tmp), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True,
        # Checkpoints of a plain nn.Module lack the metadata block Megatron-DeepSpeed adds; an empty one
        # is right for a model without tensor or pipeline parallelism.
        inject_missing_state=True,
    )
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # its progress bars
            ds_to_universal(args)
    except Exception as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"converting {step_dir / ds_tag} to a universal checkpoint failed: {exc}\n"
                           f"{log.getvalue()[-2000:]}") from exc
    if finish is not None:
        finish(tmp)
    os.replace(tmp, out)
    return root


def check_resumable_into(ds_dir: Path, zero_stage: int, precision: str, world_size: int) -> None:
    """Before any process starts: refuse a checkpoint that cannot load into the recipe's backend."""
    needs_conversion(saved_layout(ds_dir), current_layout(zero_stage, precision, world_size))


def saved_buffers(ds_dir: Path, names: set[str]) -> dict[str, "torch.Tensor"]:
    """The module buffers `names` as saved in the checkpoint's first model-states file. A universal load
    restores parameters and optimizer state only, so buffers a plugin keeps as state (e.g. QAT's
    calibrated step sizes) are read here. The file is memory-mapped: the weights in it are not read."""
    import torch

    files = sorted(ds_dir.glob("*mp_rank_00_model_states.pt"))
    if not files or not names:
        return {}
    module = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False).get("module") or {}
    return {k: v.clone() for k, v in module.items() if k in names}
