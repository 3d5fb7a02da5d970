"""Which DeepSpeed layout a checkpoint has, and when a resume converts it or refuses (no process started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimtrain.trainer.backends.deepspeed_reshard import Layout, current_layout, needs_conversion, saved_layout
from slimtrain.trainer.errors import RecipeError


def _touch(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")
    return directory


@pytest.mark.parametrize("names, expected", [
    (["mp_rank_00_model_states.pt"], Layout("torch", 1)),
    (["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
      "zero_pp_rank_1_mp_rank_00_optim_states.pt"], Layout("zero12", 2)),
    (["mp_rank_00_model_states.pt"] + [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)],
     Layout("bf16", 4)),
    ([f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(3) for kind in ("model", "optim")],
     Layout("zero3", 3)),
])
def test_saved_layout_from_file_names(tmp_path: Path, names: list[str], expected: Layout) -> None:
    assert saved_layout(_touch(tmp_path / "ds", *names)) == expected


@pytest.mark.parametrize("stage, precision, offload, optimizer", [
    (0, "fp32", False, "torch"), (0, "bf16", False, "bf16"), (1, "bf16", False, "bf16"),
    (1, "bf16", True, "zero12"), (1, "fp32", False, "zero12"), (2, "bf16", False, "zero12"),
    (2, "fp32", True, "zero12"), (3, "bf16", False, "zero3"), (3, "fp32", True, "zero3"),
])
def test_current_layout_follows_deepspeeds_choice_of_optimizer(stage: int, precision: str, offload: bool,
                                                                optimizer: str) -> None:
    assert current_layout(stage, precision, offload, 8) == Layout(optimizer, 8)


def test_same_optimizer_converts_only_when_the_world_size_changes() -> None:
    for kind in ("zero12", "zero3", "bf16"):
        assert not needs_conversion(Layout(kind, 4), Layout(kind, 4))
        assert needs_conversion(Layout(kind, 4), Layout(kind, 2))
        assert needs_conversion(Layout(kind, 1), Layout(kind, 16))
    # ZeRO-0 fp32 keeps the whole torch optimizer state in one file: any world size loads it directly.
    assert not needs_conversion(Layout("torch", 1), Layout("torch", 8))


@pytest.mark.parametrize("saved, current, fix", [
    ("zero12", "zero3", "backend.zero_stage=2, or 1 with precision fp32"),
    ("zero3", "zero12", "backend.zero_stage=3"),
    ("bf16", "zero12", "backend.precision=bf16 with backend.zero_stage=1 or 0"),
    ("torch", "zero12", "backend.zero_stage=0 backend.precision=fp32"),
])
def test_another_optimizer_is_refused_with_the_checkpoints_settings(saved: str, current: str, fix: str) -> None:
    with pytest.raises(RecipeError) as err:
        needs_conversion(Layout(saved, 2), Layout(current, 2))
    assert "not between DeepSpeed optimizers" in str(err.value) and fix in str(err.value)
