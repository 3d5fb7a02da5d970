"""The megatron backend's tensor parallelism (megatron-core's column/row-parallel layers, vocabulary-parallel
embedding and cross-entropy) on 2 gloo ranks through the test-only CPU shim: our model split in two equals the
single-process model from the same seed (logits per vocabulary slice, loss, every gradient slice), untied and tied,
with q/k/v biases and packed documents; with megatron's sequence parallelism (the sequence split between the
layers, a document crossing the split, Qwen3's q/k norms, tied embeddings); and with the QAT plugin's fake-quantized
layers (LSQ steps split like the weights and calibrated alike; with sequence parallelism and quantized inputs too).
One torchrun process runs every case (tp_parity.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CASES = ["untied", "tied", "sequence-parallel", "qat", "qat-sequence-parallel"]


@pytest.fixture(scope="module")
def results() -> dict:
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           str(HERE / "tp_parity.py")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_model_equals_one_process(results: dict, case: str) -> None:
    result = results[case]
    assert result["vocab_slice"] == 49  # each rank holds half the vocabulary's logits
    assert result["logits"] <= 1e-5 and result["loss"] <= 1e-6 and result["grads"] <= 1e-5, result
    if case.startswith("qat"):  # all 14 projections fake-quantized, their steps calibrated as one process does
        assert result["quantized"] == 14 and result["calibrated"] == 14 and result["steps"] <= 1e-7, result
