"""Run as a script on one gloo rank: how exactly the real DeepSpeed backend sums the gradients of many
bf16 micro-batches, for each (ZeRO stage, backend.grad_accum_dtype). Prints one JSON line per setting
(used by test_grad_accum_dtype.py).

With plain SGD at lr 1 and no clipping, one optimizer step moves the fp32 master weights by exactly the
summed gradient, so `before - after` is what the engine accumulated (up to the fp32 rounding of that
subtraction: about 1e-7 of a weight). The reference sums the same bf16 micro-batch gradients (each of
loss / accumulation steps, as the engine scales them) in fp64. The error is over all parameters at once."""

from __future__ import annotations

import json
import sys

import torch

from slimtrain.modules.transformer import Transformer
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.trainer.backends.deepspeed import DeepSpeedBackend
from slimtrain.trainer.recipe.schema import DeepSpeedConfig, OptimConfig, TrainConfig
from slimtrain.trainer.env.distributed import init_distributed

MICRO_BATCHES = 64
# (stage, grad_accum_dtype, offload_optimizer); offloading runs with a bucket smaller than the model, so that
# gradients are reduced (and moved to the CPU) in the middle of each backward pass.
SETTINGS = [(2, "auto", False), (2, "bf16", False), (3, "auto", False), (3, "bf16", False), (2, "auto", True),
            (3, "auto", True)]


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                                   num_kv_heads=1, max_seq_len=16))


def loss_of(module, ids: torch.Tensor) -> torch.Tensor:
    return module(ids).logits.float().logsumexp(-1).mean()


def reference(batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    bf16 = model().to(torch.bfloat16)
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in bf16.named_parameters()}
    for ids in batches:
        bf16.zero_grad(set_to_none=True)
        (loss_of(bf16, ids) / len(batches)).backward()
        for n, p in bf16.named_parameters():
            total[n] += p.grad.double()
    return total


def accumulated(stage: int, accum_dtype: str, offload: bool, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    train = TrainConfig(steps=1, global_batch_size=len(batches), micro_batch_size=1)
    raw = {"zero_optimization": {"reduce_bucket_size": 2048}} if offload else {}
    cfg = DeepSpeedConfig(zero_stage=stage, precision="bf16", grad_accum_dtype=accum_dtype, offload_optimizer=offload,
                          raw=raw)
    b = DeepSpeedBackend(cfg, train, OptimConfig(grad_clip=None))
    m = model()
    b.setup(m, torch.optim.SGD(m.parameters(), lr=1.0), None)
    master = lambda: {n: safe_get_full_fp32_param(p).double().clone() for n, p in b.engine.module.named_parameters()}
    before = master()
    for ids in batches:
        b.backward(loss_of(b.engine, ids))
        b.engine.step()
    assert b.engine.global_steps == 1
    return {n: before[n] - after for n, after in master().items()}


def main() -> None:
    init_distributed("gloo")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (1, 16), generator=gen) for _ in range(MICRO_BATCHES)]
    ref = reference(batches)
    for stage, accum_dtype, offload in SETTINGS:
        got = accumulated(stage, accum_dtype, offload, batches)
        diff = torch.cat([(got[n] - ref[n]).flatten() for n in ref])
        error = float(diff.norm() / torch.cat([r.flatten() for r in ref.values()]).norm())
        print(json.dumps({"stage": stage, "grad_accum_dtype": accum_dtype, "offload_optimizer": offload,
                          "relative_error": error}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
