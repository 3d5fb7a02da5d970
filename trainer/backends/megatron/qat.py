"""The QAT plugin (`modules/qat/`) on megatron's tensor-parallel layers.

The plugin swaps Linears for `QATLinear` before the backend parallelises; `tensor_parallel.py` then builds
megatron's column- or row-parallel layer with the same fake-quant state (`FakeQuantLinear`) over its slice of the
weight: the learned LSQ steps are split like the weight (a column layer holds its rows' steps, a row layer its
columns' groups) and set from the slice, so every group a rank quantizes is one the single-device QATLinear
quantizes, with the same step. The layers keep megatron's own forward: a column layer gets the fake-quantized slice
through `ColumnParallelLinear.forward(weight=)`, a row layer through the matmul of `RowParallelLinear.forward`
(`_forward_impl`, the one seam it offers), both before megatron's collectives; inputs are fake-quantized before the
layer sees them. Names are unchanged (`layers.0.attn.o_proj.weight_step_gain`), and the steps are marked as slices
(`sharding.Shard`), so checkpoints and exports see whole tensors.

That is exact only where no quantization group straddles a slice; `layout_problem` says which settings would,
and `check_recipe` refuses them before launch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from slimtrain.modules.expert_parallel import expert_modules
from slimtrain.modules.transformer.sharding import Shard, mark_shard

if TYPE_CHECKING:
    from slimtrain.modules.qat.config import QuantSpec
    from slimtrain.modules.qat.linear import FakeQuantLinear, QATLinear
    from slimtrain.trainer.recipe.schema import Recipe

ROW_PARALLEL = ("o_proj", "down_proj")  # what parallelize makes row-parallel; every other split Linear is a column


class _MarkedBuffers:
    """Keeps the slice marks of a module's buffers: every conversion (to_empty, .to(dtype)) replaces buffers by new
    tensors, which a parameter's `.data` swap does not."""

    buffer_shards: dict[str, Shard] = {}

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        module = super()._apply(fn, recurse)
        for name, shard in self.buffer_shards.items():
            mark_shard(getattr(self, name), shard)
        return module


def quantized_column(base: type) -> type:
    """`base` (a ColumnParallelLinear taking `weight=`) fake-quantizing its input and its slice of the weight."""
    from slimtrain.modules.qat.linear import FakeQuantLinear

    class QATColumnLinear(_MarkedBuffers, FakeQuantLinear, base):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.active:
                return super().forward(x)
            # Before megatron gathers the input (a sequence slice under sequence parallelism: token-wise scales only)
            return super().forward(self.quantized_input(x), weight=self.quantized_weight())

    return QATColumnLinear


def quantized_row(base: type) -> type:
    """`base` (a RowParallelLinear) fake-quantizing its input slice and its slice of the weight."""
    from slimtrain.modules.qat.linear import FakeQuantLinear

    class QATRowLinear(_MarkedBuffers, FakeQuantLinear, base):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(self.quantized_input(x) if self.active else x)

        def _forward_impl(self, input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            # RowParallelLinear.forward takes no weight: its matmul (before megatron's reduction) gets the quantized one
            return super()._forward_impl(input, self.quantized_weight() if self.active else weight, *args, **kwargs)

    return QATRowLinear


def carry_fake_quant(layer: "FakeQuantLinear", source: "QATLinear", dim: int, rank: int, size: int,
                     sequence_parallel: bool) -> None:
    """Give megatron's `layer` (holding slice `rank` of `size` of `source`'s weight along `dim`: 0 column, 1 row)
    the fake-quant state of `source`, its LSQ steps split alike (set from the weights by the plugin's
    init_weights); refuses a setting whose groups straddle the slices."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    problem = layout_problem(source, dim, size, sequence_parallel)
    if problem is not None:
        raise ValueError(f"QAT {problem}")
    layer._init_fake_quant(source.qat_cfg, steps_from_weights=False)
    if layer.estimator != "lsq":
        return
    base = layer.weight_step_base  # blocked layout: its dim 0 follows the weight's rows, dim 1 its column groups
    whole = list(base.shape)
    whole[dim] *= size
    layer.buffer_shards = {"weight_step_base": Shard(dim, rank, size, tuple(whole))}
    mark_shard(base, layer.buffer_shards["weight_step_base"])
    gains = (base.numel() * size,)  # the gain is the base's layout flattened: a row layer's slice is not contiguous
    mark_shard(layer.weight_step_gain, Shard(dim, rank, size, gains, view=None if dim == 0 else tuple(whole)))
    set_tensor_model_parallel_attributes(layer.weight_step_gain, is_parallel=True, dim=0, stride=1)


def layout_problem(layer: "QATLinear", dim: int, size: int, sequence_parallel: bool, name: str = "") -> str | None:
    """Why fake-quantizing `layer` split over `size` ranks along `dim` (0: output rows, column-parallel; 1: input
    features, row-parallel) would differ from the single-device layer, as '<plugin field>=<value>: why; fix'; None
    when every group lies within one slice."""
    where = f"{name!r}" if name else "the layer"
    kind = "a column-parallel layer" if dim == 0 else "a row-parallel layer"
    local_in = layer.in_features // size if dim == 1 else layer.in_features
    local_out = layer.out_features // size if dim == 0 else layer.out_features
    leaf = name.rsplit(".", 1)[-1] if name else "<layer>"
    fix = f"add '*.{leaf}' to the plugin's exclude (high precision), or set backend.tensor_parallel=1"
    weights = _weight_problem(layer.weight_spec, dim, local_in, local_out, size, where, kind, fix)
    if weights is not None or layer.act_spec is None:
        return weights
    return _activation_problem(layer.act_spec, dim, local_in, size, sequence_parallel, where, kind, fix)


def _weight_problem(spec: "QuantSpec", dim: int, local_in: int, local_out: int, size: int, where: str, kind: str,
                    fix: str) -> str | None:
    from slimtrain.modules.qat.config import WEIGHT_GRANULARITIES

    g, group = spec.resolved_granularity, spec.resolved_group_size
    split = f"backend.tensor_parallel={size} splits the weight of {where} ({kind})"
    fitting = sorted(WEIGHT_GRANULARITIES[spec.format] - {"tensor"} - ({"channel"} if dim == 1 else set()))
    use = f"use granularity {' or '.join(repr(f) for f in fitting)}, or " if fitting else ""
    if spec.format == "nvfp4":
        return (f"weights.format='nvfp4': its fp32 tensor scale spans the whole weight, and {split}; use mxfp4 "
                f"(blocks of 32, no tensor scale), or {fix}")
    if g == "tensor":
        return (f"weights.granularity='tensor' (format {spec.format!r}): one scale spans the whole weight, and "
                f"{split}; {use}{fix}")
    if g == "channel" and dim == 1:
        return (f"weights.granularity='channel': one scale spans each output row, whose input features {split}; "
                f"{use}{fix}")
    if g == "group" and local_in % group:
        return (f"weights.group_size={group} does not divide the {local_in} input features each rank holds of "
                f"{where} ({kind}): groups would straddle the slices; use a group_size dividing {local_in}, or {fix}")
    if g == "block" and (local_in % group or local_out % group):
        return (f"weights.group_size={group}: {group}x{group} tiles do not tile the {local_out}x{local_in} slice "
                f"each rank holds of {where} ({kind}); use a tile edge dividing both, or {fix}")
    return None


def _activation_problem(spec: "QuantSpec", dim: int, local_in: int, size: int, sequence_parallel: bool, where: str,
                        kind: str, fix: str) -> str | None:
    g, group = spec.resolved_granularity, spec.resolved_group_size
    whole_tensor = g == "tensor" or spec.format == "nvfp4"
    if dim == 0:  # the input is whole on every rank, or (sequence parallel) a slice of its tokens
        if whole_tensor and sequence_parallel:
            what = "activations.granularity='tensor'" if g == "tensor" else "activations.format='nvfp4'"
            return (f"{what} with backend.sequence_parallel=true: one scale spans every token of the input of "
                    f"{where}, of which each rank holds 1/{size}; use granularity 'token' or 'group', or set "
                    "sequence_parallel=false")
        return None
    split = f"whose features backend.tensor_parallel={size} splits ({kind}: {local_in} per rank)"
    if whole_tensor or g == "token":
        what = f"activations.granularity={g!r}" if spec.format != "nvfp4" else "activations.format='nvfp4'"
        return (f"{what}: one scale spans all the input features of {where}, {split}; use granularity 'group' "
                f"with a group_size dividing {local_in}, or {fix}")
    if g == "group" and local_in % group:
        return (f"activations.group_size={group} does not divide the {local_in} input features each rank holds of "
                f"{where} ({kind}); use a group_size dividing {local_in}, or {fix}")
    return None


def check_recipe(recipe: "Recipe") -> None:
    """Dry-run the plugins on the recipe's model (meta device) and refuse a QAT setting whose groups would straddle
    the tensor-parallel slices, naming `plugins.<i>.<field>`. A plugin that fails to apply at all is left to the
    plugins' own validation, which names it."""
    from slimtrain.modules.plugin_stack import DRY_RUN_VOCAB, PluginStack
    from slimtrain.modules.qat.linear import QATLinear
    from slimtrain.modules.transformer import Transformer

    b = recipe.backend
    if b.tensor_parallel == 1:
        return
    stack = PluginStack.from_configs(recipe.plugins)
    model_cfg = recipe.model
    if model_cfg.vocab_size is None:
        model_cfg = model_cfg.model_copy(update={"vocab_size": DRY_RUN_VOCAB})
    try:
        model_cfg = stack.configure(model_cfg)
        with torch.device("meta"):
            model = Transformer(model_cfg)
        stack.apply(model)
    except ValueError:
        return
    index = next(i for i, p in enumerate(recipe.plugins) if p.type == "qat")
    whole = [f"{n}." for n, _ in expert_modules(model)]  # the moe layer stays whole on every tensor-parallel rank
    for name, module in model.named_modules():
        if isinstance(module, QATLinear) and not name.startswith(tuple(whole)):
            dim = 1 if name.rsplit(".", 1)[-1] in ROW_PARALLEL else 0
            problem = layout_problem(module, dim, b.tensor_parallel, b.sequence_parallel, name)
            if problem is not None:
                raise ValueError(f"plugins.{index}.{problem}")
