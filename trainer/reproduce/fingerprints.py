"""What a run's result depends on beyond its recipe, recorded so that a mismatch can be traced: the recipe's hash,
the data and tokenizer fingerprints the project already keeps for resume checks (the loader state and the
tokenizer saved in every checkpoint), and the environment each job ran in (`environment.json`, written by rank 0
at the start of every job: package versions, device, world size, git commit)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

ENVIRONMENT_FILE = "environment.json"
PACKAGES = ("torch", "transformers", "deepspeed", "megatron-core", "triton")

# Fields that do not change what a run computes: where it writes, how it logs, what it is held to.
# (The data and tokenizer themselves are fingerprinted apart, from the run's checkpoint.)
NOT_HASHED = {"run": {"name", "output_dir", "local_procs"}, "checkpoint": {"every", "keep", "resume"},
              "data": {"cache_dir", "num_workers", "shard_size_mb"}, "logging": None, "expect": None,
              "extends": None}


def recipe_hash(recipe) -> str:
    """sha256 of the resolved recipe without the fields that change no result (`NOT_HASHED`)."""
    from slimtrain.data.sources import digest

    return digest(_hashed(recipe.model_dump(mode="json")))


def _hashed(dumped: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for block, value in dumped.items():
        if block in NOT_HASHED and NOT_HASHED[block] is None:
            continue
        if block in NOT_HASHED and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in NOT_HASHED[block]}
        out[block] = value
    return out


def recipe_differences(ours, theirs) -> list[str]:
    """The blocks (dotted to the first differing key) where two recipes differ in what they compute."""
    a, b = _hashed(ours.model_dump(mode="json")), _hashed(theirs.model_dump(mode="json"))
    return sorted(_diff(a, b, ""))


def _diff(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys() for d in _diff(a.get(k), b.get(k), f"{where}{k}.")]
    return [where.rstrip(".")] if a != b else []


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a run's numbers depend on most."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str:
    """The slimtrain source's git commit ('+dirty' with uncommitted changes), or its package version."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        try:
            return f"not a git checkout (slimtrain {metadata.version('slimtrain')})"
        except metadata.PackageNotFoundError:
            return "unknown"


def device_name() -> str:
    """The accelerator this process uses, or the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()} per node"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(world_size: int) -> dict[str, Any]:
    """This job's environment, as `environment.json` holds it."""
    return {"world_size": world_size, "device": device_name(), "git_commit": git_commit(),
            "python": platform.python_version(), "packages": package_versions()}


def write_environment(run_dir: Path, world_size: int) -> None:
    """Record this job's environment in the run directory (each job of a resumed run replaces the last's)."""
    path = run_dir / ENVIRONMENT_FILE
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(environment(world_size), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_fingerprints(run_dir: Path, recipe) -> dict[str, str]:
    """The fingerprints of a finished run that matter for a mismatch, each as one line of text."""
    from slimtrain.trainer.recipe.loading import validate_recipe

    out = {"recipe hash (this recipe)": recipe_hash(recipe)}
    saved = run_dir / "recipe.yaml"
    if saved.is_file():
        import yaml

        theirs = validate_recipe(yaml.safe_load(saved.read_text(encoding="utf-8")), source=str(saved))
        differs = recipe_differences(recipe, theirs)
        out["recipe hash (the run's recipe.yaml)"] = recipe_hash(theirs) + (
            f" — differs in {', '.join(differs)}" if differs else " (same)")
    out.update(_checkpoint_fingerprints(run_dir))
    env_file = run_dir / ENVIRONMENT_FILE
    if env_file.is_file():
        env = json.loads(env_file.read_text(encoding="utf-8"))
        out.update({"world size": str(env.get("world_size")), "device": str(env.get("device")),
                    "git commit": str(env.get("git_commit")), "python": str(env.get("python"))})
        out.update({f"{k}": v for k, v in env.get("packages", {}).items()})
    else:
        out["environment"] = f"not recorded ({ENVIRONMENT_FILE} is missing: a run from before it was written)"
    return out


def _checkpoint_fingerprints(run_dir: Path) -> dict[str, str]:
    """Data stream, dataset and tokenizer fingerprints and the world size, from the run's newest checkpoint."""
    from slimtrain.trainer.errors import CheckpointError
    from slimtrain.trainer.lifecycle.checkpoint import find_resumable

    try:
        step_dir = find_resumable(run_dir / "checkpoints")
    except CheckpointError as exc:
        return {"checkpoint": f"unreadable: {exc}"}
    if step_dir is None:
        return {"checkpoint": "none (data and tokenizer fingerprints come from a checkpoint)"}
    state = json.loads((step_dir / "trainer_state.json").read_text(encoding="utf-8"))
    loader = state.get("loader", {})
    done = "finished" if state.get("finished") else "NOT finished: stopped before train.steps"
    out = {"checkpoint": f"{step_dir.name} (step {state.get('step')}, {state.get('tokens_seen')} tokens, {done})",
           "data fingerprint (token shards of the split)": str(loader.get("stream", {}).get("data")),
           "data stream fingerprint (packer, seq_len, seed, ...)": str(loader.get("fingerprint"))}
    tok = step_dir / "tokenizer"
    if tok.is_dir():
        from slimtrain.data.tokenizer import tokenizer_hash_of

        out["tokenizer hash"] = tokenizer_hash_of(tok, str(tok))
    out["world size (checkpoint)"] = str(state.get("world_size"))
    return out

