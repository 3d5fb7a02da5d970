"""Run as a script on one gloo rank: for each (ZeRO stage, precision) build the real DeepSpeed backend
around a small model, save a checkpoint, read its layout back and load it into a fresh engine (and fp32 shards
into a bf16 engine); prints one JSON line per result (used by test_reshard_layout.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from slimtrain.modules.transformer import Transformer
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.trainer.backends.deepspeed import DS_TAG, DeepSpeedBackend
from slimtrain.trainer.backends.deepspeed_reshard import current_layout, saved_layout
from slimtrain.trainer.recipe.schema import DeepSpeedConfig, OptimConfig, TrainConfig
from slimtrain.trainer.env.distributed import init_distributed
from slimtrain.trainer.optim import build_optimizer, build_scheduler

SETTINGS = [(0, "fp32"), (0, "bf16"), (1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")]


def backend(stage: int, precision: str) -> DeepSpeedBackend:
    train, optim = TrainConfig(steps=4, global_batch_size=2, micro_batch_size=2), OptimConfig()
    b = DeepSpeedBackend(DeepSpeedConfig(zero_stage=stage, precision=precision), train, optim)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                    num_heads=2, num_kv_heads=1, max_seq_len=16))
    opt = build_optimizer(model, optim)
    b.setup(model, opt, build_scheduler(opt, optim.schedule, train.steps))
    return b


def one_step(b: DeepSpeedBackend) -> None:
    """So that the optimizer has state (Adam moments and step) to save."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = b.engine(ids).logits.float().logsumexp(-1).mean()
    b.engine.backward(loss)
    b.engine.step()


def masters(b: DeepSpeedBackend) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master value, full size (DeepSpeed's accessor; ZeRO-0 has none: the
    parameter itself)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in b.engine.module.named_parameters():
        value = safe_get_full_fp32_param(p)
        out[name] = (value if value is not None else p).detach().float().clone()
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """'equal (N tensors)' when every tensor is bitwise equal, else what differs."""
    if a.keys() != b.keys():
        return f"keys differ: {sorted(set(a) ^ set(b))[:4]}"
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    return f"equal ({len(a)} tensors)" if not diff else f"differ: {diff[:4]}"


def main(out: Path) -> None:
    init_distributed("gloo")
    saved_masters = {}
    for stage, precision in SETTINGS:
        directory = out / f"z{stage}-{precision}"
        trained = backend(stage, precision)
        one_step(trained)
        trained.save(directory)
        saved_masters[stage, precision] = masters(trained)
        one_step(trained)  # a second step reads the Adam moments and step count: equal only if restored
        loaded = backend(stage, precision)
        loaded.load(directory)  # same world size: DeepSpeed's own loader
        restored = same(saved_masters[stage, precision], masters(loaded))
        one_step(loaded)
        print(json.dumps({"stage": stage, "precision": precision, "files": sorted(
            p.name for p in (directory / DS_TAG).iterdir()),
            "saved": [saved_layout(directory / DS_TAG).optimizer, saved_layout(directory / DS_TAG).precision],
            "current": [current_layout(stage, precision, 1).optimizer, precision],
            "restored": restored, "next_step": same(masters(trained), masters(loaded))}), flush=True)
    for stage in (1, 2, 3):  # fp32 shards into a bf16 engine: converted through the universal checkpoint
        loaded = backend(stage, "bf16")
        loaded.load(out / f"z{stage}-fp32")
        print(json.dumps({"stage": stage, "fp32_into_bf16": same(saved_masters[stage, "fp32"], masters(loaded))}),
              flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
