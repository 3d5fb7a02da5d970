"""Megatron's sequence parallelism of our `Transformer` within the tensor-parallel group (`backend.sequence_parallel`).

Between the tensor-parallel layers each rank holds 1/tp of every row's tokens: the vocabulary-parallel embedding
reduce-scatters its output over the sequence (instead of all-reducing it), the norms and residual adds run on that
slice, the column-parallel layers (q/k/v, gate/up and the head) all-gather their input over the sequence, the
row-parallel ones (o, down) reduce-scatter their output (megatron's `sequence_parallel=True` in the layers'
ModelParallelConfig; tensor_parallel.py transposes our [batch, seq, hidden] to megatron's [seq, batch, hidden]
around each call). Attention therefore sees whole rows (positions, documents and masks unchanged:
`Transformer.sequence_split`), and the logits cover the whole sequence, split over the vocabulary as without it.

A parameter used on the sequence slice (the norms) or replicated across the heads split over the group (Qwen3's
q/k norms) gets only this rank's part of its gradient: it is marked `sequence_parallel` for megatron's
`finalize_model_grads`, which sums it over the tensor-parallel group (the row layers' biases megatron marks itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config imports this file to check recipes: it stays light
    from torch import nn

    from slimtrain.trainer.recipe.schema import Recipe


def split_sequence(model: "nn.Module", size: int) -> None:
    """Tell `model` that its hidden states hold 1/`size` of every row between the embedding and the head."""
    model.sequence_split = size


def mark_partial_gradients(model: "nn.Module") -> None:
    """Mark every norm weight for megatron's tensor-parallel gradient sum (after the weights are materialised:
    moving a model off the meta device replaces its parameters, and their attributes with them)."""
    from slimtrain.modules.transformer.layers import RMSNorm

    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.sequence_parallel = True


def check_recipe(recipe: "Recipe") -> None:
    """Refuse what megatron's sequence parallelism cannot split, naming the field, its value and a fix."""
    b, data = recipe.backend, recipe.data
    tp = b.tensor_parallel
    if recipe.train.loss_chunk_tokens:
        raise ValueError(f"train.loss_chunk_tokens={recipe.train.loss_chunk_tokens} with backend.sequence_parallel=true: "
                         "the head's input is each rank's slice of the sequence there, which the chunked loss does not "
                         "gather; set train.loss_chunk_tokens=0 (or sequence_parallel=false)")
    lengths = [("data.seq_len", data.seq_len)]
    if data.packer == "buckets":  # every bucket's length is min_len times a power of two
        lengths.append(("data.buckets.min_len", data.buckets.min_len))
    for field, value in lengths:
        if value % tp:
            raise ValueError(f"backend.sequence_parallel=true needs backend.tensor_parallel={tp} to divide {field}="
                             f"{value} (each rank holds 1/{tp} of every row between the layers); make {field} a "
                             f"multiple of {tp} or set sequence_parallel=false")
