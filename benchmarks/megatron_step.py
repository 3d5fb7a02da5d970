"""Training-step throughput of the megatron backend (TP=1, one GPU) against the DeepSpeed backend: the same model,
data, optimizer settings and precision, built through each backend's own `build_model`, one process, timed in
alternating rounds (median round each, as benchmarks/step.py). Prints tokens/s and MFU of both, the ratio
megatron/deepspeed, then one JSON line.

    python benchmarks/megatron_step.py --preset 1b --accum 8     # GPU: the ~1B model, seq 4096, bf16
    python benchmarks/megatron_step.py                           # CPU smoke run (tiny preset, fp32)

On a machine without CUDA megatron-core needs the test-only CPU shim (tests/megatron/cpu_shim.py); it is loaded
here for the smoke run only, so CPU figures say nothing about GPU speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step import PRESETS, _batches, _init_dist, measure  # noqa: E402


def make_backend_step(name: str, cfg, micro: int, accum: int, bf16: bool):
    """One optimizer step of `name`'s backend (deepspeed: ZeRO-1; megatron: TP=1, its DDP and optimizer)."""
    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.trainer.backends.build import ModelInit
    from slimtrain.trainer.loss.lm import make_loss_fn
    from slimtrain.trainer.optim import build_optimizer, build_scheduler
    from slimtrain.trainer.recipe.schema import OptimConfig, TrainConfig

    optim_cfg, precision = OptimConfig(lr=1e-4), "bf16" if bf16 else "fp32"
    train_cfg = TrainConfig(global_batch_size=micro * accum, micro_batch_size=micro)
    if name == "deepspeed":
        from slimtrain.trainer.backends.deepspeed import DeepSpeedBackend
        from slimtrain.trainer.recipe.schema import DeepSpeedConfig

        backend = DeepSpeedBackend(DeepSpeedConfig(zero_stage=1, precision=precision), train_cfg, optim_cfg)
    else:
        from slimtrain.trainer.backends.megatron.backend import MegatronBackend
        from slimtrain.trainer.backends.megatron.config import MegatronConfig

        backend = MegatronBackend(MegatronConfig(precision=precision), train_cfg, optim_cfg)
    model = backend.build_model(cfg, PluginStack(), ModelInit(seed=0))
    opt = build_optimizer(model, optim_cfg)
    backend.setup(model, opt, build_scheduler(opt, optim_cfg.schedule, 10**6))
    loss_fn = make_loss_fn(cross_entropy=backend.cross_entropy)
    return lambda micro_batches: backend.train_step(micro_batches, loss_fn)


def main() -> None:
    from slimtrain.modules.transformer import ModelConfig
    from slimtrain.trainer.logging import Throughput

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        sys.path.insert(0, str(HERE.parent / "tests" / "megatron"))
        import cpu_shim

        cpu_shim.install()
        torch.set_num_threads(os.cpu_count() or 1)
    preset = PRESETS[args.preset]
    seq, micro = preset["seq"], preset["micro"]
    cfg = ModelConfig(max_seq_len=seq, **preset["model"])
    _init_dist()
    device = torch.device("cuda" if gpu else "cpu")
    flat = _batches(cfg.vocab_size, micro, seq, 4 * args.accum, device)
    batches = [flat[i * args.accum:(i + 1) * args.accum] for i in range(4)]
    steps = {name: make_backend_step(name, cfg, micro, args.accum, gpu) for name in ("deepspeed", "megatron")}
    rates = measure(steps, batches, args.rounds, args.steps or (5 if gpu else 2), args.warmup)
    peak, fpt = Throughput(cfg.flops_per_token(seq)).peak, cfg.flops_per_token(seq)
    result = {"device": torch.cuda.get_device_name() if gpu else "cpu", "preset": args.preset,
              "params": cfg.num_params(), "seq": seq, "micro": micro, "accum": args.accum,
              "precision": "bf16" if gpu else "fp32", "megatron_tensor_parallel": 1, "deepspeed_zero_stage": 1,
              **{f"{n}_tokens_per_s": round(r, 1) for n, r in rates.items()},
              **{f"{n}_mfu": round(r * fpt / peak, 4) if peak else None for n, r in rates.items()},
              "ratio_megatron_over_deepspeed": round(rates["megatron"] / rates["deepspeed"], 3)}
    print(f"{'':10} {'tokens/s':>12} {'MFU':>8}")
    for name in rates:
        mfu = result[f"{name}_mfu"]
        print(f"{name:10} {rates[name]:12,.0f}" + (f" {mfu:8.1%}" if mfu is not None else ""))
    print(f"ratio megatron/deepspeed: {result['ratio_megatron_over_deepspeed']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
