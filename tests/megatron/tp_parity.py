"""Run with torchrun on 2 gloo ranks (megatron-core through the test-only CPU shim): our Transformer split by the
megatron backend's tensor parallelism against the same model on one process, built from the same seed. Prints one
JSON line on rank 0: the largest differences of the logits (this rank's vocabulary slice), the loss and the
gradients (each parameter's slice).

Arguments: TIED (0/1: tied embeddings) and MODE: `tp` (qwen2 with q/k/v biases) or `sp` (megatron's sequence
parallelism on top, qwen3 with q/k norms: the norms' partial gradients summed over the group as
finalize_model_grads does in the backend)."""

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
from slimtrain.modules.transformer.config import ModelConfig  # noqa: E402
from slimtrain.modules.transformer.sharding import shard_of  # noqa: E402
from slimtrain.trainer.backends.build import ModelInit, build_model  # noqa: E402
from slimtrain.trainer.loss.cross_entropy import fp32_cross_entropy_sum  # noqa: E402


def main() -> None:
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig

    from slimtrain.trainer.backends.megatron.sequence_parallel import mark_partial_gradients
    from slimtrain.trainer.backends.megatron.tensor_parallel import parallelize, vocab_parallel_cross_entropy_sum

    sp = sys.argv[2] == "sp"

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = parallel_state.get_tensor_model_parallel_rank()
    config = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True,
                                 perform_initialization=False, gradient_accumulation_fusion=False, sequence_parallel=sp)
    arch = {"architecture": "qwen3", "qk_norm": True} if sp else {"architecture": "qwen2", "qkv_bias": True}
    cfg = ModelConfig(vocab_size=98, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=32, tie_embeddings=bool(int(sys.argv[1])), attention="sdpa", **arch)
    cpu = torch.device("cpu")
    whole = build_model(cfg, PluginStack(), ModelInit(seed=3), cpu)
    split = build_model(cfg, PluginStack(), ModelInit(seed=3), cpu, lambda m: parallelize(m, config, rank, 2))
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 98, (2, 24), generator=g), torch.randint(0, 98, (2, 24), generator=g)
    labels[0, :3] = -100
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
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
    grads = 0.0
    for name, p in split.named_parameters():
        shard = shard_of(p)
        expected = params[name].grad if shard is None else shard.take(params[name].grad)
        grads = max(grads, float((p.grad - expected).abs().max()))
    result = {"logits": float((out.detach() - ref.detach().chunk(2, dim=-1)[rank]).abs().max()),
              "loss": float((loss.detach() - ref_loss.detach()).abs() / ref_loss.detach().abs()),
              "grads": grads, "vocab_slice": out.shape[-1]}
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown: see tests/trainer/sp_parity.py


if __name__ == "__main__":
    main()
