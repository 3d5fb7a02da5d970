"""`checkpoint.branch_from`: a new run continuing another run's checkpoint under a changed recipe.

The QAT plugin's branches (new parameters, bitwise equal to one uninterrupted run, another number of
ranks) are in tests/qat/test_qat_train.py; here: finding the source, the checks before launch, the
fresh-parameter entries, and a branch that changes the learning rate and weight decay.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slimtrain.trainer.backends.deepspeed_branch import add_fresh_entries, fresh_parameters
from slimtrain.trainer.lifecycle.branch import check_branch, check_same_tokenizer, pinned_source, resolve_branch_source
from slimtrain.trainer.lifecycle.checkpoint import save_checkpoint
from slimtrain.trainer.recipe.schema import load_recipe
from slimtrain.trainer.errors import RecipeError
from test_checkpoint_files import FakeBackend
from train_helpers import TINY, losses, run_train


def _fake_run(root: Path, steps: list[int], recipe_yaml: str = "model: {hidden_size: 64}\n") -> Path:
    for step in steps:
        save_checkpoint(root / "checkpoints", step, FakeBackend(), {"step": step}, recipe_yaml, keep=5)
    return root


def test_source_is_a_step_directory_or_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", [2, 4])
    newest = run / "checkpoints" / "step_00000004"
    assert resolve_branch_source(run) == newest
    assert resolve_branch_source(run / "checkpoints") == newest
    assert resolve_branch_source(run / "checkpoints" / "step_00000002") == run / "checkpoints" / "step_00000002"
    (newest / "manifest.json").unlink()  # an unfinished save is never a source
    assert resolve_branch_source(run) == run / "checkpoints" / "step_00000002"
    with pytest.raises(RecipeError, match=r"checkpoint.branch_from=.*step_00000004.* not a complete checkpoint"):
        resolve_branch_source(newest)
    with pytest.raises(RecipeError, match="holds no complete checkpoint; name a run directory"):
        resolve_branch_source(tmp_path / "nothing-here")


def test_branch_must_keep_the_model_and_have_steps_left(tmp_path: Path) -> None:
    step = _fake_run(tmp_path / "run", [4], "model: {hidden_size: 128, num_layers: 2}\n") / "checkpoints" / "step_00000004"
    recipe = load_recipe(str(TINY), ["train.steps=10"])
    with pytest.raises(RecipeError, match=r"model.hidden_size=128 there, 64 here.*a branch keeps the source's parameters"):
        check_branch(recipe, step)
    step = _fake_run(tmp_path / "same", [4], "model: {hidden_size: 64}\n") / "checkpoints" / "step_00000004"
    check_branch(recipe, step)
    with pytest.raises(RecipeError, match="is at step 4 and train.steps=4: nothing left to train; set train.steps above 4"):
        check_branch(load_recipe(str(TINY), ["train.steps=4"]), step)


def test_the_source_is_pinned_once_for_every_rank_and_restart(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", [2])
    recipe = SimpleNamespace(checkpoint=SimpleNamespace(branch_from=str(run)))
    root = tmp_path / "branch" / "checkpoints"
    first = pinned_source(recipe, root, True, lambda: None)
    assert first == (run / "checkpoints" / "step_00000002").resolve()
    _fake_run(run, [4])  # the source run goes on
    assert pinned_source(recipe, root, True, lambda: None) == first
    assert pinned_source(recipe, root, False, lambda: None) == first
    recipe.checkpoint.branch_from = str(run / "checkpoints" / "step_00000004")  # the user names another one
    assert pinned_source(recipe, root, True, lambda: None).name == "step_00000004"


def test_branch_and_hf_init_are_exclusive() -> None:
    with pytest.raises(RecipeError, match="branch_from and checkpoint.init_from_hf both set"):
        load_recipe(str(TINY), ["checkpoint.branch_from=a", "checkpoint.init_from_hf=b"])


def test_fresh_parameters_are_the_ones_the_source_lacks() -> None:
    saved = {"a.weight": (4, 4), "b.weight": (4,)}
    assert fresh_parameters(saved, {**saved, "a.gain": (4,), "b.gain": (1,)}, Path("src")) == ["a.gain", "b.gain"]
    with pytest.raises(RecipeError, match=r"holds parameters this model lacks: b.weight; a branch keeps every"):
        fresh_parameters(saved, {"a.weight": (4, 4)}, Path("src"))
    with pytest.raises(RecipeError, match=r"shapes differ \(a.weight: \(4, 4\) there, \(8, 4\) here\)"):
        fresh_parameters(saved, {"a.weight": (8, 4), "b.weight": (4,)}, Path("src"))


def test_fresh_entries_hold_the_initial_value_zero_moments_and_the_sources_step(tmp_path: Path) -> None:
    old = tmp_path / "zero" / "w"
    old.mkdir(parents=True)
    torch.save(torch.tensor(7.0), old / "step.pt")
    value = torch.randn(3, 5, dtype=torch.bfloat16)
    add_fresh_entries(tmp_path, {"gain": value})
    entry = tmp_path / "zero" / "gain"
    fp32 = torch.load(entry / "fp32.pt", weights_only=False)
    assert fp32["cat_dim"] == 0 and fp32["param"].dtype == torch.float32 and torch.equal(fp32["param"], value.float())
    for moment in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(torch.load(entry / f"{moment}.pt", weights_only=False)["param"], torch.zeros(3, 5))
    assert torch.equal(torch.load(entry / "step.pt", weights_only=False), torch.tensor(7.0))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """A 1-rank dense run of 4 steps with checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("source")
    proc = run_train(run, data_cache, ["train.steps=4", "checkpoint.every=2"], nproc=1)
    assert proc.returncode == 0, proc.stdout
    return run


@pytest.mark.slow
def test_branch_follows_the_new_learning_rate_and_weight_decay(source: Path, data_cache: Path, tmp_path: Path) -> None:
    from slimtrain.trainer.recipe.schema import ScheduleConfig
    from slimtrain.trainer.optim import lr_factor

    before = {p: p.stat().st_mtime_ns for p in source.rglob("*")}
    run = tmp_path / "branch"
    src = source / "checkpoints" / "step_00000002"
    proc = run_train(run, data_cache, ["train.steps=8", "checkpoint.every=4", "optim.lr=1e-3", "optim.weight_decay=0.05",
                                       "optim.grad_clip=0.5", f"checkpoint.branch_from={src}"], nproc=1)
    assert proc.returncode == 0, proc.stdout
    assert "branched" in proc.stdout and "no new parameters; the data position carries over" in proc.stdout
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    schedule = ScheduleConfig(type="cosine", warmup_steps=4)  # tiny-cpu's
    assert [r["step"] for r in records] == list(range(3, 9))
    assert [r["lr"] for r in records] == [1e-3 * lr_factor(s - 1, 8, schedule) for s in range(3, 9)]
    assert losses(run)[3] == losses(source)[3]  # same weights, same next batch
    optim = torch.load(next((run / "checkpoints" / "step_00000004" / "ds").glob("*optim_states.pt")), weights_only=False)
    groups = optim["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert optim["optimizer_state_dict"]["clip_grad"] == 0.5  # DeepSpeed's ZeRO load restores the source's 1.0
    assert before == {p: p.stat().st_mtime_ns for p in source.rglob("*")}  # the source is only read
    assert not (run / "checkpoints" / ".branch").exists()


@pytest.mark.slow
def test_a_resume_follows_a_changed_learning_rate_and_clipping(source: Path, data_cache: Path, tmp_path: Path) -> None:
    """What the stop message for non-finite losses advises (resume with a lower optim.lr or with
    optim.grad_clip set) must take effect, although DeepSpeed restores the saved schedule and clipping."""
    import shutil

    from slimtrain.trainer.recipe.schema import ScheduleConfig
    from slimtrain.trainer.optim import lr_factor

    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    proc = run_train(run, data_cache, ["train.steps=4", "checkpoint.every=2", "optim.lr=1e-3", "optim.grad_clip=0.5"],
                     nproc=1)
    assert proc.returncode == 0 and "resumed" in proc.stdout, proc.stdout
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    schedule = ScheduleConfig(type="cosine", warmup_steps=4)
    assert [(r["step"], r["lr"]) for r in records] == [(s, 1e-3 * lr_factor(s - 1, 4, schedule)) for s in (3, 4)]
    optim = torch.load(next((run / "checkpoints" / "step_00000004" / "ds").glob("*optim_states.pt")), weights_only=False)
    assert optim["optimizer_state_dict"]["clip_grad"] == 0.5


@pytest.mark.slow
def test_a_branch_keeps_the_tokenizer(source: Path) -> None:
    from slimtrain.data.tokenizer import tokenizer_hash_of

    step = source / "checkpoints" / "step_00000002"
    check_same_tokenizer(step, tokenizer_hash_of(step / "tokenizer", "test"))
    with pytest.raises(RecipeError, match=r"another tokenizer than this recipe's data.tokenizer gives; .* "
                                          r"set data.tokenizer.path to"):
        check_same_tokenizer(step, "0" * 64)


@pytest.mark.slow
def test_a_branch_that_changes_the_model_stops_before_launch(source: Path, data_cache: Path, tmp_path: Path) -> None:
    proc = run_train(tmp_path / "b", data_cache, ["train.steps=8", "model.num_layers=3",
                                                  f"checkpoint.branch_from={source}"], nproc=1)
    assert proc.returncode != 0
    assert "model.num_layers=2 there, 3 here" in proc.stdout and "Traceback" not in proc.stdout
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
