"""Will it fit? A per-GPU memory estimate of a recipe, before anything is queued or started.

The parts, each from where it is known best:
- model states (parameters, gradients, optimizer): the byte counts of DeepSpeed's own ZeRO estimators
  (`estimate_zero2/3_model_states_mem_needs`), extended to stages 0/1 and fp32 in the same terms;
- activations kept for the backward pass: the tensors our decoder block saves, per token (a test checks
  the formula against the block's saved tensors, tensor by tensor), assuming a fused attention kernel
  (flash, flex or SDPA: no [seq x seq] scores are kept), plus the embedding output, the final norm and one
  block's backward temporaries;
- the loss: its fp32 log-softmax and the two fp32 gradients of its backward, for every token of the
  micro-batch, or for one chunk of `train.loss_chunk_tokens`;
- DeepSpeed's gradient bucket (`reduce_bucket_size` elements).
With expert parallelism (`backend.expert_parallel_size` N) a rank holds 1/N of the routed experts' weights (and,
at ZeRO-1, of their gradients); their ZeRO-partitioned fp32 state is 1/world of them either way (a rank's share
of the experts over its expert-data group of world/N ranks). The expert parameters are counted on the recipe's
model built on the meta device (`ExpertParallel.expert_parameters`), so no memory is spent.
The peak is the larger of two moments: the backward pass (activations, loss and bucket live; under
ZeRO-0/1/2 in bf16 the fp32 gradients do not exist yet) and the optimizer step (all model
states, no activations). Measured on one H100 for the 1B recipe, the backward figure was 0.5 % above the
allocator's peak (`benchmarks/memory.py`). The CUDA context, fragmentation and NCCL buffers come on top
(`reserve`).
"""

from __future__ import annotations

from dataclasses import dataclass

from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig
from slimtrain.trainer.backends.deepspeed import DEEPSPEED_REDUCE_BUCKET, ds_config, fit_gradient_bucket
from slimtrain.trainer.recipe.schema import Recipe
from slimtrain.trainer.errors import RecipeError

GB = 1024**3
RESERVE = 2 * GB  # CUDA context, NCCL buffers, allocator slack
LOSS_BYTES_PER_LOGIT = 12  # fp32: saved log-softmax, NLL gradient, log-softmax gradient (measured at the peak)
# train.compile fuses the loss (slimtrain.trainer.loss.cross_entropy): only the logits' gradient, in the compute
# dtype, is added to the logits at the peak (measured on CPU: 2.0 B/logit in bf16 against 12.0 eager).


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU."""

    params: int
    largest_layer: int
    model_states: float
    activations: float
    logits: float
    buckets: float = 0.0
    step_only: float = 0.0  # part of `model_states` that exists only during the optimizer step
    reserve: float = RESERVE
    expert_params: int = 0  # of `params`: the routed experts' weights, spread over `expert_parallel` ranks
    expert_parallel: int = 1

    @property
    def held_params(self) -> int:
        """The parameters one GPU holds whole: all but the other expert ranks' experts."""
        return self.params - self.expert_params + self.expert_params // self.expert_parallel

    @property
    def backward_peak(self) -> float:
        return self.model_states - self.step_only + self.buckets + self.activations + self.logits

    @property
    def total(self) -> float:
        return max(self.model_states, self.backward_peak) + self.reserve


def model_state_bytes(params: int, largest_layer: int, zero_stage: int, precision: str, world: int,
                      offload_optimizer: bool = False, fp32_grad_sums: bool = False, held: int | None = None) -> float:
    """Parameters, gradients and AdamW state per GPU, in the terms of DeepSpeed's estimators.

    bf16: 2-byte parameters and gradients plus 16 bytes of fp32 state per parameter (master weights 4,
    gradients 4, Adam moments 8); fp32: 4-byte parameters and gradients plus 8 bytes of Adam moments.
    ZeRO partitions over the GPUs: stage 1 the fp32 state, stage 2 also the gradients, stage 3 also the
    parameters, with the largest layer gathered whole (its parameters and gradients). Offloading keeps
    the fp32 state (and, from stage 2, the gradients) in CPU memory. Stage 2 equals DeepSpeed's
    `estimate_zero2_model_states_mem_needs`; stage 3 is 2 bytes a parameter over `world` above
    `estimate_zero3_model_states_mem_needs`, which leaves out the bf16 parameter partition itself.
    fp32_grad_sums (bf16 at ZeRO-2/3, `backend.grad_accum_dtype`): ZeRO-2 sums the micro-batches' gradients
    straight into the fp32 partition the step uses, so no bf16 one is kept; ZeRO-3 keeps its gradient
    partition in fp32 instead of bf16 and still copies it for the step.
    held (expert parallelism, ZeRO-1/2): the parameters a GPU holds whole, `params` less the other expert ranks'
    experts; what stages 0-2 keep unpartitioned (the parameters, and at ZeRO-0/1 the gradients) counts these,
    the partitions all `params` over `world` (None: every parameter is held).
    """
    n = max(world, 1)
    held = params if held is None else held
    w = 2 if precision == "bf16" else 4  # bytes of a parameter and of a gradient
    state = 0.0 if offload_optimizer else (16.0 if precision == "bf16" else 8.0)
    fp32_sums = fp32_grad_sums and precision == "bf16"
    if zero_stage == 3:
        grads = 0 if offload_optimizer else (4 if fp32_sums else w)
        return 2 * w * largest_layer + (w + grads + state) * params / n
    if zero_stage == 2:
        grads = 0 if offload_optimizer or fp32_sums else w
        return w * held + (grads + state) * params / n
    if zero_stage == 1:
        return 2 * w * held + state * params / n
    return 2 * w * held + state * params


def block_activation_bytes_per_token(cfg: ModelConfig, compute_bytes: int) -> float:
    """Bytes one decoder block keeps for its backward pass, per token (see the module docstring)."""
    w, h, i = compute_bytes, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.dim_per_head, cfg.kv_heads * cfg.dim_per_head
    norms = 2 * (4 * h + 4 + w * h)  # fp32 input and rsqrt, normalised input (twice)
    attention = w * h + w * q + 2 * w * kv + w * q + 4 * cfg.num_heads  # input, q, k, v, output, logsumexp
    mlp = w * h + 4 * w * i  # input; gate, up, silu(gate), product
    return norms + attention + mlp


def resolve_vocab_size(recipe: Recipe) -> int:
    """model.vocab_size, else the size the tokenizer will give it (trained: its target size; a local one: loaded)."""
    if recipe.model.vocab_size:
        return recipe.model.vocab_size
    tok = recipe.data.tokenizer
    if tok.train is not None:
        return tok.train.vocab_size
    if tok.path is not None and tok.path.exists():
        from slimtrain.data.tokenizer import tokenizer_size

        return tokenizer_size(tok.path)
    raise RecipeError(
        f"model.vocab_size is null and data.tokenizer.path={str(tok.path)!r} is not on this machine; "
        "add model.vocab_size=N (the tokenizer's size) to estimate the memory"
    )


def edge_bytes_per_token(cfg: ModelConfig, compute_bytes: int) -> float:
    """Per token, outside the blocks' saved tensors: the embedding output and the final norm (fp32 input,
    rsqrt, normalised output), plus one block's backward temporaries (the MLP's gradients of width
    `intermediate_size`, measured at about 2.5 of them)."""
    w, h = compute_bytes, cfg.hidden_size
    return (4 + 3 * w) * h + 4 + 2.5 * w * cfg.intermediate_size


def _zero_block(recipe: Recipe, params: int) -> tuple[dict, bool]:
    """The `zero_optimization` block the backend will hand DeepSpeed (generated, `backend.raw` merged, bucket
    fitted to the model), and whether gradients accumulate in fp32 (`data_types.grad_accum_dtype`)."""
    smallest_world = getattr(recipe.backend, "sequence_parallel", 1)  # one data-parallel replica
    config = fit_gradient_bucket(ds_config(recipe.backend, recipe.train, recipe.optim, smallest_world), params)
    fp32_accum = (config.get("data_types") or {}).get("grad_accum_dtype") in ("fp32", "float32")
    return config["zero_optimization"], fp32_accum


def gradient_bucket_bytes(recipe: Recipe, params: int) -> float:
    """DeepSpeed's gradient bucket: `reduce_bucket_size` elements of the block the backend uses, in the
    parameters' dtype (also with fp32 sums at ZeRO-2/3, which add into the fp32 partition); ZeRO-1/2 hold it from the first gradient of a step to its end (two with
    `overlap_comm`, none without `contiguous_gradients`), ZeRO-3 for the whole run. DeepSpeed's model-state
    estimators leave it out."""
    stage = recipe.backend.zero_stage
    zo, _ = _zero_block(recipe, params)
    if stage == 0 or (stage in (1, 2) and zo.get("contiguous_gradients") is False):
        return 0.0
    w = 4 if recipe.backend.precision == "fp32" else 2
    copies = 2 if stage in (1, 2) and zo.get("overlap_comm") else 1
    return float(zo.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET)) * w * copies


def step_only_bytes(recipe: Recipe, params: int, world_size: int) -> float:
    """Model-state bytes that exist only during the optimizer step: in bf16 with bf16 gradient accumulation
    (DeepSpeed's default), ZeRO-0 and ZeRO-1/2 build the fp32 gradients (ZeRO-1/2: their partition) from the
    bf16 ones at the step. ZeRO-3 and offloading: none counted."""
    b = recipe.backend
    if b.precision != "bf16" or b.offload_optimizer or b.zero_stage == 3 or _zero_block(recipe, params)[1]:
        return 0.0
    return 4.0 * params / (max(world_size, 1) if b.zero_stage else 1)


def expert_parameter_count(plugins: PluginStack, cfg: ModelConfig) -> int:
    """The parameters of the model's routed experts (every `ExpertParallel` module's expert tensors, whole),
    counted on its skeleton on the meta device."""
    from slimtrain.modules.expert_parallel import expert_parameter_counts

    model = plugins.skeleton(cfg)
    names = expert_parameter_counts(model)
    return sum(p.numel() for name, p in model.named_parameters() if name in names)


def estimate(recipe: Recipe, world_size: int, vocab_size: int) -> MemoryEstimate:
    """The per-GPU estimate of `recipe` on `world_size` GPUs."""
    plugins = PluginStack.from_configs(recipe.plugins)
    cfg = plugins.configure(recipe.model.model_copy(update={"vocab_size": vocab_size}))
    train, backend = recipe.train, recipe.backend
    w = 2 if backend.precision == "bf16" else 4
    params = plugins.counts(cfg, recipe.data.seq_len).total_params  # what the plugins add is stored too
    ep = getattr(backend, "expert_parallel_size", 1)  # a backend without expert parallelism has no such field
    experts = expert_parameter_count(plugins, cfg) if ep > 1 else 0
    held = params - experts + experts // ep
    largest = max(vocab_size * cfg.hidden_size, 3 * cfg.hidden_size * cfg.intermediate_size)
    # Under sequence parallelism a rank holds 1/N of each row's tokens (inside attention: 1/N of the heads over the
    # whole row, the same bytes), and its loss covers only those.
    tokens = train.micro_batch_size * recipe.data.seq_len // getattr(backend, "sequence_parallel", 1)
    per_layer = block_activation_bytes_per_token(cfg, w) * tokens
    if train.activation_checkpointing:  # every block's input, plus one block recomputed at a time
        activations = cfg.num_layers * w * cfg.hidden_size * tokens + per_layer
    else:
        activations = cfg.num_layers * per_layer
    activations += edge_bytes_per_token(cfg, w) * tokens
    chunk = min(tokens, train.loss_chunk_tokens) if train.loss_chunk_tokens else tokens
    logits = chunk * vocab_size * (w if train.compile else LOSS_BYTES_PER_LOGIT)
    states = model_state_bytes(params, largest, backend.zero_stage, backend.precision, world_size,
                               backend.offload_optimizer, _zero_block(recipe, params)[1], held)
    return MemoryEstimate(params, largest, states, activations, logits, gradient_bucket_bytes(recipe, params),
                          step_only_bytes(recipe, params, world_size), expert_params=experts, expert_parallel=ep)


def format_estimate(e: MemoryEstimate, recipe: Recipe, world_size: int, gpu_gb: float) -> str:
    """A few lines for `slimtrain validate`: the parts, the total, and what to change when it does not fit."""
    t, b = recipe.train, recipe.backend
    lines = [
        f"memory per GPU (estimate): {world_size} GPUs, ZeRO-{b.zero_stage}, {b.precision}, micro-batch "
        f"{t.micro_batch_size} x {recipe.data.seq_len} tokens, activation checkpointing "
        f"{'on' if t.activation_checkpointing else 'off'}"
        + (f", loss in chunks of {t.loss_chunk_tokens} tokens" if t.loss_chunk_tokens else "")
        + (f", sequence parallel {sp} ({recipe.data.seq_len // sp} tokens of each row per GPU)"
           if (sp := getattr(b, "sequence_parallel", 1)) > 1 else ""),
        f"  parameters   {e.params / 1e9:8.2f} B  (largest layer {e.largest_layer / 1e6:.0f} M)",
        *([f"  experts      {e.expert_params / 1e9:8.2f} B  of them, spread over {e.expert_parallel} ranks: "
           f"{e.held_params / 1e9:.2f} B held per GPU (backend.expert_parallel_size)"]
          if e.expert_parallel > 1 else []),
        f"  model states {e.model_states / GB:8.1f} GB"
        + (f"  (of which {e.step_only / GB:.1f} GB only during the optimizer step)" if e.step_only else ""),
        f"  activations  {e.activations / GB:8.1f} GB",
        f"  logits/loss  {e.logits / GB:8.1f} GB",
        *([f"  grad bucket  {e.buckets / GB:8.1f} GB  (DeepSpeed reduce_bucket_size)"] if e.buckets else []),
        f"  reserve      {e.reserve / GB:8.1f} GB  (CUDA context, NCCL, allocator)",
        f"  total        {e.total / GB:8.1f} GB  of {gpu_gb:g} GB  (peak "
        f"{'in the backward pass' if e.backward_peak >= e.model_states else 'at the optimizer step'})",
    ]
    if e.total > gpu_gb * GB:
        fixes = []
        if not t.activation_checkpointing:
            fixes.append("train.activation_checkpointing=true")
        tokens = t.micro_batch_size * recipe.data.seq_len
        if not t.loss_chunk_tokens and e.logits > GB and tokens >= 2048:
            fixes.append(f"train.loss_chunk_tokens={min(4096, tokens // 2)}")
        if b.zero_stage < 3:
            fixes.append(f"backend.zero_stage={b.zero_stage + 1}")
        if t.micro_batch_size > 1:
            fixes.append(f"train.micro_batch_size={t.micro_batch_size // 2} (accumulation keeps the global batch)")
        if not b.offload_optimizer and b.zero_stage > 0:
            fixes.append("backend.offload_optimizer=true")
        lines.append(f"  does not fit in {gpu_gb:g} GB: try " + ", or ".join(fixes or ["more GPUs"]))
    return "\n".join(lines)
