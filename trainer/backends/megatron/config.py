"""The `backend: {type: megatron}` block of a recipe (importable without megatron-core)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from slimtrain.trainer.recipe.schema import Recipe

# The plugins this backend runs (each checked against the layout below); the others are refused before launch.
PLUGINS = frozenset({"qat", "moe"})


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
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism within the tensor-parallel "
                                    "group: between the tensor-parallel layers (norms, residual stream) each rank "
                                    "holds 1/tensor_parallel of every row's tokens. Needs tensor_parallel > 1 "
                                    "dividing data.seq_len.")
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
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError("backend.sequence_parallel=true splits the sequence over the tensor-parallel group, but "
                             "backend.tensor_parallel=1; raise tensor_parallel or set sequence_parallel=false")
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
        if m.qk_norm and tp > 1 and not self.sequence_parallel:
            raise ValueError(f"model.qk_norm=true with backend.tensor_parallel={tp} needs backend.sequence_parallel="
                             "true: the q/k norms are shared by heads split over the group, and megatron sums their "
                             "gradients over it only with sequence parallelism; set sequence_parallel=true")
        if self.sequence_parallel:
            from slimtrain.trainer.backends.megatron.sequence_parallel import check_recipe

            check_recipe(recipe)
        refused = sorted({p.type for p in recipe.plugins} - PLUGINS)
        if refused:
            raise ValueError(f"plugins {refused} on the megatron backend are not built yet (it runs "
                             f"{sorted(PLUGINS)}); remove them or use the deepspeed backend")
        if any(p.type == "qat" for p in recipe.plugins):
            from slimtrain.trainer.backends.megatron.qat import check_recipe as check_qat

            check_qat(recipe)
        check_experts(self, recipe)


def check_experts(cfg: MegatronConfig, recipe: "Recipe") -> None:
    """The MoE plugin's limits on this backend, and the expert-parallel layout's."""
    if any(p.type == "moe" for p in recipe.plugins) and cfg.pipeline_parallel > 1:
        raise ValueError(f"the moe plugin with backend.pipeline_parallel={cfg.pipeline_parallel}: its balancing "
                         "losses, load metrics and bias updates read every MoE layer's routing on the last stage, "
                         "which holds only its own layers' (the other stages' routers would go unbalanced); set "
                         "backend.pipeline_parallel=1 (use tensor_parallel or expert_parallel instead)")
    if any(p.type == "moe" for p in recipe.plugins) and cfg.sequence_parallel:
        raise ValueError("the moe plugin with backend.sequence_parallel=true: each tensor-parallel rank would route "
                         "its own slice of the tokens through experts it holds whole, whose gradients megatron does not "
                         "sum over the group; set sequence_parallel=false")
    if cfg.expert_parallel > 1:
        from slimtrain.trainer.backends.deepspeed_config import check_expert_layers

        check_expert_layers(recipe, cfg.expert_parallel, field="backend.expert_parallel")
