"""The Triton grouped GEMM == a per-group loop of plain matmuls (forward, dA, dB), and the MoE experts computed
with it == `expert_loop`. CPU: Triton's interpreter; CUDA: native.

TRITON_INTERPRET must be set before triton is first imported (triton jits its own library functions then,
for the interpreter or the compiler), so the CPU checks all run in one subprocess started with it set (this
file run as a script), as the QAT kernel tests do; each check is still reported as its own test.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from slimtrain.modules.moe.experts import GroupedExperts, expert_loop  # noqa: E402
from slimtrain.modules.moe.router import Routing, route_softmax  # noqa: E402
from slimtrain.modules.moe.triton_grouped import triton_available, triton_grouped_mm  # noqa: E402

FP32 = {"rtol": 1e-5, "atol": 1e-4}


def loop_reference(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a @ b[g] on each group's rows, zeros past offs[-1]."""
    out, start = a.new_zeros(a.shape[0], b.shape[2]), 0
    for g, end in enumerate(offs.tolist()):
        out = out.index_copy(0, torch.arange(start, end, device=a.device), a[start:end] @ b[g])
        start = end
    return out


def make(device: str, rows: int, k: int, n: int, counts: list[int], transposed: bool = True,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, k, generator=g)
    if transposed:  # as the experts pass it: weight [E, N, K] seen as [E, K, N]
        b = torch.randn(len(counts), n, k, generator=g).transpose(1, 2)
    else:
        b = torch.randn(len(counts), k, n, generator=g)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return a.to(device, dtype), b.to(device, dtype), offs.to(device)


def run_both(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, dy: torch.Tensor | None) -> list[tuple]:
    """(output, dA, dB) of the kernel and of the fp32 loop reference, for the upstream gradient dy."""
    results = []
    for fn, cast in ((triton_grouped_mm, lambda t: t), (loop_reference, lambda t: t.float())):
        a_, b_ = cast(a.detach()).requires_grad_(), cast(b.detach()).requires_grad_()
        y = fn(a_, b_, offs)
        if dy is None:  # an expanded, stride-0 gradient (the one torch's grouped_mm backward refuses)
            y.sum().backward()
        else:
            y.backward(cast(dy))
        results.append((y.detach(), a_.grad, b_.grad))
    return results


def check_fp32(rows: int, k: int, n: int, counts: list[int], transposed: bool, *, device: str) -> None:
    a, b, offs = make(device, rows, k, n, counts, transposed)
    dy = torch.randn(rows, n, generator=torch.Generator().manual_seed(1)).to(device)
    (y, da, db), (ry, rda, rdb) = run_both(a, b, offs, dy)
    assert y.dtype == torch.float32 and y.shape == (rows, n) and db.shape == b.shape
    for got, want in ((y, ry), (da, rda), (db, rdb)):
        torch.testing.assert_close(got, want, **FP32)
    assert not y[sum(counts):].any() and not da[sum(counts):].any()  # the tail: zero output, zero gradient
    assert not db[torch.tensor(counts) == 0].any()                  # empty groups: zero weight gradient


def check_expanded_gradient(*, device: str) -> None:
    a, b, offs = make(device, 37, 24, 40, [5, 0, 25, 3])
    (y, da, db), (ry, rda, rdb) = run_both(a, b, offs, dy=None)
    for got, want in ((y, ry), (da, rda), (db, rdb)):
        torch.testing.assert_close(got, want, **FP32)


def check_half(dtype: torch.dtype, *, device: str) -> None:
    a, b, offs = make(device, 37, 24, 40, [5, 0, 25, 3], dtype=dtype)
    dy = torch.randn(37, 40, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    (y, da, db), (ry, rda, rdb) = run_both(a, b, offs, dy)
    assert y.dtype == da.dtype == db.dtype == dtype
    # the same operands on both sides, summed in fp32: only the final rounding to `dtype` differs (half an ulp,
    # up to 2**-8 of the value in bf16, 2**-11 in fp16; twice that allowed for the order of the sums)
    rtol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    for got, want in ((y, ry), (da, rda), (db, rdb)):
        torch.testing.assert_close(got.float(), want, rtol=rtol, atol=1e-3)


def check_torch_grouped_mm(*, device: str) -> None:
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None or device != "cpu":  # torch's CUDA kernel wants bf16 on recent GPUs: the loop is the check
        return
    a, b, offs = make(device, 40, 16, 32, [7, 0, 20, 13])
    torch.testing.assert_close(triton_grouped_mm(a, b, offs), fn(a, b, offs=offs), **FP32)


def experts_triton(x: torch.Tensor, routing: Routing, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The real `GroupedExperts` with experts_impl "triton", holding these weights."""
    module = GroupedExperts(gate_up.shape[0], x.shape[-1], down.shape[-1], impl="triton")
    del module.gate_up, module.down  # hold the test's leaves (their gradients are compared), not copies
    module.gate_up, module.down = gate_up, down
    return module(x, routing)


def check_experts(*, device: str) -> None:
    g = torch.Generator().manual_seed(0)
    experts, hidden, inter, tokens = 4, 24, 20, 13      # unaligned widths: torch's grouped_mm refuses them
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 3] = -1e4                                  # expert 3 never chosen: an empty group
    routing = route_softmax(logits.to(device), top_k=2)
    dropped = routing.experts.clone()
    dropped[[2, 7, 11], [1, 0, 1]] = experts             # three slots dropped (as capacity limits do)
    routing = Routing(routing.weights, dropped, routing.scores)
    x0 = torch.randn(tokens, hidden, generator=g)
    gate_up0 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    down0 = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    dy = torch.randn(tokens, hidden, generator=g).to(device)
    results = []
    for fn in (experts_triton, expert_loop):
        x, gate_up, down = (t.to(device).requires_grad_() for t in (x0, gate_up0, down0))
        out = fn(x, routing, gate_up, down)
        out.backward(dy)
        results.append((out.detach(), x.grad, gate_up.grad, down.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **FP32)
    assert not results[0][2][3].any() and not results[0][3][3].any()


SHAPES = {  # rows, K, N, rows per group
    "uneven-empty-tail": (37, 24, 40, [5, 0, 25, 3]),      # unaligned K and N; 4 rows past offs[-1]
    "one-group-all-rows": (20, 16, 16, [0, 20, 0]),
    "empty-ends": (30, 20, 18, [0, 17, 13, 0]),
    "many-tiles": (150, 40, 72, [130, 20]),                 # several row, column and K tiles per group
    "all-empty": (9, 16, 24, [0, 0, 0]),                    # nothing multiplied: all zeros
}
CHECKS: dict[str, Callable[..., None]] = {  # name -> check(device=...)
    **{f"fp32-{name}-{'b-view' if t else 'b-contiguous'}": functools.partial(check_fp32, *shape, t)
       for name, shape in SHAPES.items() for t in (True, False)},
    "expanded-gradient": check_expanded_gradient,
    "fp16": functools.partial(check_half, torch.float16),
    "bf16": functools.partial(check_half, torch.bfloat16),
    "torch-grouped-mm": check_torch_grouped_mm,
    "experts-equal-expert-loop": check_experts,
}


def run_checks(device: str) -> dict[str, str]:
    """Every check on `device`: {name: "" if it passed, else the error}."""
    results = {}
    for name, check in CHECKS.items():
        try:
            check(device=device)
            results[name] = ""
        except Exception as e:  # noqa: BLE001 - reported per check
            results[name] = f"{type(e).__name__}: {e}"[:3000]
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CHECKS)
def test_under_the_interpreter(name: str, interpreted: dict[str, str]) -> None:
    assert interpreted[name] == "", interpreted[name]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_gpu() -> None:
    assert {name: err for name, err in run_checks("cuda").items() if err} == {}


def test_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available(torch.zeros(2))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_available(torch.zeros(2))  # a CPU tensor without the interpreter


if __name__ == "__main__":  # the interpreter subprocess: TRITON_INTERPRET=1 was set before triton's import
    print(json.dumps(run_checks("cpu")))
