"""`slimtrain reproduce --suite smoke|cpu|gpu`: the reproduction suite of `recipes/reproduce/suite.yaml`.

Each entry is a recipe whose `expect:` block cites a claim, trained into `<out>/<entry name>` (or, with `command`,
a benchmark that writes its JSON there instead of training), then checked as `slimtrain reproduce --from` would.
Entries run in the manifest's order, so a baseline run (`baseline: {run: ../NAME}`) is listed before the entries
that compare with it. Tiers nest: `cpu` runs the smoke entries too; `gpu` entries are only run on a GPU.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from slimtrain.trainer.errors import RecipeError

REPO = Path(__file__).resolve().parents[2]
SUITE_FILE = REPO / "recipes" / "reproduce" / "suite.yaml"
TIERS = {"smoke": ("smoke",), "cpu": ("smoke", "cpu"), "gpu": ("gpu",)}
"""Which entries each `--suite` value runs."""
TIERS_RUNNING = {tier: tuple(k for k, v in TIERS.items() if tier in v) for tier in ("smoke", "cpu", "gpu")}
"""tier -> the `--suite` values that run an entry of that tier."""


class SuiteEntry(BaseModel):
    """One claim of the suite: the recipe that checks it and how its run directory is filled."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="The entry's run directory name under the "
                      "suite's output directory; baselines name it as ../NAME.")
    claim: str = Field(description="The claim, in a line (the paper's, or what the baseline run is for).")
    tier: Literal["smoke", "cpu", "gpu"] = Field(description="smoke: also run by `make test`; cpu: the full CPU "
                                                 "suite; gpu: needs a GPU, not run on CPU.")
    recipe: str = Field(description="The recipe (relative to the manifest): trained unless `command` is given; "
                        "its expect: block, when it has one, is checked on the run directory.")
    command: str | None = Field(None, description="A shell command (a benchmark) run from the repository root in "
                                "place of training; {run_dir}, {suite_out} and {python} are substituted.")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides of the recipe; {suite_out} "
                                 "is the suite's output directory (checkpoint.branch_from={suite_out}/dense/...).")
    nproc: int = Field(1, ge=1, description="Local processes of the training run.")
    minutes: float = Field(gt=0, description="Wall time measured on the 2-core CPU machine (or the GPU), minutes.")
    known_miss: str | None = Field(None, description="Why the claim does not reproduce at this size, with what was "
                                   "measured: the entry still runs and is checked, its miss is reported as known "
                                   "and fails nothing; meeting every target then fails the suite, so that the note "
                                   "is removed.")


class Suite(BaseModel):
    """recipes/reproduce/suite.yaml."""

    model_config = ConfigDict(extra="forbid")

    entries: list[SuiteEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> "Suite":
        names = [e.name for e in self.entries]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"entry names must be unique (they are run directories): {', '.join(dup)} repeated")
        return self

    def select(self, tier: str, only: list[str] | None = None) -> list[SuiteEntry]:
        """The entries `--suite tier` runs, in manifest order; with `only`, just those (their baselines must have
        run into the same output directory before)."""
        entries = [e for e in self.entries if e.tier in TIERS[tier]]
        unknown = sorted(set(only or ()) - {e.name for e in entries})
        if unknown:
            raise RecipeError(f"--only {' '.join(unknown)}: no such entry in --suite {tier}; its entries: "
                              f"{', '.join(e.name for e in entries)}")
        return [e for e in entries if not only or e.name in only]


def load_suite(path: Path = SUITE_FILE) -> Suite:
    """The manifest, every entry's recipe validated, and every run an entry needs (a baseline run, a
    {suite_out}/NAME in its overrides or command) checked to be an earlier entry of a tier that runs whenever this
    one does."""
    from slimtrain.trainer.recipe.schema import load_recipe

    try:
        suite = Suite.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except ValidationError as exc:
        raise RecipeError(f"{path}: {exc}") from exc
    seen: dict[str, str] = {}
    for e in suite.entries:
        recipe = load_recipe(str(path.parent / e.recipe), [_fill(o, suite_out="runs/reproduce") for o in e.overrides])
        for what, other in _needed_runs(e, recipe):
            if other not in seen:
                raise RecipeError(f"{path}: entry {e.name!r}, {e.recipe} {what}: no earlier entry is named "
                                  f"{other!r}; list it before {e.name!r}")
            if not set(TIERS_RUNNING[e.tier]) <= set(TIERS_RUNNING[seen[other]]):
                raise RecipeError(f"{path}: entry {e.name!r} (tier {e.tier}) needs {other!r} (tier {seen[other]}), "
                                  f"which `--suite {e.tier}` does not run; give {other!r} tier {e.tier} or lower")
        if e.known_miss is not None and (recipe.expect is None or not (recipe.expect.targets or recipe.expect.curves)):
            raise RecipeError(f"{path}: entry {e.name!r} has known_miss but {e.recipe} has no expect: targets, so "
                              "nothing can miss; remove known_miss or add the targets")
        seen[e.name] = e.tier
    return suite


def _needed_runs(entry: SuiteEntry, recipe) -> list[tuple[str, str]]:
    """(where, entry name) of every other entry's run this one reads: its targets' `baseline: {run: ../NAME}` and
    each {suite_out}/NAME in its overrides and command."""
    found = []
    for i, t in enumerate(recipe.expect.targets if recipe.expect else []):
        run = t.baseline.run if t.baseline is not None else None
        if run and run.startswith("../"):
            found.append((f"expect.targets.{i}.baseline.run={run!r}", run[3:]))
    for where, text in [*(("overrides", o) for o in entry.overrides), ("command", entry.command or "")]:
        found += [(f"{where} {text!r}", name) for name in re.findall(r"\{suite_out\}/([a-z0-9][a-z0-9-]*)", text)]
    return found


def run_suite(tier: str, out: Path, overrides: list[str], path: Path = SUITE_FILE,
              only: list[str] | None = None) -> int:
    """Run and check every entry of `tier` (or those named in `only`); print one line per entry and a summary. 0
    when every target is met."""
    suite = load_suite(path)
    entries = suite.select(tier, only)
    if tier == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise RecipeError("--suite gpu: no GPU here; run it on a GPU machine (the CPU suite is --suite cpu)")
    print(f"suite {tier}: {len(entries)} entries, about {sum(e.minutes for e in entries):.0f} min on 2 CPU cores")
    results = []
    for e in entries:
        start = time.monotonic()
        rc = run_entry(e, out / e.name, overrides, path.parent)
        results.append((e, rc, time.monotonic() - start))
    print(f"\nsuite {tier}:")
    failed, known = [], []
    for e, rc, seconds in results:
        verdict = _verdict(e, rc)
        print(f"  {e.name:<22} {verdict:<12} {seconds:6.0f} s  {e.claim}")
        if verdict == "known miss":
            known.append(e)
        elif verdict != "pass":
            failed.append(e.name)
    print(f"{len(results) - len(failed) - len(known)} of {len(results)} entries passed"
          + (f"; {len(known)} known miss" if known else "") + (f"; failed: {', '.join(failed)}" if failed else ""))
    for e in known:
        print(f"  known miss, {e.name}: {e.known_miss}")
    return 1 if failed else 0


def _verdict(entry: SuiteEntry, rc: int) -> str:
    """pass, FAIL, known miss (a target missed where the manifest says it does), or FAIL: now passes (the manifest
    says it misses: remove its known_miss)."""
    if entry.known_miss is None:
        return "pass" if rc == 0 else "FAIL"
    if rc == 1:
        return "known miss"
    return "FAIL: now passes (remove known_miss)" if rc == 0 else "FAIL"


def run_entry(entry: SuiteEntry, run_dir: Path, overrides: list[str], base: Path) -> int:
    """Fill the entry's run directory (train its recipe, or run its command), then check its expect: block: 0 when
    every target is met, 1 on a miss, 2 when the training or the command failed, 3 when a target's value (or its
    baseline's) could not be read."""
    from slimtrain.trainer.recipe.schema import load_recipe
    from slimtrain.trainer.reproduce.command import check_run, reference_path

    recipe_path = str(base / entry.recipe)
    suite_out = str(run_dir.parent.resolve())
    every = [*(_fill(o, suite_out=suite_out) for o in entry.overrides), *overrides,
             f"run.output_dir={run_dir.resolve()}"]
    recipe = load_recipe(recipe_path, every)
    print(f"\n== {entry.name}: {entry.claim}", flush=True)
    if entry.command is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        command = _fill(entry.command, run_dir=shlex.quote(str(run_dir.resolve())), python=shlex.quote(sys.executable),
                        suite_out=shlex.quote(suite_out))
        rc = subprocess.run(command, shell=True, cwd=REPO).returncode
    else:
        cmd = [sys.executable, "-m", "slimtrain.trainer.cli", "train", recipe_path, f"--nproc={entry.nproc}", *every]
        rc = subprocess.run(cmd, cwd=REPO).returncode
    if rc:
        print(f"{entry.name}: {'the command' if entry.command else 'training'} exited with {rc}", flush=True)
        return 2  # not a target's miss (1): a known miss must not hide a crash
    if recipe.expect is None:
        return 0
    return check_run(recipe_path, recipe, run_dir, reference_path(recipe_path, recipe.expect), unreadable=3)


def _fill(text: str, **values: str) -> str:
    """`text` with each {name} of `values` replaced; other braces (a shell command's JSON) are left as they are."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text
