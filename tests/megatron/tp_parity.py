"""Run with torchrun on 2 gloo ranks (megatron-core through the test-only CPU shim): our Transformer split by the
megatron backend's tensor parallelism against the same model on one process, built from the same seed, in every
case of `CASES`. Prints one JSON line on rank 0: per case, the largest differences of the logits (this rank's
vocabulary slice), the loss and the gradients (each parameter's slice), and for QAT the calibrated LSQ steps.

Cases: qwen2 with q/k/v biases, untied and tied; megatron's sequence parallelism (qwen3 with q/k norms, tied: the
norms' partial gradients summed over the group as finalize_model_grads does in the backend); the QAT plugin (int4
weights in groups of 16 with learned LSQ steps calibrated at the first forward), weights only, and with sequence
parallelism and int8 activations in groups of 16 (quantized before the column layers gather their input)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_shim  # noqa: E402

cpu_shim.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from slimtrain.modules.plugin_stack import PluginStack  # noqa: E402
from slimtrain.modules.qat.config import QATConfig  # noqa: E402
from slimtrain.modules.qat.linear import FakeQuantLinear  # noqa: E402
from slimtrain.modules.transformer.config import ModelConfig  # noqa: E402
from slimtrain.modules.transformer.sharding import shard_of  # noqa: E402
from slimtrain.trainer.backends.build import ModelInit, build_model  # noqa: E402
from slimtrain.trainer.loss.cross_entropy import fp32_cross_entropy_sum  # noqa: E402

QWEN2 = {"architecture": "qwen2", "qkv_bias": True}
QWEN3 = {"architecture": "qwen3", "qk_norm": True}
QAT = {"type": "qat", "estimator": "lsq", "weights": {"bits": 4, "group_size": 16}}
# case -> (model overrides, sequence parallel, QAT plugin block or None)
CASES = {
    "untied": (QWEN2, False, None),
    "tied": ({**QWEN2, "tie_embeddings": True}, False, None),
    "sequence-parallel": ({**QWEN3, "tie_embeddings": True}, True, None),
    "qat": (QWEN2, False, QAT),
    "qat-sequence-parallel": (QWEN3, True, {**QAT, "activations": {"granularity": "group", "group_size": 16}}),
}


def main() -> None:
    from megatron.core import parallel_state

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    results = {name: compare(*case) for name, case in CASES.items()}
    if dist.get_rank() == 0:
        print(json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown: see tests/trainer/sp_parity.py


def compare(model: dict, sp: bool, qat: dict | None) -> dict:
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    from slimtrain.trainer.backends.megatron.sequence_parallel import mark_partial_gradients
    from slimtrain.trainer.backends.megatron.tensor_parallel import parallelize, vocab_parallel_cross_entropy_sum

    rank = parallel_state.get_tensor_model_parallel_rank()
    config = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True,
                                 perform_initialization=False, gradient_accumulation_fusion=False, sequence_parallel=sp)
    cfg = ModelConfig(vocab_size=98, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=32, attention="sdpa", **model)
    cpu = torch.device("cpu")
    stacks = [PluginStack.from_configs([QATConfig(**qat)] if qat else []) for _ in range(2)]
    whole = build_model(cfg, stacks[0], ModelInit(seed=3), cpu)
    split = build_model(cfg, stacks[1], ModelInit(seed=3), cpu, lambda m: parallelize(m, config, rank, 2))
    for plugin in [*stacks[0], *stacks[1]]:
        plugin.set_step(1)  # fake-quant on: the first forward calibrates the steps from the weights
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 98, (2, 24), generator=g), torch.randint(0, 98, (2, 24), generator=g)
    labels[0, :3] = -100
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])  # a document across the sequence split (12 | 12)
    ref = whole(ids, doc_ids=doc_ids).logits
    ref_loss = fp32_cross_entropy_sum(ref, labels)
    ref_loss.backward()
    out = split(ids, doc_ids=doc_ids).logits
    loss = vocab_parallel_cross_entropy_sum(out, labels)
    loss.backward()
    if sp:
        mark_partial_gradients(split)
        for p in split.parameters():
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
    params = dict(whole.named_parameters())
    grads = max(float((p.grad - _slice(p, params[n].grad)).abs().max()) for n, p in split.named_parameters())
    buffers = dict(whole.named_buffers())
    steps = [float((b - _slice(b, buffers[n])).abs().max()) for n, b in split.named_buffers() if "step_base" in n]
    return {"logits": float((out.detach() - ref.detach().chunk(2, dim=-1)[rank]).abs().max()),
            "loss": float((loss.detach() - ref_loss.detach()).abs() / ref_loss.detach().abs()),
            "grads": grads, "vocab_slice": out.shape[-1], "steps": max(steps, default=0.0),
            "quantized": sum(isinstance(m, FakeQuantLinear) and m.active for m in split.modules()),
            "calibrated": sum(int(b) for n, b in split.named_buffers() if n.endswith("step_calibrated"))}


def _slice(held: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The part of the single process's `whole` that `held` (a tensor of the split model) corresponds to."""
    shard = shard_of(held)
    return whole if shard is None else shard.take(whole)


if __name__ == "__main__":
    main()
