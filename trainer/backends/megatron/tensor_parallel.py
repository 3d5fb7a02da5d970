"""Tensor parallelism of our `Transformer` through megatron-core's layers, after the plugins applied (torchtitan's
principle: the same model, parallelised by the engine).

Attention's q/k/v and the MLP's gate/up become `ColumnParallelLinear` (output features split), o and down
`RowParallelLinear` (input features split, the output all-reduced), the embedding `VocabParallelEmbedding` and the
head a column-parallel layer whose logits stay split over the vocabulary, for `vocab_parallel_cross_entropy`. The
parameters keep their names (`layers.0.attn.q_proj.weight`, ...) and are marked as slices
(`slimtrain.modules.transformer.sharding`), so that the seed's weights, an import and an export see whole tensors.
Head counts follow from the projections' widths, so the attention needs no change. With `sequence_parallel` in
megatron's config the same layers split the sequence between them (sequence_parallel.py). A Linear the QAT plugin
swapped becomes the same layer fake-quantizing its slice (qat.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimtrain.core.sentinels import IGNORE_INDEX
from slimtrain.modules.expert_parallel import ExpertParallel
from slimtrain.modules.transformer.layers import MLP
from slimtrain.modules.transformer.sharding import Shard, mark_shard as _mark, shard_of
from slimtrain.trainer.backends.megatron.qat import carry_fake_quant, quantized_column, quantized_row
from slimtrain.trainer.backends.megatron.sequence_parallel import split_sequence

_COLUMN = ("q_proj", "k_proj", "v_proj")


def parallelize(model: nn.Module, config: Any, rank: int, size: int) -> None:
    """Swap `model`'s projections, embedding and head for megatron-core's tensor-parallel layers (`size` ranks, this
    one `rank`), in place; `config` is megatron's ModelParallelConfig."""
    if size == 1:
        return
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        for name in _COLUMN:
            setattr(attn, name, column(getattr(attn, name), config, rank, size))
        attn.o_proj = row(attn.o_proj, config, rank, size)
        if isinstance(layer.mlp, ExpertParallel):  # an MoE layer stays whole on every rank: its input is the
            continue  # replicated residual stream, so each rank computes the same (megatron counts it once)
        if type(layer.mlp) is not MLP:
            raise ValueError(f"layers.{i}.mlp is a {type(layer.mlp).__name__} (swapped in by a plugin): the megatron "
                             "backend parallelises the dense MLP only so far; set backend.tensor_parallel=1")
        for name in ("gate_proj", "up_proj"):
            setattr(layer.mlp, name, column(getattr(layer.mlp, name), config, rank, size))
        layer.mlp.down_proj = row(layer.mlp.down_proj, config, rank, size)
    model.embed = embedding(model.embed, config, rank, size)
    model.lm_head = column(model.lm_head, config, rank, size)
    model.tie_weights()
    if config.sequence_parallel:
        split_sequence(model, size)


def _check_plain(module: nn.Module, kind: type) -> None:
    if type(module) is not kind:
        raise ValueError(f"a {type(module).__name__} (swapped in by a plugin) cannot be split by the megatron backend "
                         "yet; set backend.tensor_parallel=1")


def _fake_quant_source(linear: nn.Module) -> Any:
    """The QATLinear `linear` is (its state goes to the parallel layer: qat.py), None for a plain Linear."""
    from slimtrain.modules.qat.linear import QATLinear

    if type(linear) is QATLinear:
        return linear
    _check_plain(linear, nn.Linear)
    return None


def column(linear: nn.Linear, config: Any, rank: int, size: int) -> nn.Module:
    """`linear` as a column-parallel layer (this rank's output features), its outputs left split."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    quantized = _fake_quant_source(linear)

    class ColumnLinear(ColumnParallelLinear):
        init_like_dense = True  # initialise_weights draws it as the nn.Linear it replaces

        def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
            if self.sequence_parallel:  # [b, s/tp, in] in; megatron gathers its dim 0: [b, s, out/tp] out
                return super().forward(x.transpose(0, 1).contiguous(), weight=weight)[0].transpose(0, 1)
            return super().forward(x, weight=weight)[0]

    cls = ColumnLinear if quantized is None else quantized_column(ColumnLinear)
    layer = cls(linear.in_features, linear.out_features, config=config, init_method=_no_init,
                bias=linear.bias is not None, gather_output=False, skip_bias_add=False)
    mark_shard(layer.weight, Shard(0, rank, size, (linear.out_features, linear.in_features)))
    if layer.bias is not None:
        mark_shard(layer.bias, Shard(0, rank, size, (linear.out_features,)))
    if quantized is not None:
        carry_fake_quant(layer, quantized, 0, rank, size, config.sequence_parallel)
    return layer


def row(linear: nn.Linear, config: Any, rank: int, size: int) -> nn.Module:
    """`linear` as a row-parallel layer: this rank's input features in, the whole output (all-reduced) out."""
    from megatron.core.tensor_parallel import RowParallelLinear

    quantized = _fake_quant_source(linear)

    class RowLinear(RowParallelLinear):
        init_like_dense = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.sequence_parallel:  # [b, s, in/tp] in; megatron reduce-scatters its dim 0: [b, s/tp, out] out
                return super().forward(x.transpose(0, 1))[0].transpose(0, 1)
            return super().forward(x)[0]

    cls = RowLinear if quantized is None else quantized_row(RowLinear)
    layer = cls(linear.in_features, linear.out_features, config=config, init_method=_no_init,
                bias=linear.bias is not None, input_is_parallel=True, skip_bias_add=False)
    mark_shard(layer.weight, Shard(1, rank, size, (linear.out_features, linear.in_features)))
    if quantized is not None:
        carry_fake_quant(layer, quantized, 1, rank, size, config.sequence_parallel)
    return layer


def embedding(embed: nn.Embedding, config: Any, rank: int, size: int) -> nn.Module:
    """`embed` split over the vocabulary (rows): each rank looks up its ids, the results all-reduced."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    _check_plain(embed, nn.Embedding)
    if embed.num_embeddings % size:
        raise ValueError(f"model.vocab_size={embed.num_embeddings} does not split over backend.tensor_parallel={size} "
                         f"ranks; use a vocabulary padded to a multiple of {size} (model.vocab_size)")

    class VocabEmbedding(VocabParallelEmbedding):
        init_like_dense = True
        is_embedding = True  # no weight decay, as the nn.Embedding it replaces (trainer.optim)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            out = super().forward(ids)
            # Sequence parallel: megatron reduce-scatters [s, b, h] to this rank's [s/tp, b, h]; ours is [b, s/tp, h].
            return out.transpose(0, 1) if self.reduce_scatter_embeddings else out

    layer = VocabEmbedding(embed.num_embeddings, embed.embedding_dim, init_method=_no_init, config=config,
                           reduce_scatter_embeddings=config.sequence_parallel)
    mark_shard(layer.weight, Shard(0, rank, size, (embed.num_embeddings, embed.embedding_dim)))
    return layer


def mark_shard(param: torch.Tensor, shard: Shard) -> None:
    """Mark `param` as a slice for our model (init, import, export) and for megatron-core (gradient norms and
    clipping count a split tensor on every rank, a whole one once)."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    _mark(param, shard)
    if not getattr(param, "tensor_model_parallel", False):  # megatron marks a column layer's bias itself
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=shard.dim, stride=1)


def _no_init(weight: torch.Tensor) -> None:
    """Megatron's own initialisation is skipped: the model's `init_weights` draws the whole tensors from the seed."""


def vocab_parallel_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed token cross-entropy of logits split over the vocabulary (megatron's `vocab_parallel_cross_entropy`,
    in fp32); IGNORE_INDEX labels count nothing."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    keep = labels != IGNORE_INDEX
    # megatron shifts its input by the row maxima in place: hand it a copy, never the model's logits themselves; a
    # contiguous one, as it views it 2-d (sequence-parallel logits are a transposed view of megatron's [s, b, v]).
    upcast = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    per_token = vocab_parallel_cross_entropy(upcast, labels.masked_fill(~keep, 0))
    return (per_token * keep).sum()


def check_marked(model: nn.Module, size: int) -> None:
    """After the build: every parameter of megatron's split layers still says which slice it holds (a
    materialisation that replaced a parameter would have dropped the marks, and the slices would then be initialised,
    saved and exported as whole tensors)."""
    if size == 1:
        return
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    split = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
    for name, module in model.named_modules():
        if isinstance(module, split):
            for pname, param in module.named_parameters(recurse=False):
                if pname not in ("weight", "bias") or (pname == "bias" and isinstance(module, RowParallelLinear)):
                    continue  # a row layer's bias is whole (added after the reduction)
                if shard_of(param) is None or not getattr(param, "tensor_model_parallel", False):
                    raise RuntimeError(f"{name}.{pname} lost its tensor-parallel marks while the model was built; "
                                       "this is a slimtrain bug: report it with the recipe")
