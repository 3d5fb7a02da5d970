"""Helpers to run `slimtrain train` on 2 gloo ranks as a real user would (subprocess, torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny-cpu.yaml"


def train_cmd(run_dir: Path, cache: Path, overrides: list[str], nproc: int) -> list[str]:
    return [sys.executable, "-m", "slimtrain.trainer.cli", "train", str(TINY), f"--nproc={nproc}",
            f"run.output_dir={run_dir}", f"data.cache_dir={cache}", *overrides]


def run_train(run_dir: Path, cache: Path, overrides: list[str] = (), nproc: int = 2, fault: str | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to completion; returns the finished process (stdout+stderr in .stdout)."""
    env = _env(fault)
    return subprocess.run(train_cmd(run_dir, cache, list(overrides), nproc), env=env, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def run_until_checkpoint_then_kill(run_dir: Path, cache: Path, step: int, overrides: list[str] = (),
                                   nproc: int = 2) -> None:
    """Start a run that hangs right after saving `step`, wait for that checkpoint, SIGKILL every process."""
    proc = subprocess.Popen(train_cmd(run_dir, cache, list(overrides), nproc), env=_env(f"hang_after_save@{step}"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if latest.is_file() and latest.read_text().strip() == f"step_{step:08d}":
                break
            if proc.poll() is not None:
                raise AssertionError(f"run ended before checkpoint {step}:\n{proc.stdout.read()}")
            time.sleep(0.2)
        else:
            raise AssertionError(f"checkpoint {step} never appeared")
    finally:
        kill_tree(proc.pid)
        proc.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every descendant: torchrun starts its workers in sessions of their own, so a
    process-group kill would leave them running."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


VOLATILE = {"time_s", "tokens_per_s", "mfu", "eval_s"}
"""Metric keys that depend on the machine's speed: left out when runs are compared record for record."""


def records(run_dir: Path) -> list[dict]:
    """Every metrics.jsonl record of a run, without the `VOLATILE` keys."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines]


def losses(run_dir: Path) -> dict[int, float]:
    """step → training loss from metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def grad_norms(run_dir: Path) -> dict[int, float | None]:
    """step → gradient norm (before clipping) from metrics.jsonl."""
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["grad_norm"] for r in records if "loss" in r}


def _env(fault: str | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("SLIMTRAIN_FAULT", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if fault:
        env["SLIMTRAIN_FAULT"] = fault
    return env


def run_and_signal(run_dir: Path, cache: Path, signum: int, after_step: int, overrides: list[str] = ()) -> subprocess.CompletedProcess:
    """Start a slowed-down run, send `signum` to the launching process once `after_step` is logged."""
    proc = subprocess.Popen(train_cmd(run_dir, cache, list(overrides), 2), env=_env("slow_step@1-1000"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and any(json.loads(x).get("step", 0) >= after_step for x in metrics.read_text().splitlines()):
            proc.send_signal(signum)
            break
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)
