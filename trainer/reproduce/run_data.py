"""A finished run's figures as `expect:` reads them: metrics.jsonl records, the derived `flops`, a reference run's
curve (.jsonl or .jsonl.gz), and keys of a benchmark's JSON output."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any, Callable

from slimtrain.trainer.errors import SlimtrainError

Series = list[tuple[int, float]]
"""(step, value) pairs in step order."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a metrics file (metrics.jsonl, or a gzip-compressed one); half-written lines skipped."""
    if not path.is_file():
        raise SlimtrainError(f"{path} does not exist; give a run directory holding metrics.jsonl (or a reference "
                             "run's metrics file)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


class RunMetrics:
    """The records of one run (or a reference run's file), by metric name."""

    def __init__(self, records: list[dict[str, Any]], where: str) -> None:
        self.records = records
        self.where = where

    @classmethod
    def of_run(cls, run_dir: Path, flops_per_token: Callable[[int | None], float] | None = None) -> "RunMetrics":
        """A run directory's metrics.jsonl; with `flops_per_token(row_len)`, the derived `flops` too."""
        run = cls(read_records(Path(run_dir) / "metrics.jsonl"), str(run_dir))
        if flops_per_token is not None:
            run.add_flops(flops_per_token)
        return run

    def names(self) -> list[str]:
        """Every metric with a numeric value in some record."""
        return sorted({k for r in self.records for k, v in r.items() if _number(v) is not None and k != "step"})

    def series(self, name: str) -> Series:
        """(step, value) of every record holding `name` as a number (the last one per step)."""
        by_step = {}
        for r in self.records:
            value = _number(r.get(name))
            if value is not None and "step" in r:
                by_step[int(r["step"])] = value
        return sorted(by_step.items())

    def value_at(self, name: str, step: int) -> float | None:
        """`name` at `step`, or None when that step's records do not hold it."""
        return dict(self.series(name)).get(step)

    def add_flops(self, flops_per_token: Callable[[int | None], float]) -> None:
        """Add `flops` to every training record: the tokens since the previous record at that record's row length."""
        done, last_tokens = 0.0, 0
        for r in sorted((r for r in self.records if "tokens" in r and "loss" in r), key=lambda r: r["step"]):
            done += (r["tokens"] - last_tokens) * flops_per_token(r.get("row_len"))
            last_tokens = r["tokens"]
            r["flops"] = done

    def missing(self, name: str) -> str:
        """Why `name` cannot be read, naming what the run has."""
        return f"{self.where} has no {name!r}; it has: {', '.join(self.names()) or 'no metrics'}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def benchmark_value(path: Path, key: str) -> float:
    """The number at dotted `key` of a benchmark's JSON output `path` (its last JSON line: the scripts print
    progress before it); SlimtrainError naming the keys present where the path stops."""
    if not path.is_file():
        raise SlimtrainError(f"benchmark output {path} does not exist; run the benchmark with its JSON written there "
                             "(e.g. `python benchmarks/qat.py > RUN_DIR/bench-qat.json`)")
    node: Any = None
    for line in reversed(path.read_text(encoding="utf-8").splitlines()):
        try:
            node = json.loads(line)
            break
        except ValueError:
            continue
    if not isinstance(node, dict):
        raise SlimtrainError(f"{path} holds no JSON object on a line of its own")
    walked = []
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            keys = ", ".join(map(str, node)) if isinstance(node, dict) else f"a {type(node).__name__}"
            raise SlimtrainError(f"{path}: no key {part!r} under {'.'.join(walked) or 'the top'} (it has: {keys})")
        node, walked = node[part], walked + [part]
    value = _number(node)
    if value is None:
        raise SlimtrainError(f"{path}: {key} is {node!r}, not a finite number")
    return value


def flops_per_token_fn(run_dir: Path, recipe):
    """row_len -> training FLOPs per token of the run's model (from its newest checkpoint's model config), or None
    when the run has no checkpoint."""
    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.modules.transformer.config import ModelConfig
    from slimtrain.trainer.lifecycle.checkpoint import find_resumable

    step_dir = find_resumable(run_dir / "checkpoints")
    if step_dir is None:
        return None
    state = json.loads((step_dir / "trainer_state.json").read_text(encoding="utf-8"))
    cfg = ModelConfig.model_validate(state["model_config"])
    plugins = PluginStack.from_configs(recipe.plugins)
    cache: dict[int, float] = {}

    def per_token(row_len: int | None) -> float:
        n = row_len or recipe.data.seq_len
        if n not in cache:
            cache[n] = plugins.counts(cfg, n).flops_per_token
        return cache[n]

    return per_token
