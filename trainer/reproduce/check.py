"""Checking a run against its recipe's `expect:` block: one `Outcome` per target and per curve."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from slimtrain.trainer.errors import SlimtrainError
from slimtrain.trainer.reproduce.expect import CurveTarget, ExpectConfig, Target
from slimtrain.trainer.reproduce.run_data import RunMetrics, Series, benchmark_value


@dataclass
class Outcome:
    """The verdict on one target: what was measured, what was expected, and by how much it missed."""

    label: str
    value: float | None
    expected: str
    passed: bool
    miss: str
    """'' when met; otherwise by how much (absolute and relative to the target), or why there is no value."""
    source: str
    percent: bool = False
    """Whether `value` is a fraction shown as a percentage (a curve's deviation)."""


OpenRun = Callable[[Path], RunMetrics]
"""Reads another run directory's metrics (a baseline's), `flops` derived from that run's own recipe."""


def check_expect(expect: ExpectConfig, run: RunMetrics, run_dir: Path,
                 reference: RunMetrics | None, open_run: OpenRun | None = None) -> list[Outcome]:
    """Every target and curve of `expect` on `run` (a run directory's metrics), curves against `reference`;
    `open_run` reads the runs that baselines name."""
    out = [check_target(t, run, run_dir, open_run) for t in expect.targets]
    for curve in expect.curves:
        out.append(check_curve(curve, run, reference))
    return out


def check_target(target: Target, run: RunMetrics, run_dir: Path, open_run: OpenRun | None = None) -> Outcome:
    """One scalar target: read the value (against its baseline, when it has one), then hold it to the bound or
    tolerance."""
    expected = _expected(target)
    try:
        value = _read(target, run, run_dir)
        if target.baseline is not None:
            value = _against_baseline(target, value, run, run_dir, open_run or _open_plain)
    except SlimtrainError as exc:
        return Outcome(target.label, None, expected, False, f"no value: {exc}", target.source.describe())
    return Outcome(target.label, value, expected, *_judge(target, value), source=target.source.describe())


def _read(target: Target, run: RunMetrics, run_dir: Path) -> float:
    if target.file is not None:
        path = Path(target.file).expanduser()
        return benchmark_value(path if path.is_absolute() else run_dir / path, target.metric)
    series = run.series(target.metric)
    if not series:
        raise SlimtrainError(run.missing(target.metric))
    if target.when is not None:
        return _at_reach(target, run, series)
    if target.step is not None:
        series = [(s, v) for s, v in series if s <= target.step]
        if not series or series[-1][0] != target.step:
            logged = [s for s, _ in run.series(target.metric)]
            raise SlimtrainError(f"{target.metric} was not logged at step {target.step} (logged at steps "
                                 f"{_steps(logged)})")
    last = [v for _, v in series[-target.mean_last:]]
    return sum(last) / len(last)


def _against_baseline(target: Target, value: float, run: RunMetrics, run_dir: Path, open_run: OpenRun) -> float:
    """value - baseline (or value / baseline), the baseline read as the target reads its own value."""
    b = target.baseline
    other = target.model_copy(update={"metric": b.metric or target.metric, "file": b.file or target.file,
                                      "baseline": None})
    if b.run is not None:
        base_dir = Path(b.run).expanduser()
        base_dir = base_dir if base_dir.is_absolute() else run_dir / base_dir
        if not (base_dir / "metrics.jsonl").is_file() and other.file is None:
            raise SlimtrainError(f"baseline run {b.run} ({base_dir.resolve()}) has no metrics.jsonl; train it first "
                                 "(in a suite: list its entry before this one)")
        run, run_dir = open_run(base_dir), base_dir
    try:
        base = _read(other, run, run_dir)
    except SlimtrainError as exc:
        raise SlimtrainError(f"baseline: {exc}") from exc
    if b.how == "difference":
        return value - base
    if base == 0:
        raise SlimtrainError(f"baseline {other.label} is 0, so the ratio has no value")
    return value / base


def _open_plain(run_dir: Path) -> RunMetrics:
    if not (run_dir / "metrics.jsonl").is_file():
        return RunMetrics([], str(run_dir))
    return RunMetrics.of_run(run_dir)


def _at_reach(target: Target, run: RunMetrics, series: Series) -> float:
    when = target.when
    gate = run.series(when.metric)
    if not gate:
        raise SlimtrainError(run.missing(when.metric))
    reached = [s for s, v in gate if (v <= when.at_most if when.at_most is not None else v >= when.at_least)]
    if not reached:
        best = min(gate, key=lambda sv: sv[1]) if when.at_most is not None else max(gate, key=lambda sv: sv[1])
        bound = f"<= {when.at_most}" if when.at_most is not None else f">= {when.at_least}"
        raise SlimtrainError(f"{when.metric} never reached {bound} (best {best[1]:.4g} at step {best[0]})")
    values = dict(series)
    if reached[0] not in values:
        raise SlimtrainError(f"{when.metric} reached its value at step {reached[0]}, where {target.metric} was not "
                             "logged")
    return values[reached[0]]


def _expected(target: Target) -> str:
    slack = target.slack
    tol = f" (tolerance {slack:.4g})" if slack else ""
    if target.direction == "at_most":
        return f"<= {target.target:.4g}{tol}"
    if target.direction == "at_least":
        return f">= {target.target:.4g}{tol}"
    return f"{target.target:.4g} ± {slack:.4g}"


def _judge(target: Target, value: float) -> tuple[bool, str]:
    """(passed, by how much it missed): the distance past the bound (the tolerance included), and that distance
    relative to the target."""
    t, slack = target.target, target.slack
    if target.direction == "at_most":
        over = value - (t + slack)
        return over <= 0, "" if over <= 0 else f"{over:+.4g} over the bound{_relative(over, t)}"
    if target.direction == "at_least":
        under = (t - slack) - value
        return under <= 0, "" if under <= 0 else f"{-under:+.4g} under the bound{_relative(under, t)}"
    off = abs(value - t) - slack
    return off <= 0, "" if off <= 0 else f"{value - t:+.4g} from the target, {off:.4g} past the tolerance" \
                                          f"{_relative(value - t, t)}"


def _relative(diff: float, target: float) -> str:
    return f" ({abs(diff) / abs(target):.1%} of the target)" if target else ""


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}..{steps[-1]} ({len(steps)} records)"


# -- curves ------------------------------------------------------------------------------------------------------

def curve_deviations(run: Series, reference: Series, from_step: int = 1, smooth: int = 1) -> list[tuple[int, float]]:
    """(step, |run - reference| / |reference|) at every step from `from_step` on that both curves logged, after a
    moving average of `smooth` points over each curve."""
    ours, theirs = dict(_smoothed(run, smooth)), dict(_smoothed(reference, smooth))
    steps = sorted(s for s in ours.keys() & theirs.keys() if s >= from_step)
    return [(s, abs(ours[s] - theirs[s]) / max(abs(theirs[s]), 1e-12)) for s in steps]


def _smoothed(series: Series, window: int) -> Series:
    if window <= 1:
        return series
    values = [v for _, v in series]
    return [(s, sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1]))
            for i, (s, _) in enumerate(series)]


def check_curve(curve: CurveTarget, run: RunMetrics, reference: RunMetrics | None) -> Outcome:
    """A curve target: the mean or max relative deviation from the reference curve, held to the tolerance."""
    expected = f"<= {curve.tolerance:.2%}"
    fail = lambda why: Outcome(curve.label, None, expected, False, why, curve.source.describe())  # noqa: E731
    if reference is None:
        return fail("no value: the recipe ships no reference run (expect.reference)")
    ours, theirs = run.series(curve.metric), reference.series(curve.metric)
    if not ours:
        return fail(f"no value: {run.missing(curve.metric)}")
    if not theirs:
        return fail(f"no value: {reference.missing(curve.metric)}")
    devs = curve_deviations(ours, theirs, curve.from_step, curve.smooth)
    if not devs:
        return fail(f"no value: the run and the reference share no logged step from step {curve.from_step} on")
    values = [d for _, d in devs]
    stat = max(values) if curve.statistic == "max" else sum(values) / len(values)
    worst = max(devs, key=lambda sd: sd[1])
    passed = stat <= curve.tolerance
    miss = "" if passed else (f"{stat - curve.tolerance:+.2%} over the tolerance over {len(devs)} steps (worst "
                              f"{worst[1]:.2%} at step {worst[0]})")
    return Outcome(curve.label, stat, expected, passed, miss, curve.source.describe(), percent=True)
