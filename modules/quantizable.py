"""Matrix-multiply weights that are not an `nn.Linear`'s: the seam through which a weight-transforming plugin
(QAT today; pruning or low-rank tomorrow) acts on them without knowing the module that holds them.

A plugin finds `nn.Linear` layers by type and swaps them. A module that multiplies by weights of its own (MoE's
`GroupedExperts`: stacked expert weights [E, N, K] computed by a grouped GEMM) cannot be swapped that way, so it
declares them instead, by implementing `QuantizableWeights`:

    matmul_weights() -> {attribute name: Parameter}   each weight [..., N, K], the input features on the LAST
                                                      axis (as a Linear's [N, K]); leading axes stack matrices
                                                      that are independent Linears (one per expert)
    set_weight_transform(fn | None)                   fn(name, weight) -> weight of the same shape and dtype,
                                                      applied in every forward before the product
    transformed_weight(name) -> Tensor                what the product multiplies by (the transform applied):
                                                      any code computing with the weights calls this

`WeightTransformHost` implements the last two for an `nn.Module`. A transform that is itself an `nn.Module` is
registered as the child `weight_transform`, so its parameters and buffers (e.g. QAT's learned step sizes) belong
to the model: trained, checkpointed and resumed with it.

The converse declaration: a module that owns an `nn.Linear` but never calls it as one (it reads `.weight`
directly, e.g. an MoE router computed in fp32) marks it with `keep_high_precision`: swapping such a Linear
would change nothing in training while its export would change, so a weight-transforming plugin skips it.

A host may later hold only part of each stack (expert parallelism: a rank keeps experts [a, b) of E and builds a
new, smaller module for them). The module that replaces it calls `shard_weight_transform` to carry the installed
transform over; a transform with state per matrix of the stack (QAT's learned step sizes, one set per expert)
implements `ShardableTransform.shard(part, gather)` for that, so the host needs no knowledge of the plugin:

    part                 the matrices of every declared weight's leading axis (dim 0) the new host holds
    gather(local)        collective over the ranks sharing the stack: this rank's [b - a, ...] rows -> the whole
                         [E, ...], in matrix order (what a transform needs to keep state of every matrix in step)
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

WeightTransform = Callable[[str, torch.Tensor], torch.Tensor]
TRANSFORM_CHILD = "weight_transform"
_HIGH_PRECISION_ATTR = "_slimtrain_high_precision"


@runtime_checkable
class QuantizableWeights(Protocol):
    """A module whose matmul weights are its own parameters rather than nn.Linear layers (see module docstring)."""

    def matmul_weights(self) -> dict[str, nn.Parameter]:
        """Attribute name -> weight [..., N, K] (input features last) of every matrix product the module computes."""
        ...

    def set_weight_transform(self, fn: WeightTransform | None) -> None:
        """Apply `fn(name, weight)` to every declared weight before its product (None: the weights as they are)."""
        ...

    def transformed_weight(self, name: str) -> torch.Tensor:
        """The weight `name` as the products use it (the transform applied)."""
        ...


StackGather = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class ShardableTransform(Protocol):
    """A weight transform that can follow its host onto a share of its stacked weights (see module docstring)."""

    def shard(self, part: slice, gather: StackGather) -> WeightTransform:
        """The transform to install on a host holding only matrices `part` of each declared weight's dim 0 (its
        forward then receives those rows only); may return itself. `gather` completes a per-matrix tensor
        computed from the held rows into the whole stack's (a collective: every rank sharing the stack calls it
        at the same point)."""
        ...


class WeightTransformHost:
    """Mixin implementing `set_weight_transform` and `transformed_weight` for an nn.Module (put it before
    nn.Module in the bases); the module implements `matmul_weights` and calls `transformed_weight` in forward."""

    def set_weight_transform(self, fn: WeightTransform | None) -> None:
        """Install `fn` (None removes it). An nn.Module transform becomes the child `weight_transform`."""
        module: nn.Module = self  # type: ignore[assignment]
        module._modules.pop(TRANSFORM_CHILD, None)
        module.__dict__.pop(TRANSFORM_CHILD, None)
        if isinstance(fn, nn.Module):
            module.add_module(TRANSFORM_CHILD, fn)
        else:
            object.__setattr__(module, TRANSFORM_CHILD, fn)

    def transformed_weight(self, name: str) -> torch.Tensor:
        """`getattr(self, name)` through the installed transform."""
        weight = getattr(self, name)
        fn = getattr(self, TRANSFORM_CHILD, None)
        return weight if fn is None else fn(name, weight)


def keep_high_precision(linear: nn.Module, reason: str) -> None:
    """Declare that `linear` is never called as a Linear by its owner (its weight is read directly), so
    weight-transforming plugins must leave it alone; `reason` is shown to a user whose pattern selects it."""
    setattr(linear, _HIGH_PRECISION_ATTR, reason)


def high_precision_reason(module: nn.Module) -> str | None:
    """Why `module` must stay in high precision (`keep_high_precision`), or None."""
    return getattr(module, _HIGH_PRECISION_ATTR, None)


def shard_weight_transform(host: nn.Module, part: slice, gather: StackGather) -> WeightTransform | None:
    """The transform installed on `host`, ready for a new host that holds only matrices `part` of each stacked
    weight (None when none is installed). A `ShardableTransform` shards itself; a plain function, or a module
    without parameters or buffers, acts on whatever rows it is given and is carried over as it is. A module with
    state that cannot shard is refused: its state would no longer match the matrices it is applied to."""
    fn = getattr(host, TRANSFORM_CHILD, None)
    if fn is None:
        return None
    if isinstance(fn, ShardableTransform):
        return fn.shard(part, gather)
    if isinstance(fn, nn.Module) and any(True for _ in [*fn.parameters(), *fn.buffers()]):
        raise ValueError(f"its weight transform {type(fn).__name__} (installed by a plugin) holds parameters or "
                         "buffers but implements no shard(part, gather), so its state cannot follow a share of the "
                         "stacked weights; implement ShardableTransform in that plugin "
                         "(slimtrain.modules.quantizable), leave these weights out of it, or do not shard them "
                         "(e.g. backend.expert_parallel_size=1)")
    return fn
