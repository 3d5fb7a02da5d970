"""Resuming a DeepSpeed checkpoint on another number of ranks.

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
from dataclasses import dataclass
from pathlib import Path

from slimtrain.trainer.errors import RecipeError

RESHARD_DIR = ".reshard"  # inside the step directory; holds only derived files and is removed after loading
UNIVERSAL_TAG = "ds_universal"  # the converted checkpoint, under RESHARD_DIR


@dataclass(frozen=True)
class Layout:
    """Which DeepSpeed optimizer wrote (or would write) a checkpoint, and how many ranks shard it."""

    optimizer: str  # "zero12" | "zero3" | "bf16" (DeepSpeed's bf16 optimizer) | "torch" (unsharded)
    world_size: int

    def describe(self) -> str:
        names = {"zero12": "ZeRO-1/2", "zero3": "ZeRO-3", "bf16": "the bf16 optimizer of ZeRO-0/1",
                 "torch": "ZeRO-0 fp32"}
        ranks = "any number of ranks" if self.optimizer == "torch" else f"{self.world_size} rank(s)"
        return f"{names[self.optimizer]} on {ranks}"


def current_layout(zero_stage: int, precision: str, offload_optimizer: bool, world_size: int) -> Layout:
    """The layout a backend with these settings writes (DeepSpeed picks its bf16 optimizer for bf16
    at ZeRO-0, and at ZeRO-1 unless the optimizer is offloaded)."""
    if zero_stage == 3:
        return Layout("zero3", world_size)
    if precision == "bf16" and (zero_stage == 0 or (zero_stage == 1 and not offload_optimizer)):
        return Layout("bf16", world_size)
    return Layout("zero12" if zero_stage > 0 else "torch", world_size)


def saved_layout(ds_dir: Path) -> Layout:
    """Read the layout from the file names DeepSpeed wrote under `ds_dir` (no file is opened)."""
    optim = sorted(ds_dir.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"))
    if not optim:
        return Layout("torch", 1)
    if any(ds_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")):
        return Layout("zero3", len(optim))
    if all(p.name.startswith("bf16_") for p in optim):
        return Layout("bf16", len(optim))
    return Layout("zero12", len(optim))


def needs_conversion(saved: Layout, current: Layout) -> bool:
    """True when DeepSpeed cannot load `saved` directly but its universal checkpoint can (same optimizer,
    another world size); raises RecipeError with the settings to use when neither can."""
    if saved.optimizer != current.optimizer:
        raise RecipeError(
            f"the checkpoint was written by {saved.describe()} and this run uses {current.describe()}; "
            "its optimizer state converts between numbers of ranks, not between DeepSpeed optimizers. "
            f"Resume with the checkpoint's settings ({_settings(saved)}) on any number of ranks"
        )
    return saved.optimizer != "torch" and saved.world_size != current.world_size


def _settings(layout: Layout) -> str:
    return {"zero12": "backend.zero_stage=2, or 1 with precision fp32", "zero3": "backend.zero_stage=3",
            "bf16": "backend.precision=bf16 with backend.zero_stage=1 or 0",
            "torch": "backend.zero_stage=0 backend.precision=fp32"}[layout.optimizer]


def convert_to_universal(step_dir: Path, ds_tag: str) -> Path:
    """Rank 0 only: write step_dir/RESHARD_DIR/UNIVERSAL_TAG from step_dir/ds_tag, atomically (a complete
    earlier conversion is reused). Returns RESHARD_DIR, the directory to load UNIVERSAL_TAG from.

    One process: the tool's worker pool would fork a process that already runs communication threads.
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    root = step_dir / RESHARD_DIR
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
    os.replace(tmp, out)
    return root


def check_resumable_into(ds_dir: Path, zero_stage: int, precision: str, offload_optimizer: bool,
                         world_size: int) -> None:
    """Before any process starts: refuse a checkpoint whose DeepSpeed optimizer differs from the recipe's
    (another world size is fine: that is converted at load)."""
    needs_conversion(saved_layout(ds_dir), current_layout(zero_stage, precision, offload_optimizer, world_size))


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
