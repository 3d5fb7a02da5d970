"""Triton kernels == PyTorch reference, bit for bit (CPU: Triton's interpreter; CUDA: native)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SPECS = {
    "int4-g32": {"format": "int", "bits": 4, "group_size": 32},
    "int3-g64-asym": {"format": "int", "bits": 3, "symmetric": False, "group_size": 64},
    "int2-g128": {"format": "int", "bits": 2, "group_size": 128},
    "int8-channel": {"format": "int", "bits": 8, "granularity": "channel"},
    "mxfp4": {"format": "mxfp4"},
    "nvfp4": {"format": "nvfp4"},
    "ternary": {"format": "ternary"},
}

# One interpreter process for every case: TRITON_INTERPRET must be set before triton is imported.
CHECK = r'''
import json, sys, torch
from slimtrain.modules.qat.config import QuantSpec
from slimtrain.modules.qat import kernels
from slimtrain.modules.qat.reference import fake_quant_reference
specs = json.loads(sys.argv[1])
device = sys.argv[2]
bad = []
for name, block in specs.items():
    spec = QuantSpec(**block).check_role("weights", 4)
    g = torch.Generator().manual_seed(0)
    for shape in [(48, 256), (7, 640)]:
        x = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]
        x[0, :32] = 0.0                                   # an all-zero group
        x[1, 5] = 1e-30                                   # a subnormal-sized value
        x = x.to(device)
        y, tscale = kernels.fake_quant_forward(x, spec)
        ref, mask, _ = fake_quant_reference(x, spec)
        grad = torch.randn(shape, generator=g).to(device)
        gx = kernels.fake_quant_backward(grad, x, spec, tscale)
        if not torch.equal(y, ref): bad.append(f"{name} {shape} forward: max diff {(y - ref).abs().max().item()}")
        if not torch.equal(gx, grad * mask): bad.append(f"{name} {shape} backward")
print(json.dumps(bad))
'''


def _run(device: str, interpret: bool) -> list[str]:
    import json

    env = dict(os.environ, TRITON_INTERPRET="1") if interpret else dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", CHECK, json.dumps(SPECS), device], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kernels_equal_reference_under_the_interpreter() -> None:
    assert _run("cpu", interpret=True) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_equal_reference_on_gpu() -> None:
    assert _run("cuda", interpret=False) == []
