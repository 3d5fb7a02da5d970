"""Checkpoints: a directory per step, completed atomically, `latest` replaced only after all ranks finished.

Layout under `{run}/checkpoints/`:

    step_00000100/ds/...            the backend's (sharded) state, written by every rank
    step_00000100/rng/rank_00000.pt RNG states of each rank
    step_00000100/trainer_state.json step, tokens, loader state, counters
    step_00000100/recipe.yaml       the resolved recipe
    step_00000100/tokenizer/        the tokenizer files (export copies them into the HF directory)
    step_00000100/manifest.json     every file and its size; written last: its presence means complete
    latest                          the name of the newest complete step directory

A save writes into `step_X.tmp/`, flushes every file to disk, writes the manifest and renames the
directory, so a crash mid-save (or a node losing power) leaves the previous checkpoint as `latest`. A save
that fails (disk full, no permission) stops the run on every rank with a CheckpointError that says so. On
resume a checkpoint whose files do not match its manifest is skipped with a warning in favour of the
previous complete one; when none is complete the run stops rather than start again from step 0 over them.
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
from slimtrain.trainer.errors import CheckpointError
from slimtrain.trainer.testing.faults import maybe_fault

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
    is self-contained for export. A save that fails part-way (disk full, no permission) raises CheckpointError
    on every rank, `latest` still naming the previous checkpoint; a rank that fails inside the backend's own
    save cannot tell the others (they wait in its collectives), and its launcher ends them.
    """
    final = root / step_dir_name(step)
    tmp = root / (final.name + ".tmp")
    _agreed(backend, root, step, lambda: _start_save(root, tmp, backend.rank))
    try:
        backend.save(tmp)
    except Exception as exc:
        raise CheckpointError(_save_failed(root, step, f"rank {backend.rank}: {exc}")) from exc
    _agreed(backend, root, step, lambda: _save_rank_files(tmp, step, backend.rank))
    maybe_fault("die_during_save", step, backend.rank)

    def complete() -> None:
        if backend.rank == 0:
            _complete(root, tmp, final, step, state, recipe_yaml, keep, copy_dirs)

    _agreed(backend, root, step, complete)
    return final


def _start_save(root: Path, tmp: Path, rank: int) -> None:
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


def _save_rank_files(tmp: Path, step: int, rank: int) -> None:
    """What every rank adds to the backend's state: its RNG states; one rank per node flushes the node's files."""
    maybe_fault("disk_full_during_save", step, rank)
    _save_rng(tmp / "rng" / f"rank_{rank:05d}.pt")
    if int(os.environ.get("LOCAL_RANK", rank)) == 0:
        _sync_tree(tmp)  # one rank per node flushes what that node's ranks wrote (the page cache is per node)


def _complete(root: Path, tmp: Path, final: Path, step: int, state: dict[str, Any], recipe_yaml: str, keep: int,
              copy_dirs: dict[str, Path] | None) -> None:
    """Rank 0, after every rank's files are on disk: trainer state, recipe, copies, manifest; then the rename and
    `latest`. What it writes is flushed too: the manifest must not reach the disk first."""
    _write_json(tmp / STATE, state)
    _write_durably(tmp / "recipe.yaml", recipe_yaml)
    for name, src in (copy_dirs or {}).items():
        shutil.copytree(src, tmp / name, dirs_exist_ok=True)
        _sync_tree(tmp / name)
    _fsync_dir(tmp)
    _write_json(tmp / MANIFEST, {"step": step, "files": _file_sizes(tmp)})
    _replace_dir(tmp, final)
    _write_latest(root, final.name)
    _apply_retention(root, keep, protect=final.name)


def _agreed(backend: Backend, root: Path, step: int, work) -> None:
    """Collective: run this rank's `work`, then stop every rank (CheckpointError) if it failed on any. Rank 0
    removes the unfinished step directory: nothing more is written into it."""
    try:
        work()
        error = None
    except Exception as exc:
        error = exc
    failed = float(error is not None)
    if backend.world_size > 1:
        (failed,) = backend.all_reduce_sum([failed])
    if not failed:
        return
    if backend.rank == 0:
        shutil.rmtree(root / (step_dir_name(step) + ".tmp"), ignore_errors=True)
    why = (f"rank {backend.rank}: {error}" if error is not None
           else f"{int(failed)} other rank(s) failed; see their errors")
    raise CheckpointError(_save_failed(root, step, why)) from error


def _save_failed(root: Path, step: int, why: str) -> str:
    latest = root / "latest"
    kept = f"{latest.read_text().strip()} stays `latest`" if latest.is_file() else "no earlier checkpoint exists"
    return (f"saving the checkpoint of step {step} into {root} failed ({why}); the run stopped. {kept}, and nothing "
            "of the failed save is used. Free space or fix permissions there (or set another run.output_dir), then "
            "run the same command again to resume from the last complete checkpoint")


def find_resumable(root: Path) -> Path | None:
    """The newest complete checkpoint: `latest` if it verifies, else the newest step dir that does.

    None when `root` holds no checkpoint at all (a fresh run). Raises CheckpointError when it holds some
    but none is complete: starting from step 0 would overwrite them and mix two runs' metrics.
    """
    if not root.is_dir():
        return None
    candidates = []
    latest = root / "latest"
    if latest.is_file():
        candidates.append(root / latest.read_text().strip())
    candidates += sorted((p for p in root.iterdir() if STEP_RE.match(p.name)), reverse=True)
    problems: dict[Path, str] = {}
    for path in candidates:
        if path in problems:
            continue
        problem = verify_checkpoint(path) if path.is_dir() else "no such directory"
        if problem is None:
            return path
        problems[path] = problem
        warnings.warn(f"skipping checkpoint {path}: {problem}; falling back to an older one", stacklevel=2)
    if not problems:
        return None
    shown = "; ".join(f"{p.name}: {why}" for p, why in problems.items())
    raise CheckpointError(f"{root} holds checkpoints but none is complete ({shown})")


def find_resume_point(root: Path) -> Path | None:
    """`find_resumable` for a training run, whose error says how to go on."""
    try:
        return find_resumable(root)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}. Nothing was overwritten. To train from step 0, set checkpoint.resume=never (the old "
            "checkpoints and metrics are moved into previous_N/) or choose a new run.output_dir; to keep "
            "this run, put back a complete step directory"
        ) from None


def step_of(path: Path) -> int:
    """The step number of a step directory `step_XXXXXXXX`."""
    match = STEP_RE.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a step directory (step_XXXXXXXX)")
    return int(match.group(1))


def move_aside(run_dir: Path, names: tuple[str, ...]) -> Path | None:
    """Move the named entries of `run_dir` (an earlier run's checkpoints, metrics...) into
    `run_dir/previous_<n>/`; returns that directory, or None when there was nothing to move."""
    present = [run_dir / n for n in names if (run_dir / n).exists()]
    if not present:
        return None
    n = 1
    while (run_dir / f"previous_{n}").exists():
        n += 1
    dest = run_dir / f"previous_{n}"
    dest.mkdir()
    for p in present:
        os.replace(p, dest / p.name)
    return dest


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


def _sync_tree(directory: Path) -> None:
    """fsync every file under `directory`, then the directories (the names), so a crash of a machine
    cannot leave a manifest that lists files still only in its page cache. fsync flushes a file's dirty
    pages whichever process wrote them, so one call per node covers all of that node's ranks."""
    dirs = [directory, *(p for p in directory.rglob("*") if p.is_dir())]
    for p in directory.rglob("*"):
        if p.is_file():
            _fsync(p, os.O_RDONLY)
    for d in dirs:
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries (the names of files just created or renamed in it)."""
    _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the files are what matters
        pass
    finally:
        os.close(fd)


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _write_json(path: Path, obj: Any) -> None:
    _write_durably(path, json.dumps(obj, indent=1))


def _write_durably(path: Path, text: str) -> None:
    """`text` into `path` through a flushed `.part` file and a rename: a reader sees all of it or none."""
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replace_dir(src: Path, dst: Path) -> None:
    # A re-save of an existing step keeps the old copy until the new one is in place.
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        if old.exists() and not dst.exists():
            os.replace(old, dst)  # the checkpoint `latest` names stays where it names it
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_latest(root: Path, name: str) -> None:
    _write_durably(root / "latest", name + "\n")
    _fsync_dir(root)


def _apply_retention(root: Path, keep: int, protect: str) -> None:
    """Keep the newest `keep` step directories (by step number) and drop what crashed saves left behind
    (`step_X.tmp`, `step_X.old`): only rank 0 writes here, and only after its own save completed."""
    steps = sorted((p for p in root.iterdir() if STEP_RE.match(p.name)), key=step_of, reverse=True)
    for old in steps[keep:]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in root.iterdir():
        base, dot, suffix = leftover.name.rpartition(".")
        if dot and suffix in ("tmp", "old") and STEP_RE.match(base) and leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
