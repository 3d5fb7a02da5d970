"""The `Communicator` a backend hands to plugins: torch.distributed collectives over named process groups."""

from __future__ import annotations

from typing import Any, Mapping

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
