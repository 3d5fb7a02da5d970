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
    expert_parallel_size: int = Field(
        1, ge=1, description="Expert parallelism: the routed experts of every MoE layer are spread over groups of "
        "this many consecutive ranks, each holding num_experts / N of them (tokens travel to their experts and "
        "back by all-to-all); everything else stays a data-parallel replica on every rank, and each expert is "
        "replicated over world size / N ranks. Divides the world size and every MoE layer's num_experts; needs "
        "backend.zero_stage 1 or 2. Checkpoints resume at another size (converted through DeepSpeed's universal "
        "checkpoint) and export whole. 1: every rank holds every expert."
    )
    sequence_parallel: int = Field(
        1, ge=1, description="Sequence parallelism (DeepSpeed-Ulysses): groups of this many consecutive ranks split "
        "each row's sequence, every rank holding 1/N of the tokens (1/N of the heads inside attention, exchanged by "
        "DeepSpeed's all-to-all). The ranks of a group read the same rows; data-parallel replicas are world size / "
        "N. model.num_heads, the key/value heads and data.seq_len must divide by N. 1: off."
    )
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
        self._check_expert_parallel(zero)
        if self.sequence_parallel > 1 and self.expert_parallel_size > 1:
            raise ValueError(f"backend.sequence_parallel={self.sequence_parallel} with backend.expert_parallel_size="
                             f"{self.expert_parallel_size}: the two do not compose on this backend yet; set one of "
                             "them to 1")
        return self

    def _check_expert_parallel(self, zero: dict[str, Any]) -> None:
        ep = self.expert_parallel_size
        if ep == 1:
            return
        if self.zero_stage in (0, 3):
            why = ("DeepSpeed's ZeRO-3 has no expert-parallel partitioning for these layers (it refuses them)"
                   if self.zero_stage == 3 else
                   "at ZeRO-0 DeepSpeed saves only the first expert rank's experts, so a checkpoint would lose the "
                   "others")
            raise ValueError(f"backend.expert_parallel_size={ep} needs backend.zero_stage 1 or 2, got "
                             f"{self.zero_stage}: {why}; set backend.zero_stage=1 (or 2), or "
                             "backend.expert_parallel_size=1")
        for key in ("contiguous_gradients", "reduce_scatter"):
            if zero.get(key, True) is False:  # DeepSpeed asserts both for expert parameters (or warns, ZeRO-1)
                raise ValueError(f"backend.raw.zero_optimization.{key}=false with backend.expert_parallel_size="
                                 f"{ep}: DeepSpeed supports its expert parameters only with {key} on (its other "
                                 f"paths are untested with them); remove backend.raw.zero_optimization.{key} "
                                 "(default true) or set backend.expert_parallel_size=1")

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
        """Data-parallel replicas on `world_size` ranks: every rank is one (ZeRO shards states, not the batch;
        expert parallelism shards experts, not the batch), except that a sequence-parallel group is one replica.
        Refuses a world the expert or sequence groups do not tile."""
        check_expert_world(self.expert_parallel_size, world_size)
        sp = self.sequence_parallel
        if world_size % sp:
            from slimtrain.trainer.errors import RecipeError

            raise RecipeError(f"backend.sequence_parallel={sp} does not divide the world size {world_size}: "
                              f"launch a multiple of {sp} ranks, or choose a sequence_parallel that divides "
                              f"{world_size}")
        return world_size // sp

    def check_recipe(self, recipe: "Recipe") -> None:
        """What this engine refuses in the rest of the recipe (called when the recipe is validated)."""
        if self.expert_parallel_size > 1:
            check_expert_layers(recipe, self.expert_parallel_size)
        if self.sequence_parallel > 1:
            check_sequence_parallel(recipe, self.sequence_parallel)
        if recipe.train.compile and self.zero_stage == 3:
            raise ValueError(
                "train.compile=true with backend.zero_stage=3 is not supported (ZeRO-3 gathers parameters in hooks "
                "that break the compiled graphs); use backend.zero_stage 0, 1 or 2, or set train.compile=false"
            )


def check_expert_world(ep: int, world_size: int) -> None:
    """Refuse a world size that `ep`-rank expert groups do not tile (RecipeError naming both and the fix)."""
    if ep > 1 and world_size % ep:
        from slimtrain.trainer.errors import RecipeError

        fits = [n for n in range(1, world_size + 1) if world_size % n == 0]
        raise RecipeError(f"backend.expert_parallel_size={ep} does not divide the world size {world_size}: the "
                          f"experts are spread over groups of {ep} ranks; set backend.expert_parallel_size to a "
                          f"divisor of {world_size} ({fits}) or run on a multiple of {ep} ranks")


def check_expert_layers(recipe: "Recipe", ep: int, field: str = "backend.expert_parallel_size") -> None:
    """Dry-run the expert sharding on the recipe's model (meta device, nothing allocated): every module with
    experts must shard into `ep` parts, and there must be one. Errors name the plugin (`plugins.<i>`).
    A plugin that fails to apply at all is left to the plugins' own validation, which names it. `field` is the
    recipe field that sets `ep` (each backend names it its own way)."""
    import torch

    from slimtrain.modules.context import LocalCommunicator
    from slimtrain.modules.expert_parallel import expert_modules
    from slimtrain.modules.plugin_stack import DRY_RUN_VOCAB, PluginStack
    from slimtrain.modules.transformer import Transformer

    index = {id(cfg): i for i, cfg in enumerate(recipe.plugins)}
    stack = PluginStack.from_configs(recipe.plugins)
    model_cfg = recipe.model
    if model_cfg.vocab_size is None:
        model_cfg = model_cfg.model_copy(update={"vocab_size": DRY_RUN_VOCAB})
    owner: dict[int, int] = {}  # module -> the plugin whose apply created it
    try:
        model_cfg = stack.configure(model_cfg)
        with torch.device("meta"):
            model = Transformer(model_cfg)
        for plugin in stack:
            plugin.apply(model)
            for _, module in expert_modules(model):
                owner.setdefault(id(module), index[id(plugin.cfg)])
    except ValueError:
        return  # the plugins' validation reports it, naming the plugin
    found = expert_modules(model)
    if not found:
        raise ValueError(f"{field}={ep} but the model has no layer with experts to spread "
                         "over ranks (no plugin adds them); add an MoE plugin (plugins: [{type: moe, ...}]) or set "
                         f"{field}=1")
    for name, module in found:
        where = f"plugins.{owner[id(module)]}" if id(module) in owner else name
        experts = module.num_experts
        if experts % ep:
            fits = [n for n in range(1, experts + 1) if experts % n == 0]
            raise ValueError(f"{where}.num_experts={experts} is not divisible by {field}={ep} "
                             f"(layer {name}): each rank of an expert group holds an equal share of the experts; "
                             f"set {field} to a divisor of {experts} ({fits}) or "
                             f"{where}.num_experts to a multiple of {ep}")
        try:
            module.shard_experts(LocalCommunicator(), "expert", 0, ep)
        except ValueError as exc:
            raise ValueError(f"{field}={ep}: {where} ({name}): {exc}") from None


# Plugins whose layers see whole sequences (a draft head reads the next tokens, a compressor whole spans): a slice of
# the sequence would cut what they read.
_WHOLE_SEQUENCE_PLUGINS = {"draft": "its heads read tokens ahead of each position, across the slice boundary",
                           "compressor": "its spans and examples are cut from whole rows"}


def check_sequence_parallel(recipe: "Recipe", sp: int) -> None:
    """Refuse what sequence parallelism over `sp` ranks cannot split: heads, the sequence, some plugins."""
    m = recipe.model
    for field, value in (("model.num_heads", m.num_heads), ("model.num_kv_heads", m.kv_heads),
                         ("data.seq_len", recipe.data.seq_len)):
        if value % sp:
            choices = [d for d in range(1, value + 1) if value % d == 0 and d > 1][:8]
            raise ValueError(f"backend.sequence_parallel={sp} must divide {field}={value} (each rank takes 1/{sp} of "
                             f"the {'sequence' if field == 'data.seq_len' else 'heads'}); choose one of {choices} "
                             f"or change {field}")
    if recipe.data.packer == "buckets" and recipe.data.buckets.min_len % sp:
        raise ValueError(f"backend.sequence_parallel={sp} must divide data.buckets.min_len="
                         f"{recipe.data.buckets.min_len} (every bucket's rows are split {sp} ways); raise min_len to a "
                         f"multiple of {sp}")
    for spec in recipe.plugins:
        why = _WHOLE_SEQUENCE_PLUGINS.get(spec.type)
        if why:
            raise ValueError(f"plugins: {spec.type!r} cannot run with backend.sequence_parallel={sp}: {why}; set "
                             "backend.sequence_parallel=1 or remove the plugin")
        if spec.type == "moe" and getattr(spec, "seq_aux_loss_weight", 0):
            raise ValueError(f"plugins: moe.seq_aux_loss_weight with backend.sequence_parallel={sp}: the "
                             "per-sequence balance loss needs whole rows; use aux_loss_weight or "
                             "global_aux_loss_weight, or set backend.sequence_parallel=1")
    if recipe.train.compile:
        raise ValueError(f"train.compile=true with backend.sequence_parallel={sp} is not supported (DeepSpeed's "
                         "all-to-all inside compiled blocks is untested here); set train.compile=false")
