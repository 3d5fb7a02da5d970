"""Checkpoint directory protocol with a fake single-rank backend: atomic completion, fallback, retention."""

from pathlib import Path

import pytest

from slimtrain.trainer.lifecycle.checkpoint import (
    find_resumable, find_resume_point, move_aside, save_checkpoint, verify_checkpoint,
)
from slimtrain.trainer.errors import CheckpointError


class FakeBackend:
    rank, world_size = 0, 1

    def __init__(self, payload: bytes = b"weights" * 100) -> None:
        self.payload = payload

    def barrier(self) -> None:
        pass

    def save(self, directory: Path) -> None:
        (directory / "ds").mkdir(parents=True, exist_ok=True)
        (directory / "ds" / "model.pt").write_bytes(self.payload)


def _save(root: Path, step: int, keep: int = 3) -> Path:
    return save_checkpoint(root, step, FakeBackend(), {"step": step}, "run: {}\n", keep)


def test_save_writes_manifest_and_latest(tmp_path: Path) -> None:
    path = _save(tmp_path, 10)
    assert path.name == "step_00000010" and verify_checkpoint(path) is None
    assert (tmp_path / "latest").read_text().strip() == "step_00000010"
    assert not list(tmp_path.glob("*.tmp"))
    assert find_resumable(tmp_path) == path


def test_truncated_latest_falls_back_to_previous(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    newest = _save(tmp_path, 20)
    with open(newest / "ds" / "model.pt", "r+b") as f:
        f.truncate(10)
    with pytest.warns(UserWarning, match="truncated or corrupted"):
        assert find_resumable(tmp_path).name == "step_00000010"


def test_interrupted_save_is_never_resumed(tmp_path: Path) -> None:
    _save(tmp_path, 10)
    partial = tmp_path / "step_00000020.tmp"
    (partial / "ds").mkdir(parents=True)
    (partial / "ds" / "model.pt").write_bytes(b"half")
    assert find_resumable(tmp_path).name == "step_00000010"


def test_retention_keeps_the_newest(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000030", "step_00000040"]


def test_missing_manifest_is_reported(tmp_path: Path) -> None:
    (tmp_path / "step_00000005").mkdir()
    assert "no manifest" in verify_checkpoint(tmp_path / "step_00000005")


def test_no_complete_checkpoint_stops_instead_of_training_over_them(tmp_path: Path) -> None:
    for step in (4, 8):
        with open(_save(tmp_path, step) / "ds" / "model.pt", "r+b") as f:
            f.truncate(3)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as err:
        find_resume_point(tmp_path)
    message = str(err.value)
    assert "step_00000008: file ds/model.pt has 3 bytes" in message and "step_00000004" in message
    assert "checkpoint.resume=never" in message and "run.output_dir" in message
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000008"]


def test_an_empty_checkpoint_directory_is_a_fresh_start(tmp_path: Path) -> None:
    (tmp_path / "step_00000020.tmp").mkdir()  # the first save was killed: nothing to resume, nothing lost
    (tmp_path / "branch.json").write_text("{}")
    assert find_resume_point(tmp_path) is None


def test_a_save_clears_what_crashed_saves_left(tmp_path: Path) -> None:
    for leftover in ("step_00000030.tmp", "step_00000010.old"):
        (tmp_path / leftover / "ds").mkdir(parents=True)
    _save(tmp_path, 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000020"]


def test_an_earlier_run_is_moved_aside_whole(tmp_path: Path) -> None:
    _save(tmp_path / "checkpoints", 10)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert move_aside(tmp_path, ("checkpoints", "metrics.jsonl", "wandb")) == tmp_path / "previous_1"
    assert (tmp_path / "previous_1" / "checkpoints" / "step_00000010" / "manifest.json").is_file()
    assert (tmp_path / "previous_1" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (tmp_path / "checkpoints").exists()
    (tmp_path / "metrics.jsonl").write_text("")
    assert move_aside(tmp_path, ("checkpoints", "metrics.jsonl")) == tmp_path / "previous_2"
    assert move_aside(tmp_path, ("checkpoints",)) is None
