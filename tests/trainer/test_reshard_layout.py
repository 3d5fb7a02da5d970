"""Which DeepSpeed layout a checkpoint has, and when a resume loads it directly, converts it or refuses.

The layouts are read from checkpoints the real DeepSpeed engine wrote (ds_layouts.py, one gloo rank)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slimtrain.trainer.backends.deepspeed_reshard import Layout, needs_conversion, saved_layout
from slimtrain.trainer.errors import RecipeError

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(HERE / "ds_layouts.py"), str(tmp_path_factory.mktemp("layouts"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_layout_read_from_deepspeeds_files_is_the_one_each_setting_writes(written: list[dict]) -> None:
    settings = [r for r in written if "precision" in r]
    assert len(settings) == 8
    for r in settings:
        kind, precision = r["saved"]
        assert kind == r["current"][0], r
        # ZeRO-0 files do not show the precision; the trainer's checkpoints carry it in recipe.yaml.
        assert precision == (None if r["stage"] == 0 else r["precision"]), r
        assert r["restored"].startswith("equal") and r["next_step"].startswith("equal"), r


def test_fp32_shards_convert_into_a_bf16_engine(written: list[dict]) -> None:
    converted = {r["stage"]: r["fp32_into_bf16"] for r in written if "fp32_into_bf16" in r}
    assert sorted(converted) == [1, 2, 3]
    assert all(v.startswith("equal") for v in converted.values()), converted  # the fp32 masters, bitwise


def test_zero0_precision_comes_from_the_saved_recipe(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tmp_path / "recipe.yaml").write_text("backend:\n  type: deepspeed\n  precision: bf16\n")
    assert saved_layout(tmp_path / "ds") == Layout("replicated", 1, "bf16")


def test_conversion_only_where_deepspeed_cannot_load_directly() -> None:
    for kind in ("zero12", "zero3"):
        assert not needs_conversion(Layout(kind, 4, "bf16"), Layout(kind, 4, "bf16"))
        assert needs_conversion(Layout(kind, 4, "bf16"), Layout(kind, 2, "bf16"))
        assert needs_conversion(Layout(kind, 1, "fp32"), Layout(kind, 16, "fp32"))
        assert needs_conversion(Layout(kind, 2, "fp32"), Layout(kind, 2, "bf16"))
    # ZeRO-0 keeps one full optimizer state: any world size loads it directly.
    assert not needs_conversion(Layout("replicated", 1, "fp32"), Layout("replicated", 8, "fp32"))
    assert not needs_conversion(Layout("replicated", 1, None), Layout("replicated", 8, "bf16"))


@pytest.mark.parametrize("saved, current, fix", [
    (Layout("zero12", 2, "fp32"), Layout("zero3", 2, "fp32"), "backend.zero_stage=1 or 2"),
    (Layout("zero3", 2, "bf16"), Layout("zero12", 1, "bf16"), "backend.zero_stage=3"),
    (Layout("replicated", 1, "fp32"), Layout("zero12", 2, "fp32"), "backend.zero_stage=0"),
    (Layout("replicated", 1, "bf16"), Layout("replicated", 2, "fp32"), "backend.precision=bf16"),
])
def test_what_cannot_load_is_refused_with_the_setting_to_use(saved: Layout, current: Layout, fix: str) -> None:
    with pytest.raises(RecipeError) as err:
        needs_conversion(saved, current)
    assert saved.describe() in str(err.value) and fix in str(err.value)
