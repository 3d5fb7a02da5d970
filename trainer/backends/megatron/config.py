"""The `backend: {type: megatron}` block of a recipe (importable without megatron-core)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from slimtrain.trainer.recipe.schema import Recipe


BUILT_PLUGINS = frozenset({"moe"})  # the plugins this backend runs; the others are refused before launch


class MegatronConfig(BaseModel):
    """megatron-core: tensor, pipeline and data parallelism with its own layers, DDP, optimizer and checkpoints."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: Literal["megatron"] = Field("megatron", description="Backend name.")
    tensor_parallel: int = Field(1, ge=1, description="Ranks that split every projection, the embedding and the head "
                                 "(megatron's column/row-parallel layers); consecutive ranks, within a node.")
    pipeline_parallel: int = Field(1, ge=1, description="Pipeline stages the layers are cut into (equal runs of "
                                   "layers; the embedding on the first, the head and the loss on the last), run by "
                                   "megatron's 1F1B schedule.")
    virtual_stages: int | None = Field(None, ge=1, description="Interleaved pipeline schedule: model chunks per "
                                       "pipeline rank (rank r holds stages r, r + pipeline_parallel, ...), shrinking the "
                                       "pipeline bubble by this factor; needs pipeline_parallel > 1, a layer count "
                                       "divisible by pipeline_parallel x virtual_stages and micro-batches per step in "
                                       "multiples of pipeline_parallel. null: the plain 1F1B schedule.")
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism of the norms and dropout "
                                    "regions within the tensor-parallel group (not built yet: false).")
    expert_parallel: int = Field(1, ge=1, description="Ranks that split every MoE layer's routed experts "
                                 "(megatron's expert-parallel groups: consecutive data-parallel ranks of the same "
                                 "tensor-parallel rank), each holding num_experts / N of them; tokens travel to their "
                                 "experts and back by all-to-all. Divides the data-parallel size and num_experts; "
                                 "needs the moe plugin.")
    distributed_optimizer: bool = Field(False, description="Shard the optimizer state over the data-parallel ranks "
                                        "(megatron's distributed optimizer, ZeRO-1-like).")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="Training precision (master weights stay fp32).")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU.")

    @model_validator(mode="after")
    def _check(self) -> "MegatronConfig":
        if self.virtual_stages is not None and self.virtual_stages > 1 and self.pipeline_parallel == 1:
            raise ValueError(f"backend.virtual_stages={self.virtual_stages} interleaves pipeline stages, but "
                             "backend.pipeline_parallel=1; set pipeline_parallel > 1 or virtual_stages=null")
        unbuilt = {"sequence_parallel": (self.sequence_parallel, False)}
        for field, (value, off) in unbuilt.items():
            if value != off:
                raise ValueError(f"backend.{field}={value}: the megatron backend runs tensor, pipeline (1F1B) and "
                                 f"data parallelism so far; set backend.{field}={off if off is not None else 'null'} "
                                 "(or use the deepspeed backend)")
        return self

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel replicas: world size / (tensor x pipeline); refuses a world the layout does not tile."""
        model_ranks = self.tensor_parallel * self.pipeline_parallel
        if world_size % model_ranks:
            from slimtrain.trainer.errors import RecipeError

            raise RecipeError(f"backend.tensor_parallel x pipeline_parallel = {model_ranks} does not divide the world "
                              f"size {world_size}: launch a multiple of {model_ranks} ranks or change the layout")
        dp, ep = world_size // model_ranks, self.expert_parallel
        if dp % ep:
            from slimtrain.trainer.errors import RecipeError

            raise RecipeError(f"backend.expert_parallel={ep} does not divide the data-parallel size {dp} (world size "
                              f"{world_size} / tensor_parallel x pipeline_parallel = {model_ranks}): megatron's expert "
                              f"groups are data-parallel ranks; launch a multiple of {model_ranks * ep} ranks or set "
                              f"backend.expert_parallel to a divisor of {dp}")
        return dp

    def check_recipe(self, recipe: "Recipe") -> None:
        """What megatron's layers cannot split in the model, and what this backend does not run yet."""
        tp, m = self.tensor_parallel, recipe.model
        for field, value in (("model.num_heads", m.num_heads), ("model.num_kv_heads", m.kv_heads),
                             ("model.intermediate_size", m.intermediate_size)):
            if value % tp:
                raise ValueError(f"backend.tensor_parallel={tp} must divide {field}={value} (each rank holds 1/{tp} of "
                                 f"it); choose a tensor_parallel that divides {value}")
        pp, chunks = self.pipeline_parallel, self.virtual_stages or 1
        if m.num_layers % (pp * chunks):
            what = f"backend.pipeline_parallel={pp}" + (f" x virtual_stages={chunks}" if chunks > 1 else "")
            raise ValueError(f"{what} must divide model.num_layers={m.num_layers} (each stage holds an equal run of "
                             f"layers); choose stage counts among "
                             f"{[d for d in range(1, m.num_layers + 1) if m.num_layers % d == 0]}")
        if m.vocab_size is not None and m.vocab_size % tp:
            raise ValueError(f"backend.tensor_parallel={tp} must divide model.vocab_size={m.vocab_size} (the embedding "
                             f"and the head are split over the vocabulary); pad it to a multiple of {tp}")
        unbuilt = sorted({p.type for p in recipe.plugins} - BUILT_PLUGINS)
        if unbuilt:
            raise ValueError(f"plugins {unbuilt} on the megatron backend are not built yet; use the deepspeed backend")
        check_experts(self, recipe)


def check_experts(cfg: MegatronConfig, recipe: "Recipe") -> None:
    """The MoE plugin's limits on this backend, and the expert-parallel layout's."""
    if any(p.type == "moe" for p in recipe.plugins) and cfg.pipeline_parallel > 1:
        raise ValueError(f"the moe plugin with backend.pipeline_parallel={cfg.pipeline_parallel}: its balancing "
                         "losses, load metrics and bias updates read every MoE layer's routing on the last stage, "
                         "which holds only its own layers' (the other stages' routers would go unbalanced); set "
                         "backend.pipeline_parallel=1 (use tensor_parallel or expert_parallel instead)")
    if cfg.expert_parallel > 1:
        from slimtrain.trainer.backends.deepspeed_config import check_expert_layers

        check_expert_layers(recipe, cfg.expert_parallel, field="backend.expert_parallel")
