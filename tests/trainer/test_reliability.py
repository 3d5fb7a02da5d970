"""Reliability: no rank outlives its launcher, one writer per run directory, bad input refused before launch
leaving nothing behind, and a save that fails part-way keeps the previous checkpoint as `latest`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_helpers import REPO, TINY, _env, kill_tree, run_train, train_cmd

HOLD = """
import sys, time
from pathlib import Path
from slimtrain.trainer.lifecycle.run_lock import hold_run_dir
with hold_run_dir(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _first_step_logged(run_dir: Path, proc: subprocess.Popen) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None, f"the run ended before its first step:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no step was logged"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["slimtrain", "torchrun"])
def test_every_rank_ends_when_its_launcher_is_killed(launcher: str, tmp_path: Path, data_cache: Path) -> None:
    import psutil

    overrides = [f"run.output_dir={tmp_path}", f"data.cache_dir={data_cache}", "train.steps=600"]
    cmd = (train_cmd(tmp_path, data_cache, ["train.steps=600"], 2) if launcher == "slimtrain" else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "slimtrain.trainer.cli", "train", str(TINY), *overrides])
    proc = subprocess.Popen(cmd, env=_env("slow_step@1-1000"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    family: list = []
    try:
        _first_step_logged(tmp_path, proc)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 2, family  # the ranks (and torchrun's agent under slimtrain)
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone: its process group too would not reach the ranks
        proc.wait()
        _, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, f"still running after their launcher was killed: {alive}"
    finally:
        kill_tree(proc.pid)
        for p in family:
            if p.is_running():
                p.kill()


def test_a_run_directory_held_by_a_live_run_is_refused_and_a_dead_holder_taken_over(tmp_path: Path) -> None:
    from slimtrain.trainer.lifecycle.run_lock import hold_run_dir

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_train(run_dir, tmp_path / "cache", ["train.steps=2"], nproc=1)
        assert proc.returncode == 2, proc.stdout
        assert f"in use by another run (pid {holder.pid} on host {socket.gethostname()}" in proc.stdout
        assert "Traceback" not in proc.stdout
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"] and not (tmp_path / "cache").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (run_dir / ".lock").is_file()  # left by the killed holder: free, since no process holds it
    with hold_run_dir(run_dir):
        assert f"pid={os.getpid()} " in (run_dir / ".lock").read_text()
    assert not (run_dir / ".lock").exists()


def _hf_dir(path: Path, **model) -> Path:
    """A Llama directory of the tiny recipe's model, with `model` fields changed."""
    from slimtrain.modules.transformer import ModelConfig, Transformer
    from slimtrain.trainer.export.hf import write_hf_dir

    cfg = ModelConfig(**{"vocab_size": 512, "hidden_size": 64, "intermediate_size": 176, "num_layers": 2,
                         "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 64, **model})
    return write_hf_dir(Transformer(cfg).state_dict(), cfg, path, tokenizer_dir=None, ids={"eos_id": 0})


@pytest.mark.slow
def test_init_from_hf_is_refused_by_the_launcher_leaving_nothing(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"hidden_size": 64}))
    other = _hf_dir(tmp_path / "other", hidden_size=32)
    for source, message in ((hf, "holds no model.safetensors"),
                            (other, "the recipe's model block disagrees with the checkpoint: model.hidden_size=64 but "
                                    "config.json's hidden_size gives 32")):
        proc = run_train(tmp_path / "run", tmp_path / "cache", [f"checkpoint.init_from_hf={source}"], nproc=2)
        assert proc.returncode == 2, proc.stdout
        assert message in proc.stdout
        assert "ChildFailedError" not in proc.stdout and "Traceback" not in proc.stdout
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_init_from_hf_shapes_are_checked_from_the_file_headers(tmp_path: Path) -> None:
    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.modules.transformer import ModelConfig
    from slimtrain.trainer.errors import RecipeError
    from slimtrain.trainer.export.importer import check_init_from_hf

    recipe_model = ModelConfig(hidden_size=64, intermediate_size=176, num_layers=2, num_heads=4, num_kv_heads=2,
                               max_seq_len=64)  # vocab_size null: the tokenizer's
    good = _hf_dir(tmp_path / "good")
    check_init_from_hf(good, recipe_model, PluginStack())
    lying = _hf_dir(tmp_path / "lying", intermediate_size=96)  # weights of another MLP width...
    (lying / "config.json").write_text((good / "config.json").read_text())  # ...under the recipe's config.json
    with pytest.raises(RecipeError, match=r"holds tensors of other shapes .*size mismatch for layers.0.mlp"):
        check_init_from_hf(lying, recipe_model, PluginStack())


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    (["model.num_heads=6", "model.num_kv_heads=2", "model.head_dim=12"],
     "could not be exported: LlamaForCausalLM.*refuses it.*model.num_heads=6"),
    (["data.tokenizer.path={tmp}/nope"], r"data.tokenizer.path: '.*/nope' does not exist"),
])
def test_bad_input_with_one_process_is_refused_before_launch_leaving_nothing(overrides: list[str], message: str,
                                                                             tmp_path: Path) -> None:
    import re

    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    proc = run_train(tmp_path / "run", tmp_path / "cache", ["train.steps=1", *overrides], nproc=1)
    assert proc.returncode == 2, proc.stdout
    assert re.search(message, proc.stdout, re.S), proc.stdout
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_bad_value_found_while_preparing_leaves_no_run_directory_and_no_shards(tmp_path: Path) -> None:
    lines = [{"text": f"def f{i}(x):\n    return x + {i}\n"} for i in range(400)]
    lines[200] = {"text": 12345}
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = f"data.sources=[{{type: files, paths: ['{corpus}']}}]"
    proc = run_train(tmp_path / "run", tmp_path / "cache", [source, "data.shard_size_mb=0.001", "data.num_workers=1",
                                                            "data.tokenizer.train.max_train_bytes=2000"], nproc=1)
    assert proc.returncode == 2, proc.stdout
    assert "field 'text' holds int, not text" in proc.stdout
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "cache").glob("corpus-*")), "shards of the failed prepare stayed behind"


@pytest.mark.slow
@pytest.mark.distributed
def test_a_save_that_fails_part_way_keeps_the_previous_checkpoint_and_stops_the_run(tmp_path: Path,
                                                                                    data_cache: Path) -> None:
    proc = run_train(tmp_path, data_cache, ["checkpoint.every=10"], fault="disk_full_during_save@20")
    assert proc.returncode != 0, proc.stdout
    assert "saving the checkpoint of step 20" in proc.stdout and "No space left on device" in proc.stdout
    assert "step_00000010 stays `latest`" in proc.stdout
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000010"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000010"]  # the failed save's files removed


def test_a_failed_save_on_one_rank_raises_naming_the_checkpoint_that_stays(tmp_path: Path) -> None:
    from test_checkpoint_files import FakeBackend

    from slimtrain.trainer.errors import CheckpointError
    from slimtrain.trainer.lifecycle.checkpoint import find_resumable, save_checkpoint

    save_checkpoint(tmp_path, 10, FakeBackend(), {"step": 10}, "run: {}\n", keep=3)

    class ReadOnly(FakeBackend):
        def save(self, directory: Path) -> None:
            raise PermissionError(13, "Permission denied", str(directory / "ds"))

    with pytest.raises(CheckpointError, match=r"step 20 .*Permission denied.*step_00000010 stays `latest`"):
        save_checkpoint(tmp_path, 20, ReadOnly(), {"step": 20}, "run: {}\n", keep=3)
    assert find_resumable(tmp_path).name == "step_00000010"
