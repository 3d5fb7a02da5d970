"""`expect:` validation, `slimtrain reproduce` (training, and --from a finished run) and `slimtrain compare`.

One tiny run (1 rank, 20 steps) is trained through `slimtrain reproduce` and shared by the tests below it."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.recipe.schema import load_recipe
from slimtrain.trainer.reproduce.check import check_target
from slimtrain.trainer.reproduce.command import reference_path
from slimtrain.trainer.reproduce.expect import Target
from slimtrain.trainer.reproduce.metric_names import TRAINER_METRICS
from slimtrain.trainer.reproduce.run_data import RunMetrics

from train_helpers import REPO, TINY, _env, losses, run_train

SOURCE = {"kind": "reference_run", "commit": "0123abc"}


def _recipe(tmp: Path, name: str, expect: dict, extends: Path = TINY, **blocks) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"extends": str(extends), **blocks, "expect": expect}), encoding="utf-8")
    return path


def _target(metric: str, **fields) -> dict:
    return {"metric": metric, "source": SOURCE, **fields}


# -- validation -------------------------------------------------------------------------------------------------

def test_unknown_metric_names_the_field_and_the_fix(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "typo", {"targets": [_target("eval_los", target=5.0, direction="at_most")]})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "expect.targets.0.metric='eval_los' is not a metric this recipe's run writes" in msg
    assert "did you mean 'eval_loss'?" in msg
    assert "file:" in msg  # the way to a benchmark's figure


def test_plugin_metrics_are_known_only_with_the_plugin(tmp_path: Path) -> None:
    moe = REPO / "recipes" / "moe-cpu.yaml"
    ok = _recipe(tmp_path, "moe", {"targets": [_target("moe/maxvio", target=0.5, direction="at_most",
                                                       mean_last=10),
                                               _target("moe/maxvio/layer1", target=1.0, direction="at_most"),
                                               _target("eval/moe/aux", target=1.0, direction="at_most")]},
                 extends=moe)
    assert load_recipe(ok).expect.targets[0].metric == "moe/maxvio"
    dense = _recipe(tmp_path, "dense", {"targets": [_target("moe/maxvio", target=0.5, direction="at_most")]})
    with pytest.raises(RecipeError, match=r"expect.targets.0.metric='moe/maxvio' is not a metric"):
        load_recipe(dense)
    draft = _recipe(tmp_path, "draft", {"targets": [_target("eval/draft/eagle3/tau", target=1.0,
                                                            direction="at_least"),
                                                    _target("eval/draft/medusa/tua", target=1.0,
                                                            direction="at_least")]},
                    extends=REPO / "recipes" / "draft-heads-cpu.yaml")
    with pytest.raises(RecipeError, match=r"expect.targets.1.metric='eval/draft/medusa/tua'.*did you mean "
                                          r"'eval/draft/medusa/tau'"):
        load_recipe(draft)


def test_target_needs_a_direction_or_a_tolerance(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "bare", {"targets": [_target("eval_loss", target=5.0)]})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert re.search(r"expect.targets.0: metric 'eval_loss', target 5.0: neither a direction nor a tolerance.*"
                     r"add direction: at_most or at_least.*or tolerance: X", str(err.value))


@pytest.mark.parametrize("expect, message", [
    ({"targets": [{"metric": "eval_loss", "target": 5.0, "direction": "at_most", "source": {"kind": "paper"}}]},
     r"expect.targets.0.source: kind='paper' needs citation"),
    ({"targets": [_target("eval_loss", target=5.0, tolerance=0.1, rel_tolerance=0.1)]},
     r"tolerance and rel_tolerance both set; keep one"),
    ({"targets": [_target("x.y", file="bench.json", step=3, target=1.0, direction="at_least")]},
     r"is read from file 'bench.json'.*drop step"),
    ({"targets": [_target("eval_loss", target=5.0, direction="at_mots")]},
     r"expect.targets.0.direction: got 'at_mots'.*did you mean 'at_most'"),
    ({"targets": []}, r"expect: has no targets and no curves"),
])
def test_expect_refusals(tmp_path: Path, expect: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(_recipe(tmp_path, "bad", expect))


def test_curves_need_a_reference_before_training(tmp_path: Path) -> None:
    path = _recipe(tmp_path, "curvy", {"curves": [{"metric": "loss", "tolerance": 0.05, "source": SOURCE}]})
    with pytest.raises(RecipeError, match=r"expect.curves needs a reference run.*curvy.reference.jsonl.gz"):
        reference_path(str(path), load_recipe(path).expect)


# -- reading and judging values (no run) ------------------------------------------------------------------------

def _records() -> RunMetrics:
    recs = [{"step": s, "loss": 6.0 - 0.1 * s, "tokens": 100 * s} for s in range(1, 11)]
    recs += [{"step": 5, "eval_loss": 5.6}, {"step": 10, "eval_loss": 5.2}]
    return RunMetrics(recs, "synthetic")


@pytest.mark.parametrize("fields, value, passed, miss", [
    ({"metric": "eval_loss", "target": 5.0, "direction": "at_most"}, 5.2, False, "+0.2 over the bound (4.0% of"),
    ({"metric": "eval_loss", "target": 5.0, "direction": "at_most", "tolerance": 0.25}, 5.2, True, ""),
    ({"metric": "eval_loss", "target": 5.3, "rel_tolerance": 0.01}, 5.2, False, "-0.1 from the target, 0.047 past"),
    ({"metric": "loss", "step": 4, "target": 5.6, "tolerance": 1e-9}, 5.6, True, ""),
    ({"metric": "loss", "mean_last": 3, "target": 5.5, "direction": "at_least"}, 5.1, False, "-0.4 under the bound"),
    ({"metric": "tokens", "when": {"metric": "eval_loss", "at_most": 5.5}, "target": 1000, "direction": "at_most"},
     1000, True, ""),
])
def test_target_values_and_misses(fields: dict, value: float, passed: bool, miss: str) -> None:
    outcome = check_target(Target(source=SOURCE, **fields), _records(), Path("."))
    assert outcome.value == pytest.approx(value)
    assert outcome.passed is passed
    assert outcome.miss.startswith(miss) if miss else outcome.miss == ""


def test_unreadable_values_are_misses_that_say_why(tmp_path: Path) -> None:
    (tmp_path / "bench.json").write_text("progress line\n" + json.dumps({"quality": {"recovered": 0.4}}) + "\n")
    cases = [({"metric": "quality.recovered", "file": "bench.json", "target": 0.5, "direction": "at_least"},
              "-0.1 under the bound"),
             ({"metric": "quality.gap", "file": "bench.json", "target": 0.5, "direction": "at_least"},
              "no value: .*no key 'gap' under quality \\(it has: recovered\\)"),
             ({"metric": "eval_loss", "when": {"metric": "eval_loss", "at_most": 5.0}, "target": 1, "tolerance": 1},
              "no value: eval_loss never reached <= 5.0 \\(best 5.2 at step 10\\)"),
             ({"metric": "grad_norm", "target": 1, "tolerance": 1}, "no value: synthetic has no 'grad_norm'; it has: "
                                                                    "eval_loss, loss, tokens")]
    for fields, miss in cases:
        outcome = check_target(Target(source=SOURCE, **fields), _records(), tmp_path)
        assert not outcome.passed and re.match(miss, outcome.miss), (fields, outcome.miss)


# -- one tiny run through `slimtrain reproduce` -----------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimtrain.trainer.cli", *args], env=_env(None), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory, data_cache: Path):
    """`slimtrain reproduce` of a tiny recipe whose targets the run meets: (recipe dir, run dir, process)."""
    tmp = tmp_path_factory.mktemp("reproduce")
    run_dir = tmp / "run"
    expect = {"targets": [_target("eval_loss", target=6.5, direction="at_most"),
                          _target("tokens", step=10, target=10 * 8 * 64, tolerance=0),
                          _target("loss", mean_last=5, target=6.0, direction="at_most")]}
    path = _recipe(tmp, "tiny", expect, run={"output_dir": str(run_dir)}, data={"cache_dir": str(data_cache)})
    proc = _cli("reproduce", str(path), "--nproc", "1")
    assert proc.returncode == 0, proc.stdout
    return tmp, run_dir, proc


@pytest.mark.slow
def test_reproduce_trains_and_passes_met_targets(reproduced) -> None:
    tmp, run_dir, proc = reproduced
    assert "3 of 3 targets met" in proc.stdout
    assert (run_dir / "checkpoints" / "step_00000020").is_dir()  # trained as `slimtrain train` would
    report = (run_dir / "reproduce.md").read_text()
    assert "| eval_loss |" in report and "| tokens @ step 10 | 5120 | 5120 ± 0 | pass |" in report
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["world_size"] == 1 and env["packages"]["torch"] == __import__("torch").__version__
    for line in ("recipe hash (this recipe)", "data fingerprint", "tokenizer hash",
                 f"| torch | `{env['packages']['torch']}` |", "| deepspeed |", "| megatron-core |", "| transformers |",
                 "| world size | `1` |", "| device | `cpu",
                 f"| git commit | `{env['git_commit']}` |"):
        assert line in report, line
    assert "(same)" in report  # the run's recipe.yaml computes what the recipe does
    assert not (run_dir / "reproduce_curve.png").exists()  # no reference curve ships with this recipe


@pytest.mark.slow
def test_trainer_metric_names_cover_the_run(reproduced) -> None:
    """The names `expect:` is validated against are every name the loop writes (a new metric must be declared)."""
    _, run_dir, _ = reproduced
    written = {k for line in (run_dir / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert written <= set(TRAINER_METRICS), written - set(TRAINER_METRICS)


@pytest.mark.slow
def test_reproduce_from_a_run_misses_and_says_by_how_much(reproduced) -> None:
    tmp, run_dir, _ = reproduced
    eval_loss = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
    # The reference: this run's curve 2 % higher, so the relative deviation is 0.02 / 1.02 at every step.
    with gzip.open(tmp / "miss.reference.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"step": s, "loss": v * 1.02}) + "\n" for s, v in losses(run_dir).items())
    expect = {"targets": [_target("eval_loss", target=round(eval_loss - 0.5, 3), direction="at_most")],
              "curves": [{"metric": "loss", "statistic": "max", "tolerance": 0.01, "source": SOURCE},
                         {"metric": "loss", "statistic": "mean", "tolerance": 0.025, "source": SOURCE}]}
    path = _recipe(tmp, "miss", expect, run={"output_dir": str(run_dir)})
    before = (run_dir / "metrics.jsonl").read_bytes(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = _cli("reproduce", str(path), "--from", str(run_dir))
    assert proc.returncode == 1, proc.stdout
    after = (run_dir / "metrics.jsonl").read_bytes(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert after == before  # nothing trained
    assert "eval step" not in proc.stdout
    miss = eval_loss - round(eval_loss - 0.5, 3)
    assert f"{miss:+.4g} over the bound" in proc.stdout
    assert "1 of 3 targets met" in proc.stdout
    report = (run_dir / "reproduce.md").read_text()
    dev = 0.02 / 1.02
    assert f"| loss curve (max rel. dev.) | {dev:.2%} | <= 1.00% | **MISS** | {dev - 0.01:+.2%} over the tolerance" \
           in report
    assert f"| loss curve (mean rel. dev.) | {dev:.2%} | <= 2.50% | pass |" in report
    assert "![loss curve](reproduce_curve.png)" in report and (run_dir / "reproduce_curve.png").stat().st_size > 0


@pytest.mark.slow
def test_compare_two_runs(reproduced, data_cache: Path, tmp_path: Path) -> None:
    _, run_dir, _ = reproduced
    other = tmp_path / "short"
    trained = run_train(other, data_cache, ["train.steps=6", "optim.lr=1e-3"], nproc=1)
    assert trained.returncode == 0, trained.stdout
    out = tmp_path / "plots" / "cmp.png"
    proc = _cli("compare", str(run_dir), str(other), "--metric", "grad_norm", "--out", str(out))
    assert proc.returncode == 0, proc.stdout
    assert out.stat().st_size > 0
    finals = {d.name: losses(d)[max(losses(d))] for d in (run_dir, other)}
    for name, loss in finals.items():
        assert re.search(rf"│ {name}\s+│\s+{loss:.5g} │", proc.stdout), proc.stdout
    best = min(finals, key=finals.get)
    assert f"loss: lowest {finals[best]:.5g} ({best})" in proc.stdout
