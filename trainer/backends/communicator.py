"""The `Communicator` a backend hands to plugins: torch.distributed collectives over named process groups."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist

from slimtrain.modules.context import ReduceOp

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "mean": dist.ReduceOp.SUM}


class TorchCommunicator:
    """Collectives over the backend's groups; a group mapped to None is the whole world."""

    def __init__(self, groups: Mapping[str, Any]) -> None:
        self.groups = dict(groups)

    def _group(self, name: str) -> Any:
        if name not in self.groups:
            raise KeyError(f"process group {name!r} does not exist in this backend; it has {sorted(self.groups)}")
        return self.groups[name]

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum", group: str = "data") -> torch.Tensor:
        pg = self._group(group)
        dist.all_reduce(tensor, op=_OPS[op], group=pg)
        if op == "mean":
            tensor.div_(dist.get_world_size(pg))
        return tensor

    def size(self, group: str = "data") -> int:
        return dist.get_world_size(self._group(group))

    def rank(self, group: str = "data") -> int:
        return dist.get_rank(self._group(group))

    def all_to_all(self, tensor: torch.Tensor, output_splits: Sequence[int] | None = None,
                   input_splits: Sequence[int] | None = None, group: str = "expert") -> torch.Tensor:
        pg = self._group(group)
        n = dist.get_world_size(pg)
        outs = list(output_splits) if output_splits is not None else [tensor.shape[0] // n] * n
        ins = list(input_splits) if input_splits is not None else [tensor.shape[0] // n] * n
        if len(outs) != n or len(ins) != n or sum(ins) != tensor.shape[0]:
            raise ValueError(f"all_to_all over {n} ranks of {group!r}: splits out {outs} / in {ins} do not fit "
                             f"{tensor.shape[0]} rows")
        return _AllToAll.apply(tensor, outs, ins, pg)


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single with a gradient: the backward is the same exchange with the splits swapped.

    Our own, eager and quiet: torch.distributed.nn.functional.all_to_all_single does the same but is
    deprecated in torch 2.13 (a FutureWarning on every call)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, outs: list[int], ins: list[int], pg: Any) -> torch.Tensor:
        ctx.outs, ctx.ins, ctx.pg = outs, ins, pg
        return _exchange(tensor, outs, ins, pg)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.ins, ctx.outs, ctx.pg), None, None, None


def _exchange(tensor: torch.Tensor, outs: list[int], ins: list[int], pg: Any) -> torch.Tensor:
    out = tensor.new_empty((sum(outs), *tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), output_split_sizes=outs, input_split_sizes=ins, group=pg)
    return out
