"""QAT for stacked matmul weights (`slimtrain.modules.quantizable`): MoE's expert weights [E, N, K] and the like.

Every matrix of the stack is quantized exactly as a `QATLinear` would quantize it as its own weight [N, K]: same
formats, scales, estimators, learned steps and export. Where every scale covers part of one row (channel and
group granularities, except NVFP4 whose tensor scale spans the matrix) the stack is one [E*N, K] call, which is
the same arithmetic row by row; a scale over a whole matrix (tensor, block tiles, ternary, NVFP4's tensor scale)
takes one call per matrix, so that no scale spans two experts.

`StackedWeightQAT` is the transform QAT installs with `set_weight_transform`; as an nn.Module it becomes the
child `weight_transform` of the module it quantizes, so its LSQ state is the model's (checkpointed, resumed).

Under expert parallelism the host keeps a share of the experts and the transform follows it (`shard`, the
`ShardableTransform` of `slimtrain.modules.quantizable`): it fake-quantizes the matrices it is given, which are
those of its share, while its LSQ state stays whole ([E, ...] on every rank, the gains replicated like any dense
parameter). DeepSpeed saves buffers from data-parallel rank 0 only, whose module holds expert rank 0's experts,
and keeps per-rank state only for optimized parameters: a step base split over the expert ranks would lose every
other rank's calibration in a checkpoint. Whole, the state is saved, resumed, resharded and exported as without
expert parallelism. A rank computes the steps of its own experts (at init and when fake-quant starts) and
gathers the others' from the expert group, so every rank holds the same values a single process computes; the
gradient of a gain reaches only the held experts' entries, and the data-parallel mean over all ranks (the holders
of an expert among them) is the gradient of all tokens, as for the expert weights. The cost: two values per scale
group of every expert on every rank, 2/group_size of the layer's expert weights (2 x ep/group_size of those the
rank holds).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from slimtrain.modules.quantizable import StackGather

from .config import QATConfig, QuantSpec
from .estimators import fake_quant_lsq, fake_quant_ste, lsq_init_step, lsq_step, weight_qparams
from .linear import use_kernel
from .reference import QParams, fake_quant_reference, to_blocks


def rows_independent(spec: QuantSpec) -> bool:
    """True when no scale of `spec` spans two rows of a weight, so that a stack of matrices quantizes as one."""
    return spec.resolved_granularity in ("channel", "group") and spec.format != "nvfp4"


def map_matrices(w: torch.Tensor, spec: QuantSpec, fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                 extra: torch.Tensor | None = None) -> torch.Tensor:
    """fn(matrix [N, K], its slice of `extra`) over the matrices of `w` [..., N, K], stacked back as
    [..., *fn's output shape]. `extra` (e.g. LSQ steps) has one leading entry per matrix."""
    lead, (n, k) = w.shape[:-2], w.shape[-2:]
    mats = w.reshape(-1, n, k)
    extras = None if extra is None else extra.reshape(mats.shape[0], *extra.shape[len(lead):])
    if rows_independent(spec):
        flat = None if extras is None else extras.reshape(-1, *extras.shape[2:])
        out = fn(mats.reshape(-1, k), flat)
        return out.reshape(*lead, n, *out.shape[1:])
    outs = [fn(mats[e], None if extras is None else extras[e]) for e in range(mats.shape[0])]
    return torch.stack(outs).reshape(*lead, *outs[0].shape)


def linear_step_shape(spec: QuantSpec, n: int, k: int) -> tuple[int, ...]:
    """The shape of a QATLinear's LSQ step for a weight [n, k] (the blocked scale layout)."""
    blocks, _ = to_blocks(torch.empty(n, k, device="meta"), spec)
    return tuple(blocks.shape[:-1])


def stacked_init_step(w: torch.Tensor, spec: QuantSpec, method: str) -> torch.Tensor:
    """The initial LSQ steps of every matrix of `w` [..., N, K]: [..., *linear_step_shape]."""
    return map_matrices(w.detach(), spec, lambda m, _: lsq_init_step(m, spec, method))


class StackedWeightQAT(nn.Module):
    """Fake-quantizes the declared weights of one module; `active` is set by the plugin from the step (off: the
    weights pass unchanged). Under LSQ it holds, per weight `name`, `{name}_step_base` (buffer [..., *step]),
    `{name}_step_gain` (1-D parameter, starts at 1) and `{name}_step_calibrated` (flag), as QATLinear does."""

    def __init__(self, weights: dict[str, nn.Parameter], cfg: QATConfig) -> None:
        super().__init__()
        self.weight_spec: QuantSpec = cfg.weights
        self.estimator, self.lsq_init, self.lsq_lr_scale, self.kernels = (cfg.estimator, cfg.lsq_init,
                                                                          cfg.lsq_lr_scale, cfg.kernels)
        self.shapes = {name: tuple(w.shape) for name, w in weights.items()}  # whole stacks, also once sharded
        # Set by `shard`: the matrices of each stack (dim 0) the host holds, and how to gather the others' rows.
        self.part: slice | None = None
        self._gather: StackGather | None = None
        self.active = False
        self.calibrate_pending: set[str] = set()
        self._starts_calibrated = not cfg.calibrate
        if cfg.estimator == "lsq":
            for name, w in weights.items():
                self._add_lsq_step(name, w)

    def _add_lsq_step(self, name: str, w: torch.Tensor) -> None:
        if w.is_meta:
            step = torch.empty(*w.shape[:-2], *linear_step_shape(self.weight_spec, *w.shape[-2:]), device="meta")
        else:
            step = stacked_init_step(w, self.weight_spec, self.lsq_init)
        self.register_buffer(f"{name}_step_base", step.clone())
        self.register_buffer(f"{name}_step_calibrated",
                             torch.tensor(float(self._starts_calibrated), device=step.device))
        self.register_parameter(f"{name}_step_gain", nn.Parameter(torch.ones(step.numel(), device=step.device)))

    def shard(self, part: slice, gather: StackGather) -> "StackedWeightQAT":
        """From now on the host holds (and the forward receives) matrices `part` of each stack only; the LSQ state
        stays whole (module docstring), `gather` completes the steps computed from them. Returns itself, so the
        plugin's map of its transforms stays valid."""
        if self.part is not None:
            raise ValueError(f"the QAT transform already holds matrices {self.part.start}:{self.part.stop} only")
        for name, shape in self.shapes.items():
            if not 0 <= part.start < part.stop <= shape[0] or part.step not in (None, 1):
                raise ValueError(f"cannot keep matrices {part.start}:{part.stop} of {name} [{shape[0]}, ...]: the "
                                 "share must be a contiguous range of its leading axis")
        self.part, self._gather = part, gather
        return self

    def _whole(self, held: torch.Tensor) -> torch.Tensor:
        """Per-matrix values of the held matrices -> those of the whole stack (the same where nothing is sharded)."""
        return held if self._gather is None else self._gather(held)

    def _held(self, whole: torch.Tensor) -> torch.Tensor:
        """The whole stack's per-matrix values -> those of the held matrices."""
        return whole if self.part is None else whole[self.part]

    @torch.no_grad()
    def _calibrate(self, name: str, w: torch.Tensor) -> None:
        """The steps of weight `name` from `w` (the held matrices), those of the other ranks' matrices gathered."""
        getattr(self, f"{name}_step_base").copy_(self._whole(stacked_init_step(w, self.weight_spec, self.lsq_init)))

    @torch.no_grad()
    def reset_lsq_step(self, weights: dict[str, torch.Tensor], skip: set[str] = frozenset()) -> None:
        """The LSQ state of fresh weights (after a meta build is materialised): steps from `weights` (the host's,
        held matrices only once sharded: collective then), gains 1, the calibration flags; `skip`: weight names
        whose state was imported and stays."""
        if self.estimator != "lsq":
            return
        for name, w in weights.items():
            if name in skip:
                continue
            self._calibrate(name, w)
            getattr(self, f"{name}_step_calibrated").fill_(float(self._starts_calibrated))
            getattr(self, f"{name}_step_gain").fill_(1.0)

    def lsq_step(self, name: str) -> torch.Tensor | None:
        """The learned steps of weight `name` ([..., *step], the whole stack), or None when the estimator is not
        LSQ."""
        if self.estimator != "lsq":
            return None
        return lsq_step(getattr(self, f"{name}_step_base"), getattr(self, f"{name}_step_gain"), self.lsq_lr_scale)

    def forward(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The weight `name` as the products use it: fake-quantized when active, else `w` itself."""
        if not self.active:
            return w
        spec = self.weight_spec
        if self.estimator == "lsq":
            if name in self.calibrate_pending:  # first forward after fake-quant starts: weights are gathered here
                self._calibrate(name, w)  # sharded: collective, as every rank of the group runs this forward
                getattr(self, f"{name}_step_calibrated").fill_(1.0)
                self.calibrate_pending.discard(name)
            step = self._held(self.lsq_step(name))  # a gain's gradient reaches the held experts' entries only
            return map_matrices(w, spec, lambda m, s: fake_quant_lsq(m, spec, s), step)
        clipped, kernel = self.estimator == "clipped_ste", use_kernel(self.kernels, w, spec)
        return map_matrices(w, spec, lambda m, _: fake_quant_ste(m, spec, clipped, kernel))

    def pending_calibration(self) -> set[str]:
        """The weights whose LSQ steps were never calibrated (read once when fake-quant starts)."""
        if self.estimator != "lsq":
            return set()
        return {n for n in self.shapes if not bool(getattr(self, f"{n}_step_calibrated"))}

    @torch.no_grad()
    def export_weight(self, w: torch.Tensor, step: torch.Tensor | None) -> list[tuple[torch.Tensor, QParams]]:
        """Per matrix of `w` [..., N, K] (flattened leading axes): (fake-quantized fp32 weight [N, K], its qparams),
        from checkpoint tensors, exactly as QATLinear.export_weight exports one Linear."""
        n, k = w.shape[-2:]
        mats = w.float().reshape(-1, n, k)
        steps = None if step is None else step.reshape(mats.shape[0], *step.shape[len(w.shape) - 2:])
        out = []
        for e in range(mats.shape[0]):
            qp = weight_qparams(mats[e], self.weight_spec, None if steps is None else steps[e])
            out.append((fake_quant_reference(mats[e], self.weight_spec, qp)[0], qp))
        return out

    def extra_repr(self) -> str:
        held = "" if self.part is None else f", holds {self.part.start}:{self.part.stop}"
        return f"{sorted(self.shapes)}, weights={self.weight_spec.format}, estimator={self.estimator}{held}"
