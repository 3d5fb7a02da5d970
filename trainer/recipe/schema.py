"""The recipe schema: every block of a recipe YAML, validated strictly (unknown keys are errors).

Loading, `extends:` and command-line overrides live in `recipe.py`; this file only says what a valid
recipe is. Field descriptions are the recipe reference (`slimtrain validate --reference` prints them).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, model_validator

from slimtrain.data.config import DataConfig
from slimtrain.modules.plugin import PluginConfig
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.transformer.config import ModelConfig

from slimtrain.trainer.backends.deepspeed_config import DeepSpeedConfig
from slimtrain.trainer.backends.registry import validate_backend_config
from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.reproduce.expect import ExpectConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Strict):
    """Where the run writes and how it is seeded."""

    name: str = Field("run", description="Run name, used in output paths and wandb.")
    output_dir: str = Field("runs/{name}", description="Run directory; '{name}' is replaced by run.name.")
    seed: int = Field(0, ge=0, description="Seed for model init, data order and dropout-free RNG streams.")
    local_procs: int = Field(
        1, ge=1, description="Processes to start on this machine when `slimtrain train` is not already "
        "under torchrun or SLURM (e.g. 2 gloo ranks on a laptop CPU)."
    )

    @property
    def resolved_output_dir(self) -> str:
        """output_dir with '{name}' filled in."""
        return self.output_dir.replace("{name}", self.name)


class TrainConfig(_Strict):
    """Length of the run and batch geometry."""

    steps: int = Field(100, gt=0, description="Optimizer steps to train for.")
    global_batch_size: int = Field(8, gt=0, description="Rows (packed sequences) per optimizer step, over all ranks.")
    micro_batch_size: int = Field(2, gt=0, description="Rows per forward/backward on one rank.")
    max_nonfinite_steps: int = Field(
        5, ge=1, description="Consecutive NaN/Inf-loss steps (each skipped and counted) after which the run stops."
    )
    stop_after_minutes: float | None = Field(
        None, gt=0, description="Save a checkpoint and stop cleanly once this process has run for this many minutes "
        "(start-up and data preparation included; each resumed job gets the full time again): e.g. a SLURM "
        "time limit minus the time a checkpoint takes."
    )
    log_every: int = Field(1, gt=0, description="Write a metrics line every this many steps.")
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each decoder block's activations in the backward pass instead of keeping them "
        "(non-reentrant torch.utils.checkpoint): about a third more compute for a fraction of the activation "
        "memory, so longer sequences or larger micro-batches fit.",
    )
    compile: bool = Field(
        False,
        description="Compile each decoder block with torch.compile (regional: one graph, reused by every layer). "
        "Fuses norms, RoPE and the SwiGLU product, and the loss's fp32 cross-entropy (2 bytes per logit at the "
        "peak instead of 12 in bf16); the first steps are slower while it compiles. "
        "DeepSpeed ZeRO 0-2 (ZeRO-3's parameter hooks break the graphs).",
    )
    loss_chunk_tokens: int = Field(
        0,
        ge=0,
        description="Run the output head and the cross-entropy this many tokens at a time, recomputing each "
        "chunk's logits in the backward pass, so the [tokens, vocab] logits are never held whole "
        "(tokens x vocab x 10 bytes in bf16: 9.8 GiB for 8192 tokens of a 128k vocabulary). "
        "Costs one more head matmul (and, under ZeRO-3, a gather of the head per chunk). In bf16 the head's "
        "weight gradient is summed over the chunks in bf16, so keep to a few chunks per micro-batch (e.g. half "
        "or a quarter of its tokens). 0: off; plugins whose losses read the logits need 0.",
    )

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per rank per step; raises RecipeError when the geometry does not divide."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            valid = [g for g in range(per_step, 4 * per_step + 1, per_step)]
            raise RecipeError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.micro_batch_size ({self.micro_batch_size}) x world size ({world_size}) = {per_step}; "
                f"use a multiple of {per_step}, e.g. {valid}"
            )
        return self.global_batch_size // per_step


class ScheduleConfig(_Strict):
    """Learning-rate schedule: linear warmup, then the chosen shape."""

    type: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="cosine: decay to min_lr_ratio; wsd: warmup-stable-decay (linear decay over the "
        "last decay_fraction of steps); constant: flat after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps from 0 to optim.lr.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of optim.lr (cosine, wsd).")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd only: fraction of the run spent decaying.")


class OptimConfig(_Strict):
    """AdamW; norms, biases and embeddings get no weight decay."""

    lr: float = Field(3e-4, ge=0, description="Peak learning rate; 0 trains nothing (a round trip through the "
                      "trainer that must change no weight).")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay on matrices (not norms/biases/embeddings).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; null disables.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Learning-rate schedule.")


class CheckpointConfig(_Strict):
    """Checkpoints: a directory per step, `latest` written atomically after every rank finished."""

    every: int = Field(100, gt=0, description="Save every this many steps (and at the end, and on SIGTERM/SIGUSR1).")
    keep: int = Field(3, ge=1, description="Keep the newest this many complete checkpoints.")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: resume from the newest complete checkpoint in the run directory if any. "
        "never: train from step 0; an earlier run's checkpoints, metrics.jsonl and wandb run id are first moved "
        "into previous_N/ in the run directory. A job SLURM requeued resumes all the same."
    )
    init_from_hf: str | None = Field(
        None, description="Initialise the weights from a local Hugging Face directory (continued pretraining): "
        "LlamaForCausalLM (Llama 2/3.x, SmolLM), MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, or an MoE "
        "export of the moe plugin. For the dense families the model block's sizes and options come from its "
        "config.json (fields the recipe sets must agree). Ignored when resuming."
    )
    branch_from: str | None = Field(
        None, description="Continue another run from one of its checkpoints under this recipe (a run directory: "
        "its newest complete checkpoint; or a step directory): weights, optimizer state, step, schedule "
        "position and, when the data block is unchanged, the data position carry over; the learning rates "
        "follow this recipe. Parameters the checkpoint lacks (a plugin added here, e.g. QAT's step sizes) "
        "start fresh with zero optimizer moments. The model block must be the same. The source is only "
        "read. Ignored once this run has a checkpoint of its own."
    )

    @model_validator(mode="after")
    def _check(self) -> "CheckpointConfig":
        if self.branch_from and self.init_from_hf:
            raise ValueError("checkpoint.branch_from and checkpoint.init_from_hf both set: a branch starts from "
                             "the other run's weights; set one of them")
        return self


class EvalConfig(_Strict):
    """Periodic evaluation on the held-out split."""

    every: int = Field(0, ge=0, description="Evaluate every this many steps; 0 only at the end.")
    batches: int = Field(4, gt=0, description="Micro-batches per rank per evaluation.")


class WandbConfig(_Strict):
    """Weights & Biases logging."""

    enabled: bool = Field(False, description="Log to wandb.")
    project: str = Field("slimtrain", description="wandb project.")
    mode: Literal["auto", "online", "offline"] = Field(
        "auto", description="auto: online when WANDB_API_KEY is set, offline otherwise."
    )


class LoggingConfig(_Strict):
    """Console progress, metrics file, plots and wandb."""

    progress: bool = Field(True, description="Show a progress bar with loss, lr, tokens/s, MFU and ETA (rank 0).")
    plot: bool = Field(True, description="Write loss_curve.png into the run directory at the end.")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="wandb settings.")


# The backend block likewise, by the engine registered under its `type:` (slimtrain.trainer.backends.registry).
BackendSpec = Annotated[
    BaseModel,
    PlainValidator(validate_backend_config),
    PlainSerializer(lambda cfg: cfg.model_dump(mode="json"), return_type=dict),
]

# A plugin block is validated by the config class registered under its `type:` (built-ins and the
# `slimtrain.plugins` entry points), so the schema stays open to plugins this file does not know.
PluginSpec = Annotated[
    PluginConfig,
    PlainValidator(validate_plugin_config),
    PlainSerializer(lambda cfg: cfg.model_dump(mode="json"), return_type=dict),
]


class Recipe(_Strict):
    """A whole run. Every block has defaults except data sources, which a recipe must name."""

    extends: str | None = Field(None, description="A recipe this one is merged over (path relative to this file).")
    run: RunConfig = Field(default_factory=RunConfig, description="Run name, directory, seed.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The decoder.")
    data: DataConfig = Field(description="Sources, tokenizer, packing.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Steps and batch geometry.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and schedule.")
    backend: BackendSpec = Field(
        default_factory=DeepSpeedConfig, description="Distributed engine, chosen by `type:` (deepspeed; see "
        "docs/backends.md). Each engine's own keys follow."
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    plugins: list[PluginSpec] = Field(
        default_factory=list, description="Compression plugins, each chosen by `type:` (e.g. qat; see docs/plugins.md "
        "and docs/qat.md). They compose in their declared order, whatever the order listed here."
    )
    expect: ExpectConfig | None = Field(
        None, description="Results a run of this recipe should reach, each with its source; checked by "
        "`slimtrain reproduce` (docs/reproduce.md). Training ignores it."
    )

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.data.seq_len > self.model.max_seq_len:
            # With buckets, seq_len is the longest bucket: the rows of that bucket would exceed the model's context.
            what = " (the longest bucket of data.packer=buckets)" if self.data.packer == "buckets" else ""
            raise ValueError(
                f"data.seq_len={self.data.seq_len}{what} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "raise model.max_seq_len or lower data.seq_len"
            )
        trained = self.data.tokenizer.train
        if trained is not None and self.model.vocab_size is not None and self.model.vocab_size < trained.vocab_size:
            raise ValueError(
                f"model.vocab_size={self.model.vocab_size} is smaller than the tokenizer's "
                f"data.tokenizer.train.vocab_size={trained.vocab_size}; set model.vocab_size to null (the "
                "tokenizer's size) or to at least that"
            )
        if self.train.micro_batch_size > self.train.global_batch_size:
            raise ValueError(
                f"train.micro_batch_size={self.train.micro_batch_size} exceeds "
                f"train.global_batch_size={self.train.global_batch_size}"
            )
        self.backend.check_recipe(self)
        if self.plugins:
            from slimtrain.modules.plugin_stack import check_plugins

            check_plugins(self.plugins, self.model, self.train.loss_chunk_tokens)
        if self.expect is not None:
            from slimtrain.trainer.reproduce.metric_names import check_expect_metrics

            check_expect_metrics(self.expect, self.plugins)
        return self

    def check_world(self, world_size: int) -> int:
        """Validate what depends on the number of ranks; returns gradient-accumulation steps (per data-parallel
        replica: the engine says how many of the `world_size` ranks are replicas)."""
        return self.train.grad_accum(self.backend.data_parallel_size(world_size))


def load_recipe(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load and validate a recipe file (see `slimtrain.trainer.recipe.loading.load_recipe`)."""
    from slimtrain.trainer.recipe.loading import load_recipe as _load

    return _load(path, overrides)
