"""The recipe's `expect:` block: the results a run of the recipe should reach, each with where it came from.

A target names a figure of the run (a metrics.jsonl key, a derived figure such as `flops`, or a key of a
benchmark's JSON output), how it is read (final value, at a step, a mean over the last logged values, or at the
step where another figure first reaches a value) and what it must be (a bound, a value within a tolerance, or
both). A curve target holds a metric's whole curve against a reference run's. Checking is `check.py`'s.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TargetSource(_Strict):
    """Where a target's value comes from, so that a miss can be weighed (a 7B paper figure is a direction, a
    reference run of ours at a commit is a number)."""

    kind: Literal["paper", "gpu_run", "reference_run"] = Field(
        description="paper: a published figure (give `citation`); gpu_run: a run of ours on a GPU (give `device`, "
        "and `commit` when known); reference_run: a run of ours at a commit (give `commit`).")
    citation: str | None = Field(None, description="paper: authors, title, venue or arXiv id, and the table or "
                                 "figure the value is from.")
    commit: str | None = Field(None, description="The slimtrain git commit the reference or GPU run ran at.")
    device: str | None = Field(None, description="gpu_run: the device it ran on, e.g. '1x H100 80GB'.")
    note: str | None = Field(None, description="Anything that qualifies the value, e.g. 'paper: 7B model; a small "
                             "model shows the direction only', or the benchmark command and results file.")

    @model_validator(mode="after")
    def _check(self) -> "TargetSource":
        needed = {"paper": "citation", "gpu_run": "device", "reference_run": "commit"}[self.kind]
        if getattr(self, needed) is None:
            raise ValueError(f"kind={self.kind!r} needs {needed}: "
                             + {"citation": "the paper and the table or figure the value is from",
                                "device": "the GPU the run used, e.g. '1x H100 80GB'",
                                "commit": "the git commit the reference run ran at"}[needed])
        return self

    def describe(self) -> str:
        """One line for the report."""
        parts = {"paper": [self.citation], "gpu_run": [self.device, self.commit and f"commit {self.commit}"],
                 "reference_run": [f"reference run, commit {self.commit}"]}[self.kind]
        return "; ".join(p for p in [*parts, self.note] if p)


class Reach(_Strict):
    """Select the first logged step at which `metric` reaches a value (e.g. the tokens or FLOPs it took the
    eval loss to fall to 5.0)."""

    metric: str = Field(description="The metric whose value selects the step, e.g. eval_loss.")
    at_most: float | None = Field(None, description="The step is the first where `metric` <= this.")
    at_least: float | None = Field(None, description="The step is the first where `metric` >= this.")

    @model_validator(mode="after")
    def _check(self) -> "Reach":
        if (self.at_most is None) == (self.at_least is None):
            raise ValueError(f"when: give exactly one of at_most or at_least (the value {self.metric} must reach)")
        return self


class Baseline(_Strict):
    """Another run's (or another key's) value that the target's value is compared with: the target then judges
    `value - baseline` (difference) or `value / baseline` (ratio), e.g. the MoE's eval loss minus the dense
    model's, or the FLOPs to an eval loss over bfd's. It is read as the target reads its own value (the same
    step, mean_last or when)."""

    run: str | None = Field(None, description="The other run's directory, relative to this run's directory (e.g. "
                            "../moe-dense: a sibling run of the suite) or absolute; default: this run.")
    metric: str | None = Field(None, description="The metric (or, with a file, the dotted key) to read there; "
                               "default: the target's metric.")
    file: str | None = Field(None, description="A benchmark JSON in that run directory to read `metric` from; "
                             "default: the target's file (none: metrics.jsonl).")
    how: Literal["difference", "ratio"] = Field("difference", description="difference: value - baseline; ratio: "
                                                "value / baseline.")

    @model_validator(mode="after")
    def _check(self) -> "Baseline":
        if self.run is None and self.metric is None and self.file is None:
            raise ValueError("baseline: name the other run (run: ../NAME), or the other metric or file to compare "
                             "with; as it is the target would be compared with itself")
        return self

    def describe(self) -> str:
        """How the baseline is named in the table."""
        what = ":".join(p for p in (self.file, self.metric) if p) or "same"
        op = "-" if self.how == "difference" else "/"
        return f" {op} {(self.run + ':') if self.run else ''}{what}"


class Target(_Strict):
    """One figure the run must reach."""

    name: str | None = Field(None, description="Label in the table (default: the metric, with its step).")
    metric: str = Field(
        description="A metrics.jsonl key (loss, eval_loss, moe/maxvio, eval/draft/eagle3/tau, "
        "eval/compressor/gap_closed, ...), the derived `flops` (training FLOPs so far), or with `file` a dotted key "
        "path into that JSON (e.g. quality.runs.moe-bias.maxvio_last_quarter). Names are checked against what the "
        "trainer and the recipe's plugins write (docs/reproduce.md).")
    file: str | None = Field(
        None, description="Read `metric` from a benchmark's JSON output instead of metrics.jsonl: a path relative "
        "to the run directory (or absolute); a file of several JSON lines gives its last one.")
    step: int | None = Field(None, ge=1, description="The value logged at this step (default: the last one logged).")
    mean_last: int = Field(1, ge=1, description="The mean of the last this many logged values up to `step` (or the "
                           "end): smooths a per-step figure such as MaxVio.")
    when: Reach | None = Field(None, description="Read `metric` at the first step where another metric reaches a "
                               "value (FLOPs or tokens to reach an eval loss).")
    target: float = Field(description="The expected value.")
    direction: Literal["at_most", "at_least"] | None = Field(
        None, description="at_most: the value must be <= target (+ tolerance); at_least: >= target (- tolerance). "
        "Without a direction the value must be within the tolerance of the target on either side.")
    tolerance: float | None = Field(None, ge=0, description="Absolute slack: |value - target| <= tolerance, or the "
                                    "bound of `direction` moved out by it.")
    rel_tolerance: float | None = Field(None, ge=0, description="Slack as a fraction of |target| (0.02 = 2 %), in "
                                        "place of `tolerance`.")
    baseline: Baseline | None = Field(
        None, description="Judge the value against another run's or key's: value - baseline (or / baseline), so "
        "that a claim 'A beats B' is one target; the target is then the bound on the difference (or ratio).")
    source: TargetSource = Field(description="Where the target value comes from.")

    @model_validator(mode="after")
    def _check(self) -> "Target":
        if self.direction is None and self.tolerance is None and self.rel_tolerance is None:
            raise ValueError(f"metric {self.metric!r}, target {self.target}: neither a direction nor a tolerance, so "
                             "nothing says how far off is a miss; add direction: at_most or at_least (a bound), "
                             "or tolerance: X (|value - target| <= X), or rel_tolerance: 0.05")
        if self.tolerance is not None and self.rel_tolerance is not None:
            raise ValueError(f"metric {self.metric!r}: tolerance and rel_tolerance both set; keep one")
        if self.file is not None and (self.step is not None or self.when is not None or self.mean_last != 1):
            raise ValueError(f"metric {self.metric!r} is read from file {self.file!r}, a benchmark's JSON, which has "
                             "no steps: drop step, when and mean_last")
        if self.step is not None and self.when is not None:
            raise ValueError(f"metric {self.metric!r}: step and when both choose the step; keep one")
        return self

    @property
    def slack(self) -> float:
        """The absolute tolerance (0 for a bare bound)."""
        if self.rel_tolerance is not None:
            return self.rel_tolerance * abs(self.target)
        return self.tolerance or 0.0

    @property
    def label(self) -> str:
        """The table's name for this target."""
        if self.name:
            return self.name
        where = (f" @ step {self.step}" if self.step else "") + (f" (mean of last {self.mean_last})"
                                                                  if self.mean_last > 1 else "")
        if self.when is not None:
            bound = f"<= {self.when.at_most}" if self.when.at_most is not None else f">= {self.when.at_least}"
            where = f" when {self.when.metric} {bound}"
        base = self.baseline.describe() if self.baseline is not None else ""
        return (f"{self.file}:" if self.file else "") + self.metric + where + base


class CurveTarget(_Strict):
    """A metric's curve against the reference run's (`expect.reference`), step by step."""

    metric: str = Field("loss", description="The metric whose curve is compared (loss, eval_loss, ...).")
    statistic: Literal["mean", "max"] = Field(
        "mean", description="How the relative deviations |run - reference| / |reference| at the steps both curves "
        "logged are summed up: their mean, or their max (every step within the tolerance).")
    tolerance: float = Field(gt=0, description="The largest allowed statistic, e.g. 0.02 (2 %).")
    from_step: int = Field(1, ge=1, description="Compare from this step on (warm-up losses move most from seed to "
                           "seed).")
    smooth: int = Field(1, ge=1, description="Moving average over this many logged points of both curves before "
                        "comparing (per-step loss is noisy).")
    source: TargetSource = Field(description="Where the reference curve comes from (usually a reference_run).")

    @property
    def label(self) -> str:
        """The table's name for this curve."""
        return f"{self.metric} curve ({self.statistic} rel. dev.)"


class ExpectConfig(_Strict):
    """What a run of this recipe should reach; `slimtrain reproduce` checks it (docs/reproduce.md)."""

    targets: list[Target] = Field(default_factory=list, description="Figures the run must reach.")
    curves: list[CurveTarget] = Field(default_factory=list, description="Curves held against the reference run's.")
    reference: str | None = Field(
        None, description="A reference run's per-step metrics (metrics.jsonl, or .jsonl.gz), relative to the recipe "
        "file or absolute; default: <recipe name>.reference.jsonl.gz next to the recipe when it exists. Plotted "
        "under the run's loss curve; `curves` need it.")

    @model_validator(mode="after")
    def _check(self) -> "ExpectConfig":
        if not self.targets and not self.curves:
            raise ValueError("expect: has no targets and no curves; add some (docs/reproduce.md) or remove the block")
        return self

    def metric_fields(self) -> list[tuple[str, str]]:
        """(recipe field, metric name) of every metrics.jsonl name the block uses (not benchmark keys)."""
        out = []
        for i, t in enumerate(self.targets):
            if t.file is None:
                out.append((f"expect.targets.{i}.metric", t.metric))
            b = t.baseline  # another run's names are that run's recipe's: checked when read
            if b is not None and b.run is None and b.metric is not None and (b.file or t.file) is None:
                out.append((f"expect.targets.{i}.baseline.metric", b.metric))
            if t.when is not None:
                out.append((f"expect.targets.{i}.when.metric", t.when.metric))
        out += [(f"expect.curves.{i}.metric", c.metric) for i, c in enumerate(self.curves)]
        return out
