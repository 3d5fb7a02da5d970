"""The `qat` plugin's recipe block: what is quantized (weights, optionally activations), how, where and when.

Every unsupported combination fails here, before a model is built, with the field, the value and the fix.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slimtrain.modules.plugin import PluginConfig

Format = Literal["int", "fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp4", "nvfp4", "ternary"]
Granularity = Literal["tensor", "channel", "group", "block", "token"]

# Kept in high precision unless the recipe says otherwise: the output head, MoE routers (tiny; small errors flip
# expert choices) and shared-expert gates (H -> 1; serving engines run them as plain Linears). A default that
# matches nothing (no router in a dense model) is no error, unlike a pattern the recipe writes.
DEFAULT_EXCLUDE = ("lm_head", "*.router", "*.shared.gate")
# Formats whose block size and scale encoding are fixed by their specification.
FIXED_GROUP = {"mxfp8": 32, "mxfp4": 32, "nvfp4": 16}
DEFAULT_GRANULARITY = {"int": "group", "fp8_e4m3": "tensor", "fp8_e5m2": "tensor", "mxfp8": "group",
                       "mxfp4": "group", "nvfp4": "group", "ternary": "tensor"}
WEIGHT_GRANULARITIES = {"int": {"tensor", "channel", "group"}, "fp8_e4m3": {"tensor", "channel", "block"},
                        "fp8_e5m2": {"tensor", "channel", "block"}, "mxfp8": {"group"}, "mxfp4": {"group"},
                        "nvfp4": {"group"}, "ternary": {"tensor"}}
ACTIVATION_GRANULARITIES = {"int": {"tensor", "token", "group"}, "fp8_e4m3": {"tensor", "token", "group"},
                            "fp8_e5m2": {"tensor", "token", "group"}, "mxfp8": {"group"}, "mxfp4": {"group"},
                            "nvfp4": {"group"}}


class QuantSpec(BaseModel):
    """One quantizer: a number format, its scale granularity and (for integers) width and symmetry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Format = Field(
        "int", description="int: integers of `bits` bits; fp8_e4m3/fp8_e5m2: FP8 with an fp32 scale; mxfp8/mxfp4: "
        "OCP Microscaling (blocks of 32, shared E8M0 power-of-two scale, E4M3/E2M1 elements); nvfp4: blocks of 16 "
        "E2M1 values with an E4M3 scale and an fp32 tensor scale; ternary: BitNet b1.58 {-1, 0, 1} x absmean scale.")
    bits: int | None = Field(None, description="format=int only: 2 to 8 bits (default 4 for weights, 8 for activations).")
    symmetric: bool = Field(True, description="format=int only: symmetric grid around 0 (no zero point); false adds a "
                            "zero point per scale (asymmetric min/max).")
    granularity: Granularity | None = Field(
        None, description="What one scale covers. tensor; channel (one per output row of a weight); group "
        "(`group_size` consecutive input features of one row); block (fp8 weights: group_size x group_size tiles); "
        "token (activations: one per row). Default: group for int/mx/nvfp4, tensor for fp8/ternary.")
    group_size: int | None = Field(
        None, gt=0, description="Elements per scale for granularity group (int: 32, 64 or 128, default 32; fixed 32 for "
        "mx formats and 16 for nvfp4) or the tile edge for block (default 128).")

    @model_validator(mode="after")
    def _check(self) -> "QuantSpec":
        f = self.format
        if f == "int" and self.bits is not None and not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits} is not supported for format 'int'; use 2 to 8")
        if f != "int" and self.bits is not None:
            raise ValueError(f"bits={self.bits} is set but format {f!r} fixes its own width; remove `bits` "
                             "(or use format: int)")
        if f != "int" and not self.symmetric:
            raise ValueError(f"symmetric=false is only supported for format 'int'; format {f!r} is symmetric")
        if f in FIXED_GROUP and self.group_size not in (None, FIXED_GROUP[f]):
            raise ValueError(f"format {f!r} uses blocks of {FIXED_GROUP[f]} (its specification); got "
                             f"group_size={self.group_size} — remove group_size, or use format: int for other sizes")
        if self.group_size is not None and self.resolved_granularity not in ("group", "block"):
            raise ValueError(f"group_size={self.group_size} needs granularity group or block, got "
                             f"{self.resolved_granularity!r}")
        return self

    @property
    def resolved_granularity(self) -> str:
        """The granularity with the format's default filled in."""
        return self.granularity or DEFAULT_GRANULARITY[self.format]

    @property
    def resolved_group_size(self) -> int | None:
        """Elements per group (group), tile edge (block), None otherwise."""
        g = self.resolved_granularity
        if g == "group":
            return FIXED_GROUP.get(self.format, self.group_size or 32)
        if g == "block":
            return self.group_size or 128
        return None

    def check_role(self, role: Literal["weights", "activations"], default_bits: int) -> "QuantSpec":
        """This spec with its defaults resolved, or a ValueError when it cannot quantize `role`."""
        allowed = (WEIGHT_GRANULARITIES if role == "weights" else ACTIVATION_GRANULARITIES).get(self.format)
        if allowed is None:
            raise ValueError(f"{role}.format {self.format!r} cannot quantize activations; use int (8 bits, "
                             "granularity token) or an fp8/mx format")
        g = self.resolved_granularity
        if g not in allowed:
            raise ValueError(f"{role}.granularity {g!r} is not supported with format {self.format!r}; choose one "
                             f"of {sorted(allowed)}")
        update = {"granularity": g, "group_size": self.resolved_group_size}
        if self.format == "int":
            update["bits"] = self.bits or default_bits
        return self.model_copy(update=update)


class QATConfig(PluginConfig):
    """Quantization-aware training: fake-quantize the selected Linear layers (and declared matmul weights, such as
    MoE experts) in the forward pass."""

    type: Literal["qat"] = Field(description="Plugin name.")
    weights: QuantSpec = Field(default_factory=QuantSpec, description="Weight quantizer (default int4, groups of 32, "
                               "symmetric).")
    activations: QuantSpec | None = Field(
        None, description="Input-activation quantizer with dynamic (per-forward) scales; null keeps activations in "
        "high precision (weight-only QAT).")
    estimator: Literal["ste", "clipped_ste", "lsq"] = Field(
        "ste", description="Gradient through rounding. ste: identity; clipped_ste: zero where the value was clamped "
        "to the format's range; lsq: learned step size per scale group (int weights, symmetric), gradient-scaled "
        "by 1/sqrt(elements x qmax).")
    include: list[str] = Field(
        default_factory=lambda: ["*"], min_length=1,
        description="Glob patterns (fnmatch) over module paths to quantize: Linear layers (e.g. 'layers.*.mlp.*') and "
        "modules that declare matmul weights of their own (MoE experts: 'layers.*.mlp.experts'); each must match at "
        "least one of them.")
    exclude: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDE),
        description="Glob patterns of module paths kept in high precision (wins over include); each must match a "
        "module, except the defaults. The embedding is never quantized (it is not a Linear); the output head, MoE "
        "routers ('*.router': tiny, and small errors flip expert choices) and shared-expert gates ('*.shared.gate', "
        "H -> 1, plain Linears in serving engines) are excluded by default.")
    start_step: int = Field(0, ge=0, description="Train in full precision for this many steps, then fake-quantize "
                            "from step start_step+1 on.")
    calibrate: bool = Field(
        True, description="lsq: set every learned step from the weights as they are when fake-quant starts "
        "(by lsq_init, per group) instead of from the initial weights.")
    lsq_init: Literal["absmax", "mean"] = Field(
        "absmax", description="lsq: how a step is set from the weights. absmax: max|w|/qmax, the round-to-nearest "
        "grid, so QAT starts exactly at the PTQ model and learns from there; mean: the LSQ paper's "
        "2*mean|w|/sqrt(qmax), about twice as coarse for 4-bit groups of 32 (the quantization error QAT "
        "must first undo).")
    lsq_lr_scale: float = Field(
        1.0, gt=0.0, description="lsq: how much faster than the weights the learned steps move. Adam moves every "
        "parameter by about lr per step whatever its gradient's size, so a step gain near 1 changes by ~lr relative "
        "while a weight of size |w| changes by ~lr/|w|; the step is base x (1 + lsq_lr_scale x (gain - 1)).")
    kernels: Literal["auto", "triton", "torch"] = Field(
        "auto", description="auto: the Triton kernels on CUDA where one exists for the format, PyTorch elsewhere; "
        "torch: always the PyTorch reference; triton: always the kernels (CPU needs TRITON_INTERPRET=1).")

    @model_validator(mode="after")
    def _check(self) -> "QATConfig":
        object.__setattr__(self, "weights", _in_field("weights", lambda: self.weights.check_role("weights", 4)))
        if self.activations is not None:
            object.__setattr__(self, "activations",
                               _in_field("activations", lambda: self.activations.check_role("activations", 8)))
        if self.estimator == "lsq" and (self.weights.format != "int" or not self.weights.symmetric):
            raise ValueError(f"estimator 'lsq' learns the step of a symmetric integer grid; weights are "
                             f"{self.weights.format!r} (symmetric={self.weights.symmetric}) — use ste/clipped_ste, or "
                             "weights.format: int with symmetric: true")
        return self


def _in_field(name: str, fn):
    try:
        return fn()
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith(name) else f"{name}: {msg}") from None
