"""QATLinear: an nn.Linear whose forward uses fake-quantized weights (and optionally inputs); its state and arithmetic
(`FakeQuantLinear`) are shared with a tensor-parallel backend's layers that hold a slice of the weight.

It shares the replaced layer's weight Parameter, so parameter names, initialisation and the
optimizer's view of the weight are unchanged; under LSQ it adds a learned per-group step, stored as
`weight_step_base` (buffer: the calibrated step) x `weight_step_gain` (1-D parameter, starts at 1, so
no weight decay), plus the `weight_step_calibrated` flag.
The split keeps calibration a buffer write, which survives ZeRO (whose fp32 master copy would
overwrite a direct write into a parameter) and every checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QATConfig, QuantSpec
from .estimators import fake_quant_lsq, fake_quant_ste, lsq_init_step, lsq_step, weight_qparams
from .reference import QParams, fake_quant_reference, to_blocks

KERNEL_FORMATS = {"int", "mxfp4", "nvfp4", "ternary"}


def kernel_supported(spec: QuantSpec, in_features: int | None = None) -> bool:
    """A Triton kernel exists for int groups, MXFP4, NVFP4 (groups) and ternary (per tensor)."""
    if spec.format == "ternary":
        return True
    return spec.format in KERNEL_FORMATS and spec.resolved_granularity in ("group", "token", "channel")


def use_kernel(kernels: str, x: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether to fake-quantize `x` by `spec` with a Triton kernel, under the recipe's `kernels` setting."""
    if kernels == "torch" or not kernel_supported(spec):
        return False
    return kernels == "triton" or x.is_cuda


class FakeQuantLinear:
    """The fake-quant state and arithmetic of a module that multiplies by `self.weight` [out, in] (a mixin, before
    nn.Module in the bases): `QATLinear`, and a tensor-parallel backend's layers that hold a slice of the weight
    with the same slice of the LSQ steps (groups never straddle slices, so each computes what QATLinear computes
    on those rows or columns). `active` is set by the plugin from the step (off = plain product)."""

    def _init_fake_quant(self, cfg: QATConfig, steps_from_weights: bool = True) -> None:
        """Set up after nn.Module's init, `self.weight` in place. `steps_from_weights`: LSQ steps computed from the
        weight now (when it holds values; a backend's layer is built before its weights are drawn: the plugin's
        init_weights sets them)."""
        self.qat_cfg = cfg
        self.weight_spec: QuantSpec = cfg.weights
        self.act_spec: QuantSpec | None = cfg.activations
        self.estimator = cfg.estimator
        self.lsq_init = cfg.lsq_init
        self.lsq_lr_scale = cfg.lsq_lr_scale
        self.kernels = cfg.kernels
        self.active = False
        self.calibrate_pending = False
        if cfg.estimator == "lsq":
            self._add_lsq_step(calibrated=not cfg.calibrate, from_weights=steps_from_weights)

    def _add_lsq_step(self, calibrated: bool, from_weights: bool) -> None:
        w = self.weight
        if w.is_meta or not from_weights:
            blocks, _ = to_blocks(torch.empty(w.shape, device="meta"), self.weight_spec)
            step = torch.empty(blocks.shape[:-1], device=w.device)
        else:
            step = lsq_init_step(w, self.weight_spec, self.lsq_init)
        self.register_buffer("weight_step_base", step.clone())
        # 1 once the base holds the step calibrated when fake-quant started (saved, so a resume never recalibrates)
        self.register_buffer("weight_step_calibrated", torch.tensor(float(calibrated), device=step.device))
        self.weight_step_gain = nn.Parameter(torch.ones(step.numel(), device=step.device))
        self._starts_calibrated = calibrated

    @torch.no_grad()
    def reset_lsq_step(self) -> None:
        """The LSQ state a layer built from the current weights starts with (after a meta build is
        materialised, or weights imported): the step from the weights, gain 1, the calibration flag."""
        if self.estimator != "lsq":
            return
        self.weight_step_base.copy_(lsq_init_step(self.weight, self.weight_spec, self.lsq_init))
        self.weight_step_calibrated.fill_(float(self._starts_calibrated))
        self.weight_step_gain.fill_(1.0)

    @property
    def mixes_tokens(self) -> bool:
        """True when one activation scale spans several tokens (per tensor, per channel, per block, or NVFP4's
        tensor scale): the output for a token then depends on the other tokens of the call."""
        spec = self.act_spec
        if spec is None:
            return False
        return spec.resolved_granularity not in ("token", "group") or spec.format == "nvfp4"

    def lsq_step(self) -> torch.Tensor | None:
        """The learned step (blocked layout), or None when the estimator is not LSQ."""
        if self.estimator != "lsq":
            return None
        return lsq_step(self.weight_step_base, self.weight_step_gain, self.lsq_lr_scale)

    def _use_kernel(self, x: torch.Tensor, spec: QuantSpec) -> bool:
        return use_kernel(self.kernels, x, spec)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight the forward multiplies by (differentiable)."""
        w = self.weight
        if self.estimator == "lsq":
            if self.calibrate_pending:  # first forward after fake-quant starts: weights are gathered here
                with torch.no_grad():
                    self.weight_step_base.copy_(lsq_init_step(w, self.weight_spec, self.lsq_init))
                    self.weight_step_calibrated.fill_(1.0)
                self.calibrate_pending = False
            return fake_quant_lsq(w, self.weight_spec, self.lsq_step())
        return fake_quant_ste(w, self.weight_spec, self.estimator == "clipped_ste", self._use_kernel(w, self.weight_spec))

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` fake-quantized by the activation spec (dynamic scales; `x` itself when activations stay high precision)."""
        if self.act_spec is None:
            return x
        return fake_quant_ste(x, self.act_spec, self.estimator == "clipped_ste", self._use_kernel(x, self.act_spec))

    @torch.no_grad()
    def export_weight(self, w: torch.Tensor, step: torch.Tensor | None) -> tuple[torch.Tensor, QParams]:
        """(fake-quantized fp32 weight, its qparams) from checkpoint tensors: what the forward computed."""
        qp = weight_qparams(w, self.weight_spec, step)
        y, _, _ = fake_quant_reference(w.float(), self.weight_spec, qp)
        return y, qp


class QATLinear(FakeQuantLinear, nn.Linear):
    """Fake-quantizing Linear; `active` is set by the plugin from the step (off = plain Linear)."""

    def __init__(self, base: nn.Linear, cfg: QATConfig) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self._init_fake_quant(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return F.linear(x, self.weight, self.bias)
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights={self.weight_spec.format}, estimator={self.estimator}"
