"""The per-GPU memory estimate: activations counted from the block's own saved tensors, model states in
DeepSpeed's terms, and what `slimtrain validate --world-size` prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.modules.transformer.attention import bind_attention
from slimtrain.modules.transformer.rope import rope_cos_sin
from slimtrain.trainer.env.memory import block_activation_bytes_per_token, estimate, model_state_bytes
from slimtrain.trainer.recipe.loading import load_recipe

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3


def _saved_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, recompute: bool, tokens: int = 48) -> float:
    """Bytes of the distinct tensors one block saves for backward (parameters and the shared RoPE tables
    excluded), per token, with SDPA's fused causal kernel as on a GPU."""
    model = Transformer(cfg).to(dtype)
    block = model.layers[0]
    block.recompute = recompute
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=dtype, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(tokens)[None], cfg.dim_per_head, cfg.rope_theta, dtype)
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), cos, sin]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin, bind_attention("sdpa", None, tokens, x.device, dtype))
    return sum(saved.values()) / tokens


@pytest.mark.parametrize("shape", [
    dict(hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2),   # GQA
    dict(hidden_size=128, intermediate_size=96, num_heads=4),                 # MHA
    dict(hidden_size=64, intermediate_size=192, num_heads=8, num_kv_heads=1),  # MQA
    dict(hidden_size=64, intermediate_size=96, num_heads=4, num_kv_heads=2, head_dim=32),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activation_formula_counts_what_the_block_saves(shape: dict, dtype: torch.dtype) -> None:
    cfg = ModelConfig(vocab_size=97, num_layers=1, max_seq_len=64, attention="sdpa", **shape)
    width = torch.finfo(dtype).bits // 8
    assert _saved_bytes_per_token(cfg, dtype, recompute=False) == block_activation_bytes_per_token(cfg, width)
    # Recomputed: the block keeps only its input (what memory.estimate counts per layer).
    assert _saved_bytes_per_token(cfg, dtype, recompute=True) == width * cfg.hidden_size


def test_model_states_match_deepspeed_estimators() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, largest, gpus = 8_030_000_000, 525_000_000, 32
    for offload in (False, True):
        _, ds2 = estimate_zero2_model_states_mem_needs(params, gpus, 1, cpu_offload=offload)
        assert model_state_bytes(params, largest, 2, "bf16", gpus, offload) == pytest.approx(ds2, abs=1)
        _, ds3, _ = estimate_zero3_model_states_mem_needs(params, largest, gpus, 1, cpu_offload=offload,
                                                          cpu_offload_params=False)
        bf16_partition = 0 if offload else 2 * params / gpus  # the bf16 parameter partition DeepSpeed leaves out
        assert model_state_bytes(params, largest, 3, "bf16", gpus, offload) == pytest.approx(ds3 + bf16_partition,
                                                                                            abs=1)
    # Each stage partitions more: less memory per GPU, and stage 0 is 20 bytes a parameter in bf16.
    per_stage = [model_state_bytes(params, largest, z, "bf16", gpus) for z in range(4)]
    assert per_stage == sorted(per_stage, reverse=True) and per_stage[0] == 20 * params


def _validate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimtrain.trainer.cli", "validate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_validate_prints_the_estimate_and_what_to_change() -> None:
    recipe = str(REPO / "recipes" / "llama-8b-zero3.yaml")
    fits = _validate(recipe, "--world-size", "32", "model.vocab_size=128256")
    assert fits.returncode == 0, fits.stderr
    assert "memory per GPU (estimate): 32 GPUs, ZeRO-3, bf16" in fits.stderr and "of 80 GB" in fits.stderr
    assert "does not fit" not in fits.stderr
    tight = _validate(recipe, "--world-size", "8", "model.vocab_size=128256", "backend.zero_stage=2",
                      "train.activation_checkpointing=false")
    assert tight.returncode == 0, tight.stderr
    assert "does not fit in 80 GB: try train.activation_checkpointing=true, or backend.zero_stage=3" in tight.stderr
    unknown = _validate(recipe, "--world-size", "32")  # the tokenizer path is not on this machine
    assert unknown.returncode == 0 and "memory estimate skipped" in unknown.stderr
    assert "add model.vocab_size=N" in unknown.stderr


def test_chunked_loss_bounds_the_logits_by_one_chunk() -> None:
    recipe = REPO / "recipes" / "llama-8b-zero3.yaml"
    plain = estimate(load_recipe(recipe, ["train.loss_chunk_tokens=0"]), 8, 128256)
    chunked = estimate(load_recipe(recipe, ["train.loss_chunk_tokens=1024"]), 8, 128256)
    assert plain.logits == 8192 * 128256 * 12  # fp32: saved log-softmax and the two gradients of its backward
    assert chunked.logits * 8 == plain.logits
    assert (chunked.model_states, chunked.activations) == (plain.model_states, plain.activations)
    tight = _validate(str(recipe), "--world-size", "8", "model.vocab_size=128256", "backend.zero_stage=2",
                      "train.activation_checkpointing=false", "train.loss_chunk_tokens=0")
    assert "try train.activation_checkpointing=true, or train.loss_chunk_tokens=4096, or backend.zero_stage=3" \
        in tight.stderr


@pytest.mark.parametrize("compiled,expected", [(False, 12.0), (True, 2.0)])
def test_the_loss_term_follows_train_compile(compiled: bool, expected: float) -> None:
    # 12.0 and 2.0 B per bf16 logit were measured on CPU (ru_maxrss of a fresh process around one
    # forward + backward); a max-RSS test proved unreliable inside the full suite, so only the formula is tested.
    recipe = load_recipe(REPO / "recipes" / "llama-1b-dense.yaml", [f"train.compile={str(compiled).lower()}"])
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len
    assert estimate(recipe, 1, 32000).logits == tokens * 32000 * expected


def test_the_peak_is_the_larger_of_the_backward_pass_and_the_optimizer_step() -> None:
    """The H100 measurement of the 1B recipe (benchmarks/memory.py, one GPU, ZeRO-1, bf16): 35.08 GiB
    allocated at the peak, in the backward pass. (The loss and edge terms were fitted on this run and a
    CPU one; a check against a second GPU configuration is still to be taken.)"""
    recipe = REPO / "recipes" / "llama-1b-dense.yaml"
    plain = estimate(load_recipe(recipe), 1, 32000)
    assert plain.step_only == 4 * plain.params  # bf16 ZeRO-1: the fp32 gradient partition exists only at the step
    assert plain.buckets == 500_000_000 * 2  # DeepSpeed's default reduce bucket, bf16
    assert plain.backward_peak > plain.model_states
    assert abs(plain.total - plain.reserve - 35.08 * GIB) < 0.02 * 35.08 * GIB
    lean = estimate(load_recipe(recipe, ["train.activation_checkpointing=true", "train.loss_chunk_tokens=4096"]), 1, 32000)
    assert lean.model_states == 20 * lean.params and lean.total - lean.reserve < 1.01 * lean.model_states


@pytest.mark.parametrize("overrides, stage_only, bucket", [
    ([], 4.0 / 8, 2 * 500_000_000),                                                     # ZeRO-1: a partition
    (["backend.zero_stage=0"], 4.0, 0),                                                 # ZeRO-0: whole, no bucket
    (["backend.zero_stage=3"], 0, 2 * 500_000_000),                                     # stage-3 terms; its bucket
    (["backend.raw={zero_optimization: {reduce_bucket_size: 1000, overlap_comm: true}}"], 4.0 / 8, 2 * 2 * 1000),
    (["backend.raw={zero_optimization: {contiguous_gradients: false}}"], 4.0 / 8, 0),
    (["backend.zero_stage=2"], 0, 2 * 500_000_000),                                     # fp32 sums all along
    (["backend.zero_stage=2", "backend.grad_accum_dtype=bf16"], 4.0 / 8, 2 * 500_000_000),  # bf16 sums
    (["backend.precision=fp32"], 0, 4 * 500_000_000),
])
def test_deepspeed_buffers_follow_the_stage_and_the_raw_block(overrides: list[str], stage_only: float, bucket: int) -> None:
    e = estimate(load_recipe(REPO / "recipes" / "llama-1b-dense.yaml", overrides), 8, 32000)
    assert (e.step_only, e.buckets) == (stage_only * e.params, bucket)


def test_the_gradient_bucket_is_no_larger_than_the_model_unless_the_recipe_says() -> None:
    from slimtrain.trainer.backends.deepspeed import ds_config, fit_gradient_bucket

    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml")
    conf = ds_config(recipe.backend, recipe.train, recipe.optim, 2)
    assert fit_gradient_bucket(conf, 158_016)["zero_optimization"]["reduce_bucket_size"] == 158_016
    assert fit_gradient_bucket(conf, 10**12)["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    raw = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", ["backend.raw={zero_optimization: {reduce_bucket_size: 7}}"])
    conf = ds_config(raw.backend, raw.train, raw.optim, 2)
    assert fit_gradient_bucket(conf, 158_016)["zero_optimization"]["reduce_bucket_size"] == 7
    zero3 = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", ["backend.zero_stage=3"])
    assert "reduce_bucket_size" not in fit_gradient_bucket(ds_config(zero3.backend, zero3.train, zero3.optim, 2),
                                                           158_016)["zero_optimization"]
    assert estimate(recipe, 2, 512).buckets == 4 * estimate(recipe, 2, 512).params  # fp32, the model's size


@pytest.mark.parametrize("raw, message", [
    ("{zero_optimization: null}", "must be a mapping of DeepSpeed ZeRO settings, got None"),
    ("{zero_optimization: {stage: 3}}", "zero_optimization.stage=3 is set by the recipe; use backend.zero_stage"),
])
def test_a_raw_zero_block_that_would_contradict_the_recipe_is_refused(raw: str, message: str) -> None:
    from slimtrain.trainer.errors import RecipeError

    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        load_recipe(REPO / "recipes" / "llama-1b-dense.yaml", [f"backend.raw={raw}"])


@pytest.mark.parametrize("stage", [2, 3])
def test_fp32_gradient_sums_change_the_gradient_partition(stage: int) -> None:
    recipe = REPO / "recipes" / "llama-1b-dense.yaml"
    fp32 = estimate(load_recipe(recipe, [f"backend.zero_stage={stage}"]), 8, 32000)
    bf16 = estimate(load_recipe(recipe, [f"backend.zero_stage={stage}", "backend.grad_accum_dtype=bf16"]), 8, 32000)
    # ZeRO-2, bf16 sums: a bf16 gradient partition, and the fp32 one made from it only at the step; fp32
    # sums: the fp32 partition all along, no bf16 one. ZeRO-3: its gradient partition is fp32 instead of
    # bf16, and the step still makes its fp32 copy (in the stage-3 state terms).
    difference = 2 * fp32.params / 8
    assert bf16.model_states - fp32.model_states == pytest.approx(difference if stage == 2 else -difference)
    assert fp32.step_only == 0 and bf16.step_only == (4 * bf16.params / 8 if stage == 2 else 0)


@pytest.mark.parametrize("stage, held_bytes", [(1, 4), (2, 2)])
def test_expert_parallelism_divides_the_experts_each_gpu_holds(stage: int, held_bytes: int) -> None:
    """backend.expert_parallel_size=2: each GPU holds half of the routed experts' weights (bf16: 2 bytes each) and,
    at ZeRO-1, of their gradients (2 more; ZeRO-2 here sums into the fp32 partition, which is 1/world of every
    parameter either way). Everything else is unchanged."""
    recipe = REPO / "recipes" / "llama-1b-dense.yaml"
    moe = "plugins=[{type: moe, num_experts: 8, top_k: 2, expert_intermediate_size: 512, first_k_dense: 2}]"
    one = estimate(load_recipe(recipe, [moe, f"backend.zero_stage={stage}"]), 8, 32000)
    two = estimate(load_recipe(recipe, [moe, f"backend.zero_stage={stage}", "backend.expert_parallel_size=2"]), 8,
                   32000)
    experts = (22 - 2) * 8 * 3 * 2048 * 512  # MoE layers x experts x (gate, up, down) of hidden x width
    assert (one.expert_params, two.expert_params, two.expert_parallel) == (0, experts, 2)
    assert two.params == one.params and two.held_params == one.params - experts // 2
    assert one.model_states - two.model_states == held_bytes * experts // 2
    assert (two.activations, two.logits, two.buckets, two.step_only) == (
        one.activations, one.logits, one.buckets, one.step_only)
    if stage == 2:
        out = _validate(str(recipe), "--world-size", "8", "model.vocab_size=32000", moe, "backend.zero_stage=2",
                        "backend.expert_parallel_size=2")
        assert out.returncode == 0, out.stderr
        assert f"experts          {experts / 1e9:.2f} B  of them, spread over 2 ranks" in out.stderr
