"""`slimtrain validate --world-size N` for the megatron backend: the layout (tensor x pipeline x data = world) and
the memory per GPU of its busiest pipeline stage.

Counted per GPU: the stage's parameters split over the tensor-parallel ranks (the embedding on the first stage, the
head on the last), megatron's model states (bf16 or fp32 weights, fp32 gradient buffers for the reduction, fp32
masters and Adam moments, the last two split over the data-parallel ranks with the distributed optimizer), the
activations of the micro-batches the schedule keeps in flight on the first stage (1F1B: as many as the stages;
interleaved: megatron's warm-up count of smaller chunks; with activation checkpointing each block's input and one
block's), and the last
stage's logits and loss. Activations use the DeepSpeed estimate's per-token block figure, split over the tensor
ranks; it is a planning figure, not measured on GPU for this backend yet.
"""

from __future__ import annotations

from slimtrain.trainer.env.memory import (
    GB, LOSS_BYTES_PER_LOGIT, RESERVE, block_activation_bytes_per_token, edge_bytes_per_token, resolve_vocab_size,
)
from slimtrain.trainer.recipe.schema import Recipe


def estimate_text(recipe: Recipe, world_size: int, gpu_gb: float) -> str:
    """A few lines: the layout and the per-GPU bytes of the busiest stage."""
    b, t, cfg = recipe.backend, recipe.train, recipe.model
    tp, pp = b.tensor_parallel, b.pipeline_parallel
    dp = b.data_parallel_size(world_size)
    vocab = resolve_vocab_size(recipe)
    cfg = cfg.model_copy(update={"vocab_size": vocab})
    h = cfg.hidden_size
    per_layer = (cfg.num_params() - vocab * h * (1 if cfg.tie_embeddings else 2) - h) / cfg.num_layers
    layers = cfg.num_layers // pp
    first = (layers * per_layer + vocab * h) / tp
    last = (layers * per_layer + (0 if cfg.tie_embeddings and pp == 1 else vocab * h) + h) / tp
    params = max(first, last)
    w = 2 if b.precision == "bf16" else 4
    masters_and_moments = (4 if b.precision == "bf16" else 0) + 8
    states = params * (w + 4 + masters_and_moments / (dp if b.distributed_optimizer else 1))
    tokens = t.micro_batch_size * recipe.data.seq_len
    chunks, micro = b.virtual_stages or 1, t.grad_accum(dp)
    in_flight = in_flight_chunks(pp, chunks, micro)
    block = block_activation_bytes_per_token(cfg, w) / tp
    chunk_layers = layers // chunks
    # Activation checkpointing keeps each block's input (whole, or 1/tp of it with sequence parallelism) and one block.
    split = tp if b.sequence_parallel else 1
    kept = chunk_layers * w * h / split + block if t.activation_checkpointing else chunk_layers * block
    activations = (kept * in_flight + edge_bytes_per_token(cfg, w) * min(pp, micro)) * tokens
    logits = tokens * vocab / tp * LOSS_BYTES_PER_LOGIT
    total = states + activations + logits + RESERVE
    lines = [
        f"megatron layout: {world_size} GPUs = tensor {tp} x pipeline {pp} x data {dp}; {layers} layers per stage; "
        f"micro-batch {t.micro_batch_size} x {recipe.data.seq_len} tokens, {in_flight} in flight on the first stage"
        + (f" (chunks of {chunk_layers} layers, interleaved x{chunks})" if chunks > 1 else ""),
        f"  parameters   {params / 1e9:8.2f} B per GPU (busiest stage)",
        f"  model states {states / GB:8.1f} GB"
        + (f"  (masters and moments split over {dp} data-parallel ranks)" if b.distributed_optimizer else ""),
        f"  activations  {activations / GB:8.1f} GB",
        f"  logits/loss  {logits / GB:8.1f} GB  (last stage)",
        f"  reserve      {RESERVE / GB:8.1f} GB",
        f"  total        {total / GB:8.1f} GB  of {gpu_gb:g} GB",
    ]
    if total > gpu_gb * GB:
        lines.append("  does not fit: raise tensor_parallel or pipeline_parallel, turn on distributed_optimizer, or "
                     "lower train.micro_batch_size")
    return "\n".join(lines)


def in_flight_chunks(pp: int, chunks: int, micro_batches: int) -> int:
    """Micro-batch activations (of one model chunk each) the first pipeline rank holds at the peak of megatron's
    schedule: its warm-up forwards and one more; 1F1B: as many as the stages; interleaved: 2 (pp - 1) +
    (chunks - 1) pp + 1 chunk forwards, smaller each (megatron-core's warm-up count for rank 0)."""
    if chunks == 1:
        return min(pp, micro_batches)
    return min(2 * (pp - 1) + (chunks - 1) * pp + 1, micro_batches * chunks)
