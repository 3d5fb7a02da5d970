"""Run with torchrun on 2 gloo ranks: the model with its sequence split over the ranks (DeepSpeed-Ulysses, through
the backend's own groups and DeepSpeed's DistributedAttention) against the same model on one process, on packed rows
whose documents cross the slice boundary, with GQA and a sliding window on one layer. Prints one JSON line on rank 0:
the largest differences of logits, loss and every gradient."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from slimtrain.modules.transformer import Transformer
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.trainer.backends.deepspeed_ulysses import create_sequence_groups


def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                      max_seq_len=64, architecture="qwen2", qkv_bias=True, sliding_window=9, sliding_window_layers=[2],
                      attention="sdpa")
    return Transformer(cfg)


def batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 48), generator=g)
    doc_ids = torch.tensor([[0] * 17 + [1] * 19 + [2] * 12, [0] * 30 + [1] * 14 + [-1] * 4])  # bounds cross 24
    positions = torch.cat([torch.arange(17), torch.arange(19), torch.arange(12)]).repeat(2, 1)
    positions[1] = torch.cat([torch.arange(30), torch.arange(14), torch.arange(4)])
    labels = torch.randint(0, 97, (2, 48), generator=g)
    labels[1, 44:] = -100
    return ids, doc_ids, positions, labels


def loss_and_grads(m: Transformer, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    ids, doc_ids, positions, _ = batch()
    logits = m(ids, position_ids=positions, doc_ids=doc_ids).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}


def main() -> None:
    dist.init_process_group("gloo")
    shard = create_sequence_groups(2)
    labels = batch()[3]
    ref_logits, ref_loss, ref_grads = loss_and_grads(model(), labels)
    sharded = model()
    sharded.sequence_shard = shard
    logits, loss, grads = loss_and_grads(sharded, shard.local(labels))
    total = loss.clone()
    dist.all_reduce(total)  # the group's loss: each rank's slice summed
    for g in grads.values():
        dist.all_reduce(g)  # parameter gradients: each slice's contribution summed (what DeepSpeed does)
    result = {"logits": float((logits - shard.local(ref_logits)).abs().max()),
              "loss": float((total - ref_loss).abs() / ref_loss.abs()),
              "grads": max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads),
              "slice": list(logits.shape)}
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # Exit without the interpreter's teardown: a C++ thread of DeepSpeed's CPU communication op is sometimes still
    # joinable when the static destructors run, and its std::terminate would fail a check that has passed.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
