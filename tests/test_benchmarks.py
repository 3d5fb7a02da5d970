"""The benchmark scripts still run where CI can run them (their GPU parts run on a GPU only)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _benchmark_json(script: str, *args: str) -> dict:
    """Run benchmarks/`script` on CPU (CUDA hidden: on a GPU some would train a 1B model) and return
    the JSON line it ends with."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_memory_benchmark_prints_the_estimate_it_compares_against() -> None:
    result = _benchmark_json("memory.py", str(REPO / "recipes" / "llama-1b-dense.yaml"),
                             "train.activation_checkpointing=true", "train.loss_chunk_tokens=4096")
    est = result["estimate_gb"]
    assert result["params"] > 1e9 and result["overrides"][0] == "train.activation_checkpointing=true"
    # with checkpointing and a chunked loss the backward pass holds about what the optimizer step does
    assert abs(est["backward_peak"] - est["model_states"]) < 0.01 * est["model_states"]


def test_attention_benchmark_times_every_cpu_backend_against_causal_sdpa() -> None:
    result = _benchmark_json("attention.py", "--reps", "1", "--warmup", "0", "--doc-len", "64")
    assert {(r["backend"], r["layout"]) for r in result["rows"]} == {
        (b, layout) for b in ("eager", "sdpa") for layout in ("one_doc_per_row", "packed_mean_64")}
    assert all(r["ms"] > 0 and r["speedup_vs_causal_sdpa"] > 0 and r["host_mask_ms_per_forward"] > 0 for r in result["rows"])


def test_packed_layout_and_its_flops() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from attention import masked_flops, packed_doc_ids
    finally:
        sys.path.pop(0)
    doc_ids = packed_doc_ids(3, 1000, 50)
    assert doc_ids.shape == (3, 1000) and bool((doc_ids[:, 1:] >= doc_ids[:, :-1]).all())  # contiguous documents
    assert 8 < doc_ids.max(1).values.float().mean() < 40  # ~20 documents of mean 50 per row
    # one document of n tokens: 4 * n(n+1)/2 * H * D forward, 3.5x that with the backward
    assert masked_flops(torch.zeros(1, 8, dtype=torch.long), heads=2, head_dim=4) == 3.5 * 4 * 36 * 2 * 4


def test_profile_kinds_name_the_kernels_of_a_gpu_step() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from profile_kinds import format_kinds, kind_of
    finally:
        sys.path.pop(0)
    expected = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN": "matmul",
        "aten::mm": "matmul",
        "flex_attention_backward": "attention",
        "triton_tem_fused_flex_attention_backward_zeros_0": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0": "attention",
        "flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>": "attention",
        "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": "fused (compiled)",
        "## Call CompiledFxGraph abc ##": "fused (compiled)",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "communication",
        "void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>": "copy / cast",
        "void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>": "elementwise",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>": "reduction",
        "void at::native::embedding_backward_feature_kernel": "embedding / indexing",
        "aten::view": "views, allocation, autograd",
        "aten::expand": "views, allocation, autograd",
        "aten::exp": "elementwise",
        "aten::scatter_add_": "embedding / indexing",
        "void at::native::index_elementwise_kernel<128, 4>": "embedding / indexing",
        "aten::_foreach_norm": "reduction",
        "triton_poi_fused__scaled_dot_product_cudnn_attention_transpose_0": "fused (compiled)",
        "some_unknown_kernel": "other",
    }
    assert {name: kind_of(name) for name in expected} == expected
    table = format_kinds({"hf": {"matmul": 1.5, "attention": 0.7}, "ours": {"matmul": 1.6, "attention": 1.3, "other": 0.1}})
    lines = table.splitlines()
    assert lines[1].split() == ["matmul", "1.500", "1.600"] and lines[-1].split() == ["total", "2.200", "3.000"]


def test_loss_benchmark_compares_the_compiled_loss_with_the_eager_one() -> None:
    result = _benchmark_json("loss.py", "--tokens", "64", "--vocab", "512", "--reps", "1")
    assert result["eager"]["seconds"] > 0 and result["compiled"]["seconds"] > 0 and result["speedup"] > 0


def test_buckets_benchmark_curves_leave_out_evaluations_and_count_flops_by_row_length() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from buckets import at, curve, print_lines, reach
    finally:
        sys.path.pop(0)
    records = [{"step": 1, "loss": 7.0, "tokens": 100, "time_s": 1.0, "row_len": 16},
               {"step": 2, "loss": 6.0, "tokens": 200, "time_s": 2.0, "row_len": 256},
               {"step": 2, "eval_loss": 5.0, "eval_s": 0.5},
               {"step": 3, "loss": 5.5, "tokens": 300, "time_s": 3.5, "row_len": 256},
               {"step": 3, "eval_loss": 4.0, "eval_s": 0.25}]
    points = curve(records, 256, lambda row_len: float(row_len))
    assert [p["train_s"] for p in points] == [2.0, 3.0]  # step 3's time_s holds the evaluation after step 2
    assert [p["flops"] for p in points] == [100 * 16 + 100 * 256, 100 * 16 + 200 * 256]
    assert reach(points, "train_s", 4.5) == 2.5 and reach(points, "train_s", 3.0) is None
    assert at(points, "tokens", 250) == 4.5 and at(points, "tokens", 400) is None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the last line holds every packer without its curve, for expect: targets
        print_lines([{"packer": "bfd", "flops_to_target": 2.0, "curve": points}, {"packer": "buckets", "curve": []}], 5.0)
    last = json.loads(out.getvalue().splitlines()[-1])
    assert last["by_packer"] == {"bfd": {"packer": "bfd", "flops_to_target": 2.0}, "buckets": {"packer": "buckets"}}


@pytest.mark.slow
def test_megatron_step_benchmark_times_both_backends_on_one_model() -> None:
    pytest.importorskip("megatron.core")
    result = _benchmark_json("megatron_step.py", "--rounds", "1", "--warmup", "1", "--steps", "1")
    assert result["deepspeed_tokens_per_s"] > 0 and result["megatron_tokens_per_s"] > 0
    assert result["ratio_megatron_over_deepspeed"] == round(
        result["megatron_tokens_per_s"] / result["deepspeed_tokens_per_s"], 3)


def test_paired_benchmark_sums_up_the_differences_over_seeds(tmp_path: Path) -> None:
    losses = {("a", 0): 5.17, ("b", 0): 5.19, ("a", 1): 5.15, ("b", 1): 5.13}  # a wins at seed 0, loses at seed 1
    reuse = []
    for (side, seed), loss in losses.items():
        run = tmp_path / f"{side}{seed}"
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval_loss": 9.0}) + "\n"
                                           + json.dumps({"step": 2, "eval_loss": loss}) + "\n")
        reuse += ["--reuse", f"{side}:{seed}={run}"]
    result = _benchmark_json("paired.py", "--a", "recipes/x.yaml", "--b", "recipes/y.yaml", "--seeds", "0", "1",
                             "--out", str(tmp_path / "out"), *reuse)
    assert result["per_seed"]["0"] == {"a": 5.17, "b": 5.19, "diff": -0.02}
    assert result["diff_mean"] == 0.0 and result["diff_min"] == -0.02 and result["diff_max"] == 0.02
    assert result["diff_std"] == pytest.approx(0.0283, abs=1e-4) and result["diff_sem"] == 0.02
