"""The `backend: {type: megatron}` block of a recipe (importable without megatron-core)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from slimtrain.trainer.recipe.schema import Recipe

# The plugins this backend runs (each checked against the layout below); the others are refused before launch.
PLUGINS = frozenset({"qat"})


class MegatronConfig(BaseModel):
    """megatron-core: tensor, pipeline and data parallelism with its own layers, DDP, optimizer and checkpoints."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: Literal["megatron"] = Field("megatron", description="Backend name.")
    tensor_parallel: int = Field(1, ge=1, description="Ranks that split every projection, the embedding and the head "
                                 "(megatron's column/row-parallel layers); consecutive ranks, within a node.")
    pipeline_parallel: int = Field(1, ge=1, description="Pipeline stages the layers are cut into (equal runs of "
                                   "layers; the embedding on the first, the head and the loss on the last), run by "
                                   "megatron's 1F1B schedule.")
    virtual_stages: int | None = Field(None, ge=1, description="Interleaved pipeline: model chunks per stage (not "
                                       "built yet: null).")
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism within the tensor-parallel "
                                    "group: between the tensor-parallel layers (norms, residual stream) each rank "
                                    "holds 1/tensor_parallel of every row's tokens. Needs tensor_parallel > 1 "
                                    "dividing data.seq_len.")
    expert_parallel: int = Field(1, ge=1, description="Ranks that split the MoE experts (not built yet: 1).")
    distributed_optimizer: bool = Field(False, description="Shard the optimizer state over the data-parallel ranks "
                                        "(megatron's distributed optimizer, ZeRO-1-like).")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="Training precision (master weights stay fp32).")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU.")

    @model_validator(mode="after")
    def _check(self) -> "MegatronConfig":
        unbuilt = {"virtual_stages": (self.virtual_stages, None), "expert_parallel": (self.expert_parallel, 1)}
        for field, (value, off) in unbuilt.items():
            if value != off:
                raise ValueError(f"backend.{field}={value}: the megatron backend runs tensor, pipeline (1F1B) and "
                                 f"data parallelism so far; set backend.{field}={off if off is not None else 'null'} "
                                 "(or use the deepspeed backend)")
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
        return world_size // model_ranks

    def check_recipe(self, recipe: "Recipe") -> None:
        """What megatron's layers cannot split in the model, and what this backend does not run yet."""
        tp, m = self.tensor_parallel, recipe.model
        for field, value in (("model.num_heads", m.num_heads), ("model.num_kv_heads", m.kv_heads),
                             ("model.intermediate_size", m.intermediate_size)):
            if value % tp:
                raise ValueError(f"backend.tensor_parallel={tp} must divide {field}={value} (each rank holds 1/{tp} of "
                                 f"it); choose a tensor_parallel that divides {value}")
        pp = self.pipeline_parallel
        if m.num_layers % pp:
            raise ValueError(f"backend.pipeline_parallel={pp} must divide model.num_layers={m.num_layers} (each stage "
                             f"holds an equal run of layers); choose one of "
                             f"{[d for d in range(1, m.num_layers + 1) if m.num_layers % d == 0]}")
        if pp > 1 and m.tie_embeddings:
            raise ValueError(f"model.tie_embeddings=true with backend.pipeline_parallel={pp}: the embedding (first "
                             "stage) and the head (last stage) would need megatron's shared-embedding sync, not built "
                             "yet; set tie_embeddings=false or pipeline_parallel=1")
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
        if recipe.train.compile or recipe.train.loss_chunk_tokens:
            raise ValueError("train.compile and train.loss_chunk_tokens are not built for the megatron backend yet; "
                             "turn them off or use the deepspeed backend")
