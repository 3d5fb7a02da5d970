"""The reproduction suite (recipes/reproduce/suite.yaml, `slimtrain reproduce --suite`) and `expect:` baselines.

The smoke test runs the suite's smoke entries as `make test` does: the packing benchmark and two tiny MoE runs,
their real targets checked (about 80 s on the 2-core machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.reproduce.check import check_target
from slimtrain.trainer.reproduce.expect import Target
from slimtrain.trainer.reproduce.run_data import RunMetrics
from slimtrain.trainer.reproduce.suite import SUITE_FILE, load_suite

from train_helpers import REPO, _env

SOURCE = {"kind": "reference_run", "commit": "0123abc"}


def _run(path: Path, records: list[dict]) -> RunMetrics:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return RunMetrics.of_run(path)


def test_baseline_compares_with_another_run_and_another_key(tmp_path: Path) -> None:
    dense = [{"step": 10, "eval_loss": 5.0}]
    run = _run(tmp_path / "moe", [{"step": 10, "eval_loss": 4.9}])
    _run(tmp_path / "dense", dense)
    beats = Target(metric="eval_loss", baseline={"run": "../dense"}, target=0.0, direction="at_most", source=SOURCE)
    out = check_target(beats, run, tmp_path / "moe")
    assert out.passed and out.value == pytest.approx(-0.1) and "- ../dense:same" in out.label
    _run(tmp_path / "dense", [{"step": 10, "eval_loss": 4.8}])  # the dense run now wins: a miss, by 0.1
    out = check_target(beats, RunMetrics.of_run(tmp_path / "moe"), tmp_path / "moe")
    assert not out.passed and out.value == pytest.approx(0.1) and "+0.1 over the bound" in out.miss
    (tmp_path / "moe" / "bench.json").write_text(json.dumps({"a": {"rows": 103}, "b": {"rows": 100}}) + "\n")
    ratio = Target(metric="a.rows", file="bench.json", baseline={"metric": "b.rows", "how": "ratio"}, target=1.02,
                   direction="at_most", source=SOURCE)
    out = check_target(ratio, run, tmp_path / "moe")
    assert not out.passed and out.value == pytest.approx(1.03)


def test_baseline_refusals_and_unreadable_baselines(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compared with itself"):
        Target(metric="loss", baseline={"how": "ratio"}, target=1.0, direction="at_most", source=SOURCE)
    run = _run(tmp_path / "a", [{"step": 1, "loss": 2.0}])
    missing = Target(metric="loss", baseline={"run": "../b"}, target=0.0, direction="at_most", source=SOURCE)
    out = check_target(missing, run, tmp_path / "a")
    assert not out.passed and out.value is None and "baseline run ../b" in out.miss and "list its entry" in out.miss
    _run(tmp_path / "b", [{"step": 1, "eval_loss": 2.0}])
    out = check_target(missing, run, tmp_path / "a")
    assert "baseline:" in out.miss and "has no 'loss'" in out.miss and "eval_loss" in out.miss


def test_suite_manifest_is_valid_and_refuses_a_late_baseline(tmp_path: Path) -> None:
    suite = load_suite()
    smoke = [e.name for e in suite.select("smoke")]
    assert smoke == ["packing", "moe-no-balancing", "moe-aux-free"]
    assert all(e.tier != "gpu" for e in suite.select("cpu")) and set(smoke) <= {e.name for e in suite.select("cpu")}
    entries = yaml.safe_load(SUITE_FILE.read_text())["entries"]
    swapped = [entries[0], entries[2], entries[1]]  # the aux-free entry before its baseline
    for e in swapped:
        e["recipe"] = str(SUITE_FILE.parent / e["recipe"])
    bad = tmp_path / "suite.yaml"
    bad.write_text(yaml.safe_dump({"entries": swapped}))
    with pytest.raises(RecipeError, match="no earlier entry is named 'moe-no-balancing'"):
        load_suite(bad)


@pytest.mark.slow
def test_smoke_suite_meets_its_targets(data_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, "-m", "slimtrain.trainer.cli", "reproduce", "--suite", "smoke",
                           "--suite-out", str(out), f"data.cache_dir={data_cache}"], cwd=REPO, env=_env(None),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "3 of 3 entries passed" in proc.stdout
    for name, met in (("packing", "4 of 4 targets met"), ("moe-aux-free", "1 of 1 targets met")):
        assert met in (out / name / "reproduce.md").read_text()


def test_only_runs_the_named_entries_and_commands_see_the_suite_directory(tmp_path: Path, capsys) -> None:
    from slimtrain.trainer.reproduce.suite import run_suite

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"extends": str(REPO / "recipes" / "tiny-cpu.yaml"), "expect": {"targets": [
        {"metric": "x", "file": "b.json", "target": 1.0, "tolerance": 0.0, "source": SOURCE}]}}))
    manifest = tmp_path / "suite.yaml"
    manifest.write_text(yaml.safe_dump({"entries": [
        {"name": "a", "claim": "writes x", "tier": "smoke", "recipe": "r.yaml", "minutes": 0.1,
         "command": "echo '{\"x\": 1.0}' > {run_dir}/b.json"},
        {"name": "b", "claim": "reads a's x through {suite_out}", "tier": "cpu", "recipe": "r.yaml", "minutes": 0.1,
         "command": "cp {suite_out}/a/b.json {run_dir}/b.json"}]}))
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="--only c: no such entry in --suite cpu; its entries: a, b"):
        run_suite("cpu", out, [], manifest, only=["c"])
    assert run_suite("cpu", out, [], manifest, only=["b"]) == 1  # a has not run: b's command finds no file
    assert not (out / "a").exists()
    assert run_suite("cpu", out, [], manifest, only=["a"]) == 0
    assert run_suite("cpu", out, [], manifest, only=["b"]) == 0
    assert "1 of 1 entries passed" in capsys.readouterr().out


def test_a_known_miss_passes_only_while_it_misses(tmp_path: Path, capsys) -> None:
    from slimtrain.trainer.reproduce.suite import run_suite

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"extends": str(REPO / "recipes" / "tiny-cpu.yaml"), "expect": {"targets": [
        {"metric": "x", "file": "b.json", "target": 1.0, "tolerance": 0.0, "source": SOURCE}]}}))

    def suite(command: str) -> int:
        manifest = tmp_path / "suite.yaml"
        manifest.write_text(yaml.safe_dump({"entries": [
            {"name": "k", "claim": "x is 1", "tier": "cpu", "recipe": "r.yaml", "minutes": 0.1, "command": command,
             "known_miss": "x is 2 at this size"}]}))
        return run_suite("cpu", tmp_path / "out", [], manifest)

    assert suite("echo '{\"x\": 2.0}' > {run_dir}/b.json") == 0  # misses, as the manifest says
    out = capsys.readouterr().out
    assert "known miss" in out and "0 of 1 entries passed; 1 known miss" in out and "x is 2 at this size" in out
    assert suite("echo '{\"x\": 1.0}' > {run_dir}/b.json") == 1  # now met: the note must go
    assert "FAIL: now passes (remove known_miss)" in capsys.readouterr().out
    assert suite("exit 1") == 1  # a failed command is no known miss
    assert "the command exited with 1" in capsys.readouterr().out
    assert suite("echo '{\"y\": 2.0}' > {run_dir}/b.json") == 1  # nor is a value that cannot be read
    assert "no value" in capsys.readouterr().out


def test_an_entry_that_branches_from_a_later_entry_is_refused(tmp_path: Path) -> None:
    entries = yaml.safe_load(SUITE_FILE.read_text())["entries"]
    draft = next(e for e in entries if e["name"] == "draft-heads")
    assert "{suite_out}/dense/" in draft["overrides"][0]
    late = [draft, *(e for e in entries if e is not draft)]  # before the dense entry it branches from
    for e in late:
        e["recipe"] = str(SUITE_FILE.parent / e["recipe"])
    bad = tmp_path / "suite.yaml"
    bad.write_text(yaml.safe_dump({"entries": late}))
    with pytest.raises(RecipeError, match=r"entry 'draft-heads', .* overrides .*: no earlier entry is named 'dense'"):
        load_suite(bad)
