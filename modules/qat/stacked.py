"""QAT for stacked matmul weights (`slimtrain.modules.quantizable`): MoE's expert weights [E, N, K] and the like.

Every matrix of the stack is quantized exactly as a `QATLinear` would quantize it as its own weight [N, K]: same
formats, scales, estimators, learned steps and export. Where every scale covers part of one row (channel and
group granularities, except NVFP4 whose tensor scale spans the matrix) the stack is one [E*N, K] call, which is
the same arithmetic row by row; a scale over a whole matrix (tensor, block tiles, ternary, NVFP4's tensor scale)
takes one call per matrix, so that no scale spans two experts.

`StackedWeightQAT` is the transform QAT installs with `set_weight_transform`; as an nn.Module it becomes the
child `weight_transform` of the module it quantizes, so its LSQ state is the model's (checkpointed, resumed).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

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
        self.shapes = {name: tuple(w.shape) for name, w in weights.items()}
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

    @torch.no_grad()
    def reset_lsq_step(self, weights: dict[str, torch.Tensor], skip: set[str] = frozenset()) -> None:
        """The LSQ state of fresh weights (after a meta build is materialised): steps from `weights`, gains 1,
        the calibration flags; `skip`: weight names whose state was imported and stays."""
        if self.estimator != "lsq":
            return
        for name, w in weights.items():
            if name in skip:
                continue
            getattr(self, f"{name}_step_base").copy_(stacked_init_step(w, self.weight_spec, self.lsq_init))
            getattr(self, f"{name}_step_calibrated").fill_(float(self._starts_calibrated))
            getattr(self, f"{name}_step_gain").fill_(1.0)

    def lsq_step(self, name: str) -> torch.Tensor | None:
        """The learned steps of weight `name` ([..., *step]), or None when the estimator is not LSQ."""
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
                with torch.no_grad():
                    getattr(self, f"{name}_step_base").copy_(stacked_init_step(w, spec, self.lsq_init))
                    getattr(self, f"{name}_step_calibrated").fill_(1.0)
                self.calibrate_pending.discard(name)
            return map_matrices(w, spec, lambda m, s: fake_quant_lsq(m, spec, s), self.lsq_step(name))
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
        return f"{sorted(self.shapes)}, weights={self.weight_spec.format}, estimator={self.estimator}"
