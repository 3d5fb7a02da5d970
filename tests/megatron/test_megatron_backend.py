"""The megatron-core backend (`backend.type: megatron`) through `slimtrain train` on 2 gloo ranks, megatron-core run
on CPU by the test-only shim: tensor parallelism 2 (with and without megatron's sequence parallelism), pipeline
parallelism 2 (1F1B, and interleaved with 2 virtual stages) and data parallelism 2 with megatron's distributed
optimizer each train as the DeepSpeed backend does on one rank (the same losses step by step), and so does LSQ QAT at
tensor parallelism 2, whose export equals the DeepSpeed run's; TP=2 resumes bitwise after SIGKILL; checkpoints
(megatron's dist_checkpointing) reshard: the distributed optimizer's DP=2 resumes at TP=2 (QAT's TP=2 at TP=1 and
tied interleaved PP=2 at PP=1 in their own tests), on the uninterrupted run's losses; the TP=2 and PP=2 exports (and
the tied interleaved one) equal the DeepSpeed run's; bad layouts and unconvertible resumes are refused naming the field; a branch (checkpoint.branch_from) into the
moe plugin continues like the DeepSpeed backend's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "trainer"))
from train_helpers import REPO, TINY, losses, records, run_train, run_until_checkpoint_then_kill  # noqa: E402

from slimtrain.trainer.errors import RecipeError  # noqa: E402
from slimtrain.trainer.recipe.schema import load_recipe  # noqa: E402

MEGATRON = "backend={type: megatron, tensor_parallel: %d, precision: fp32, distributed_optimizer: %s}"
SEQUENCE_PARALLEL = "backend={type: megatron, tensor_parallel: 2, pipeline_parallel: %d, precision: fp32, " \
                    "sequence_parallel: true}"
STEPS = ["train.steps=6", "checkpoint.every=3", "eval.every=3", "model.num_layers=4"]
# int4 LSQ QAT from step 3 (its first quantized forward calibrates the steps). lsq_init mean: absmax calibration puts
# each group's largest weight exactly on the clamp edge, where fp32 noise decides whether it gets a gradient at all
# (DeepSpeed at 2 ranks and at 1 then differ by 5e-3 in such a weight); off that edge the runs agree to fp32 noise.
QAT = ["model.intermediate_size=192",
       "plugins=[{type: qat, weights: {bits: 4, group_size: 32}, estimator: lsq, lsq_init: mean, start_step: 2}]"]


@pytest.fixture
def shim(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks `slimtrain train` starts load the CPU shim (a sitecustomize on PYTHONPATH)."""
    paths = [str(HERE / "sitecustomize"), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tokenizer and token shards, prepared by the first run and shared by the module's runs."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_megatron_trains_like_deepspeed_resumes_bitwise_and_exports(tmp_path: Path, shim: None, cache: Path) -> None:
    reference = run_train(tmp_path / "deepspeed", cache, STEPS, nproc=1)
    assert reference.returncode == 0, reference.stdout[-3000:]
    # train.loss_chunk_tokens (vocabulary-parallel chunks) and train.compile ride along: same losses.
    runs = {"tp2": [MEGATRON % (2, "false"), "train.loss_chunk_tokens=48"], "dp2": [MEGATRON % (1, "true")],
            "pp2": ["backend={type: megatron, pipeline_parallel: 2, precision: fp32}", "train.compile=true"],
            "vp2": ["backend={type: megatron, pipeline_parallel: 2, virtual_stages: 2, precision: fp32}"],
            "tp2sp": [SEQUENCE_PARALLEL % 1]}
    for name, backend in runs.items():
        proc = run_train(tmp_path / name, cache, STEPS + backend, nproc=2)
        assert proc.returncode == 0, proc.stdout[-4000:]
        got, want = losses(tmp_path / name), losses(tmp_path / "deepspeed")
        assert got.keys() == want.keys() and max(abs(got[s] - want[s]) for s in got) <= 1e-5, (name, got, want)
    run_until_checkpoint_then_kill(tmp_path / "killed", cache, 3, STEPS + runs["tp2"], nproc=2)
    resumed = run_train(tmp_path / "killed", cache, STEPS + runs["tp2"], nproc=2)
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stdout[-3000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "tp2")  # every step, bitwise (fp32)
    reshards = {"dp2": MEGATRON % (2, "true")}  # TP=2 at TP=1: the QAT test; PP=2 at PP=1: the tied one
    for name, backend in reshards.items():  # resumed from step 3 at another layout: the same run, to fp32 noise
        _resume_from_step_3(tmp_path / name, tmp_path / f"{name}-resharded")
        proc = run_train(tmp_path / f"{name}-resharded", cache, STEPS + [backend], nproc=2)
        assert proc.returncode == 0 and "resumed" in proc.stdout, proc.stdout[-4000:]
        got, want = losses(tmp_path / f"{name}-resharded"), losses(tmp_path / name)
        assert got.keys() == want.keys() and max(abs(got[s] - want[s]) for s in got) <= 1e-6, (name, got, want)
    # A branch into the moe plugin (experts upcycled from the dense MLPs, fresh with zero moments) from step 3: the
    # DeepSpeed branch's losses, from megatron's plain (TP=2) and distributed-optimizer (DP=2) checkpoints.
    moe = ["plugins=[{type: moe, num_experts: 4, top_k: 2, dense_training_steps: 1}]", "checkpoint.every=6"]
    branches = {"deepspeed": [], "tp2": [MEGATRON % (2, "false")], "dp2": [MEGATRON % (1, "true")]}
    for name, backend in branches.items():
        source = tmp_path / name / "checkpoints" / "step_00000003"
        proc = run_train(tmp_path / f"{name}-moe", cache, STEPS + moe + backend + [f"checkpoint.branch_from={source}"],
                         nproc=1 if name == "deepspeed" else 2)
        assert proc.returncode == 0 and "new parameter tensor(s) start fresh" in proc.stdout, proc.stdout[-4000:]
    want = losses(tmp_path / "deepspeed-moe")
    for name in ("tp2", "dp2"):
        got = losses(tmp_path / f"{name}-moe")
        assert got.keys() == want.keys() == {4, 5, 6} and max(abs(got[s] - want[s]) for s in got) <= 1e-5, got
    exported = {name: _export(tmp_path / name, tmp_path / f"{name}-hf") for name in ("deepspeed", "tp2", "pp2")}
    for name in ("tp2", "pp2"):
        assert exported[name].keys() == exported["deepspeed"].keys()
        assert max(float((exported[name][k] - exported["deepspeed"][k]).abs().max()) for k in exported[name]) <= 1e-5


@pytest.mark.slow
def test_tied_embeddings_across_interleaved_stages_train_reshard_and_export(tmp_path: Path, shim: None,
                                                                           cache: Path) -> None:
    """The first stage's embedding and the last stage's head are one tied weight: its copies' gradients are summed
    (losses equal the DeepSpeed run's), it is saved once (the checkpoint resumes at one stage, TP=2), and exported."""
    tied = STEPS + ["model.tie_embeddings=true"]
    reference = run_train(tmp_path / "deepspeed", cache, tied, nproc=1)
    assert reference.returncode == 0, reference.stdout[-3000:]
    stages = "backend={type: megatron, pipeline_parallel: 2, virtual_stages: 2, precision: fp32}"
    proc = run_train(tmp_path / "vp2", cache, tied + [stages], nproc=2)
    assert proc.returncode == 0, proc.stdout[-4000:]
    want = losses(tmp_path / "deepspeed")
    assert max(abs(losses(tmp_path / "vp2")[s] - want[s]) for s in want) <= 1e-5
    _resume_from_step_3(tmp_path / "vp2", tmp_path / "resharded")
    proc = run_train(tmp_path / "resharded", cache, tied + [MEGATRON % (2, "false")], nproc=2)
    assert proc.returncode == 0 and "resumed" in proc.stdout, proc.stdout[-4000:]
    assert max(abs(losses(tmp_path / "resharded")[s] - want[s]) for s in want) <= 1e-5
    ours, theirs = (_export(tmp_path / n, tmp_path / f"{n}-hf") for n in ("vp2", "deepspeed"))
    assert ours.keys() == theirs.keys() and max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-5


def _resume_from_step_3(run: Path, copy: Path) -> None:
    """A copy of `run` as if it had stopped after its step-3 checkpoint."""
    shutil.copytree(run, copy)
    for step_dir in (copy / "checkpoints").glob("step_*"):
        if step_dir.name != "step_00000003":
            shutil.rmtree(step_dir)
    (copy / "checkpoints" / "latest").write_text("step_00000003")
    kept = [line for line in (copy / "metrics.jsonl").read_text().splitlines() if json.loads(line).get("step", 0) <= 3]
    (copy / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))


@pytest.mark.slow
def test_megatron_qat_trains_and_exports_like_deepspeed(tmp_path: Path, shim: None, cache: Path) -> None:
    for name, backend, nproc in (("deepspeed", [], 1), ("tp2", [MEGATRON % (2, "false")], 2)):
        proc = run_train(tmp_path / name, cache, STEPS + QAT + backend, nproc=nproc)
        assert proc.returncode == 0, proc.stdout[-4000:]
    got, want = losses(tmp_path / "tp2"), losses(tmp_path / "deepspeed")
    assert got.keys() == want.keys() and max(abs(got[s] - want[s]) for s in got) <= 1e-5, (got, want)
    assert [r.get("qat/active") for r in records(tmp_path / "tp2") if "qat/active" in r][-1] == 1.0
    # Resumed at TP=1 from step 3 (the step sizes calibrated, their gains split as strided views at TP=2).
    _resume_from_step_3(tmp_path / "tp2", tmp_path / "tp1")
    proc = run_train(tmp_path / "tp1", cache, STEPS + QAT + [MEGATRON % (1, "false")], nproc=2)
    assert proc.returncode == 0 and "resumed" in proc.stdout, proc.stdout[-4000:]
    assert max(abs(losses(tmp_path / "tp1")[s] - want[s]) for s in want) <= 1e-5
    exported = {name: _export(tmp_path / name, tmp_path / f"{name}-hf") for name in ("deepspeed", "tp2")}
    assert exported["tp2"].keys() == exported["deepspeed"].keys()
    assert max(float((exported["tp2"][k] - exported["deepspeed"][k]).abs().max()) for k in exported["tp2"]) <= 1e-5


def _export(run: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the export needs no megatron: no shim
    env.update(PYTHONPATH=os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]) if os.pathsep in os.environ.get(
        "PYTHONPATH", "") else None
    proc = subprocess.run([sys.executable, "-m", "slimtrain.trainer.cli", "export", str(run), str(out), "--verify"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "(ok)" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    return load_file(str(out / "model.safetensors"))


TP2 = "backend={type: megatron, tensor_parallel: 2}"


@pytest.mark.parametrize("overrides, message", [
    (["backend={type: megatron, tensor_parallel: 4}", "model.num_kv_heads=2"],
     "backend.tensor_parallel=4 must divide model.num_kv_heads=2"),
    (["backend={type: megatron, virtual_stages: 2}"],
     "backend.virtual_stages=2 interleaves pipeline stages, but backend.pipeline_parallel=1"),
    (["backend={type: megatron, pipeline_parallel: 2, virtual_stages: 2}", "model.num_layers=6"],
     "backend.pipeline_parallel=2 x virtual_stages=2 must divide model.num_layers=6"),
    (["backend={type: megatron, pipeline_parallel: 4}", "model.num_layers=2"],
     "backend.pipeline_parallel=4 must divide model.num_layers=2"),
    (["backend={type: megatron}", "plugins=[{type: draft, heads: [{kind: medusa, num_heads: 1}]}]"],
     "plugins ['draft'] on the megatron backend are not built yet (it runs ['moe', 'qat'])"),
    ([TP2, "model.intermediate_size=192", "plugins=[{type: qat, weights: {group_size: 64}}]"],
     "plugins.0.weights.group_size=64 does not divide the 32 input features each rank holds of "
     "'layers.0.attn.o_proj' (a row-parallel layer): groups would straddle the slices"),
    ([TP2, "plugins=[{type: qat, weights: {format: ternary}}]"],
     "plugins.0.weights.granularity='tensor' (format 'ternary'): one scale spans the whole weight, and "
     "backend.tensor_parallel=2 splits the weight of 'layers.0.attn.q_proj'"),
    ([TP2, "plugins=[{type: qat, weights: {format: fp8_e4m3, granularity: channel}}]"],
     "plugins.0.weights.granularity='channel': one scale spans each output row, whose input features "
     "backend.tensor_parallel=2 splits the weight of 'layers.0.attn.o_proj' (a row-parallel layer); use granularity "
     "'block'"),
    ([TP2, "plugins=[{type: qat, weights: {format: nvfp4}}]"], "plugins.0.weights.format='nvfp4': its fp32 tensor"),
    ([TP2, "model.intermediate_size=192", "plugins=[{type: qat, weights: {group_size: 32}, activations: {granularity: token}}]"],
     "plugins.0.activations.granularity='token': one scale spans all the input features of 'layers.0.attn.o_proj'"),
    (["backend={type: megatron, tensor_parallel: 2, sequence_parallel: true}",
      "plugins=[{type: qat, weights: {group_size: 16}, activations: {granularity: tensor}, include: ['*.q_proj']}]"],
     "plugins.0.activations.granularity='tensor' with backend.sequence_parallel=true"),
    (["backend={type: megatron, tensor_parallel: 2, sequence_parallel: true}", "train.loss_chunk_tokens=64"],
     "train.loss_chunk_tokens=64 with backend.sequence_parallel=true"),
    (["backend={type: megatron, tensor_parallel: 2}", "model.vocab_size=513"],
     "backend.tensor_parallel=2 must divide model.vocab_size=513"),
    (["backend={type: megatron, sequence_parallel: true}"],
     "backend.sequence_parallel=true splits the sequence over the tensor-parallel group, but backend.tensor_parallel=1"),
    (["backend={type: megatron, tensor_parallel: 2, sequence_parallel: true}", "data.seq_len=63"],
     "backend.tensor_parallel=2 to divide data.seq_len=63"),
    (["backend={type: megatron, tensor_parallel: 2, sequence_parallel: true}", "data.packer=buckets",
      "data.buckets.min_len=1"], "backend.tensor_parallel=2 to divide data.buckets.min_len=1"),
    (["backend={type: megatron, tensor_parallel: 2}", "model.architecture=qwen3",
      "model.qk_norm=true"],
     "model.qk_norm=true with backend.tensor_parallel=2 needs backend.sequence_parallel=true"),
])
def test_bad_layouts_are_refused_naming_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=__import__("re").escape(message)):
        load_recipe(TINY, overrides)


@pytest.mark.parametrize("saved, overrides, message", [
    ({"format": "dist_checkpointing", "distributed_optimizer": True, "precision": "fp32"},
     ["backend={type: megatron, precision: fp32}"],
     "backend.distributed_optimizer=False, but {ckpt} was written with distributed_optimizer=True"),
    ({"format": "dist_checkpointing", "distributed_optimizer": False, "precision": "bf16"},
     ["backend={type: megatron, precision: fp32}"], "backend.precision=fp32, but {ckpt} was written with precision=bf16"),
    ({"tensor_parallel": 2, "world_size": 2}, ["backend={type: megatron}"], "holds per-rank files of an earlier"),
    (None, ["backend={type: megatron}"], "was not written by the megatron backend"),
])
def test_a_checkpoint_megatron_cannot_convert_is_refused_before_launch(tmp_path: Path, saved: dict | None,
                                                                      overrides: list[str], message: str) -> None:
    from slimtrain.trainer.backends.megatron.checkpoint import check_resumable

    if saved is not None:
        (tmp_path / "megatron").mkdir()
        (tmp_path / "megatron" / "layout.json").write_text(json.dumps(saved))
    with pytest.raises(RecipeError, match=__import__("re").escape(message.format(ckpt=tmp_path))):
        check_resumable(load_recipe(TINY, overrides), tmp_path)
    if saved is not None and saved.get("format"):  # a changed layout alone loads: megatron-core reshards it
        check_resumable(load_recipe(TINY, ["backend={type: megatron, tensor_parallel: 2, pipeline_parallel: 2, "
                                           f"precision: {saved['precision']}, distributed_optimizer: "
                                           f"{str(saved['distributed_optimizer']).lower()}}}"]), tmp_path)


def test_qat_settings_whose_groups_stay_within_a_slice_are_accepted() -> None:
    """Column-parallel layers hold whole rows and whole (replicated) inputs: channel scales and per-tensor
    activations are exact there; row-parallel layers take groups that divide their slice of the input features."""
    ok = [[TP2, "plugins=[{type: qat, weights: {granularity: channel}, activations: {granularity: tensor}, "
                "exclude: [lm_head, '*.o_proj', '*.down_proj']}]"],
          [TP2, "model.intermediate_size=192", "plugins=[{type: qat, weights: {group_size: 32}, activations: "
                "{granularity: group, group_size: 32}}]"],
          ["backend={type: megatron, tensor_parallel: 2, sequence_parallel: true}", "model.intermediate_size=192",
           "plugins=[{type: qat, weights: {format: mxfp4}, activations: {format: mxfp8}}]"]]
    for overrides in ok:
        assert load_recipe(TINY, overrides).plugins[0].type == "qat"


def test_a_world_the_layout_does_not_tile_is_refused() -> None:
    from slimtrain.trainer.backends.megatron.config import MegatronConfig

    with pytest.raises(RecipeError, match="tensor_parallel x pipeline_parallel = 2 does not divide the world size 3"):
        MegatronConfig(tensor_parallel=2).data_parallel_size(3)
    assert MegatronConfig(tensor_parallel=2).data_parallel_size(4) == 2


def test_validate_prints_the_layout_and_the_memory_of_the_busiest_stage() -> None:
    from slimtrain.trainer.backends.megatron.memory import estimate_text

    recipe = load_recipe(REPO / "recipes" / "llama-8b-megatron.yaml")
    text = estimate_text(recipe, 32, 80.0)
    assert "32 GPUs = tensor 8 x pipeline 2 x data 2; 16 layers per stage" in text
    assert "5 in flight on the first stage (chunks of 8 layers, interleaved x2)" in text  # 2 (2 - 1) + 2 + 1
    assert "does not fit" not in text
    alone = estimate_text(load_recipe(REPO / "recipes" / "llama-8b-megatron.yaml",
                                      ["backend.tensor_parallel=1", "backend.pipeline_parallel=1",
                                       "backend.virtual_stages=null", "backend.sequence_parallel=false"]), 2, 80.0)
    assert "2 GPUs = tensor 1 x pipeline 1 x data 2" in alone and "does not fit" in alone
