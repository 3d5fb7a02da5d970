"""The `backend: {type: deepspeed}` block of a recipe (importable without DeepSpeed itself)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from slimtrain.trainer.recipe.schema import Recipe


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DeepSpeedConfig(_Strict):
    """The DeepSpeed engine (CPU with gloo, GPUs with NCCL)."""

    type: Literal["deepspeed"] = Field("deepspeed", description="Backend name.")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 +parameters.")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="Training precision (master weights stay fp32).")
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO 1-3).")
    grad_accum_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Dtype the micro-batches' gradients are summed in. auto: fp32 for bf16 training at "
        "ZeRO-2/3 (DeepSpeed's own default sums bf16 gradients in bf16, which loses precision with every "
        "micro-batch), bf16 at ZeRO-0/1 where DeepSpeed has no working fp32 sum for this model; fp32 for fp32 "
        "training. The reduction across ranks stays in bf16. fp32 sums hold a 4-byte gradient partition "
        "through the backward pass, where bf16 sums hold a 2-byte one (`slimtrain validate` counts it)."
    )
    dist_backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU.")
    raw: dict[str, Any] = Field(
        default_factory=dict, description="Deep-merged into the generated ds_config last (for experts; "
        "keys the recipe already controls are refused)."
    )

    @model_validator(mode="after")
    def _check(self) -> "DeepSpeedConfig":
        owned = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16"}
        clash = sorted(owned & set(self.raw))
        if clash:
            raise ValueError(f"backend.raw sets {clash}, which the recipe controls; set train.*/optim.* instead")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("backend.offload_optimizer=true needs backend.zero_stage >= 1")
        self._check_grad_accum_dtype()
        zero = self.raw.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ValueError(f"backend.raw.zero_optimization must be a mapping of DeepSpeed ZeRO settings, got {zero!r}")
        if "stage" in zero:  # checkpoint layout checks and the memory estimate read backend.zero_stage
            raise ValueError(f"backend.raw.zero_optimization.stage={zero['stage']!r} is set by the recipe; "
                             "use backend.zero_stage instead")
        return self

    def _check_grad_accum_dtype(self) -> None:
        if "grad_accum_dtype" in (self.raw.get("data_types") or {}):
            raise ValueError("backend.raw.data_types.grad_accum_dtype is set by the recipe; "
                             "use backend.grad_accum_dtype (auto, fp32 or bf16) instead")
        if self.grad_accum_dtype == "bf16" and self.precision == "fp32":
            raise ValueError("backend.grad_accum_dtype='bf16' needs backend.precision='bf16'; fp32 training sums its "
                             "gradients in fp32: remove the setting or set it to 'auto'")
        if self.grad_accum_dtype == "fp32" and self.precision == "bf16" and self.zero_stage in (0, 1):
            raise ValueError(
                f"backend.grad_accum_dtype='fp32' with bf16 needs backend.zero_stage 2 or 3, got {self.zero_stage}: "
                "DeepSpeed has no fp32 gradient sum at ZeRO-0, and at ZeRO-1 it clears the bf16 gradients between "
                "micro-batches in a hook that our model's output never triggers, so every micro-batch would add "
                "the earlier ones again; set "
                "backend.zero_stage=2 (same communication volume as ZeRO-1) or backend.grad_accum_dtype='auto'")

    def resolved_grad_accum_dtype(self) -> str:
        """'fp32' or 'bf16': the dtype `auto` stands for under this precision and stage."""
        if self.grad_accum_dtype != "auto":
            return self.grad_accum_dtype
        if self.precision == "fp32" or self.zero_stage in (2, 3):
            return "fp32"
        return "bf16"

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel replicas on `world_size` ranks: every rank is one (ZeRO shards states, not the batch)."""
        return world_size

    def check_recipe(self, recipe: "Recipe") -> None:
        """What this engine refuses in the rest of the recipe (called when the recipe is validated)."""
        if recipe.train.compile and self.zero_stage == 3:
            raise ValueError(
                "train.compile=true with backend.zero_stage=3 is not supported (ZeRO-3 gathers parameters in hooks "
                "that break the compiled graphs); use backend.zero_stage 0, 1 or 2, or set train.compile=false"
            )
