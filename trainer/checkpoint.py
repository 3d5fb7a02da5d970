"""Checkpoints: a directory per step, completed atomically, `latest` replaced only after all ranks finished.

Layout under `{run}/checkpoints/`:

    step_00000100/ds/...            the backend's (sharded) state, written by every rank
    step_00000100/rng/rank_00000.pt RNG states of each rank
    step_00000100/trainer_state.json step, tokens, loader state, counters
    step_00000100/recipe.yaml       the resolved recipe
    step_00000100/tokenizer/        the tokenizer files (export copies them into the HF directory)
    step_00000100/manifest.json     every file and its size; written last: its presence means complete
    latest                          the name of the newest complete step directory

A save writes into `step_X.tmp/` and renames it when complete, so a crash mid-save leaves the previous
checkpoint as `latest`. On resume a checkpoint whose files do not match its manifest is skipped with
a warning in favour of the previous complete one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimtrain.trainer.backends.base import Backend
from slimtrain.trainer.faults import maybe_fault

STEP_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
STATE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint at `step`."""
    return f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, backend: Backend, state: dict[str, Any], recipe_yaml: str, keep: int,
                    copy_dirs: dict[str, Path] | None = None) -> Path:
    """Collective: every rank must call it. Returns the completed step directory.

    `copy_dirs` ({name: source}) are copied in by rank 0 (e.g. the tokenizer), so that a checkpoint
    is self-contained for export.
    """
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    if backend.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    backend.barrier()
    backend.save(tmp)
    _save_rng(tmp / "rng" / f"rank_{backend.rank:05d}.pt")
    maybe_fault("die_during_save", step, backend.rank)
    backend.barrier()
    if backend.rank == 0:
        _write_json(tmp / STATE, state)
        (tmp / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
        for name, src in (copy_dirs or {}).items():
            shutil.copytree(src, tmp / name, dirs_exist_ok=True)
        _write_json(tmp / MANIFEST, {"step": step, "files": _file_sizes(tmp)})
        _replace_dir(tmp, final)
        _write_latest(root, final.name)
        _apply_retention(root, keep, protect=final.name)
    backend.barrier()
    return final


def find_resumable(root: Path) -> Path | None:
    """The newest complete checkpoint: `latest` if it verifies, else the newest step dir that does."""
    if not root.is_dir():
        return None
    candidates = []
    latest = root / "latest"
    if latest.is_file():
        candidates.append(root / latest.read_text().strip())
    candidates += sorted((p for p in root.iterdir() if STEP_RE.match(p.name)), reverse=True)
    seen: set[Path] = set()
    for path in candidates:
        if path in seen:
            continue
        seen.add(path)
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}; falling back to an older one", stacklevel=2)
    return None


def verify_checkpoint(path: Path) -> str | None:
    """None if `path` is a complete checkpoint, else what is wrong with it."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest.json ({exc})"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"missing file {rel}"
        if f.stat().st_size != size:
            return f"file {rel} has {f.stat().st_size} bytes, manifest says {size} (truncated or corrupted)"
    return None


def load_checkpoint(path: Path, backend: Backend) -> dict[str, Any]:
    """Collective: restore backend state and this rank's RNG; returns the trainer state."""
    backend.load(path)
    load_rng(path, backend.rank)
    return json.loads((path / STATE).read_text())


def load_rng(path: Path, rank: int) -> None:
    """Restore this rank's RNG states from checkpoint `path` (a rank the saved run lacked keeps its own)."""
    rng = path / "rng" / f"rank_{rank:05d}.pt"
    if rng.is_file():
        _load_rng(rng)


def _save_rng(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, path)


def _load_rng(path: Path) -> None:
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replace_dir(src: Path, dst: Path) -> None:
    # A re-save of an existing step keeps the old copy until the new one is in place.
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _write_latest(root: Path, name: str) -> None:
    tmp = root / "latest.part"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def _apply_retention(root: Path, keep: int, protect: str) -> None:
    steps = sorted((p for p in root.iterdir() if STEP_RE.match(p.name)), reverse=True)
    for old in steps[keep:]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
