"""Configuration of the Llama-family decoder (the `model:` block of a recipe)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .families import family_errors


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class RopeScaling(BaseModel):
    """RoPE frequency scaling for long contexts, as transformers defines each type (`rope_parameters`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["linear", "dynamic", "yarn", "llama3"] = Field(
        description="linear: positions divided by `factor`; dynamic: NTK-aware base grown when a forward's positions "
        "pass model.max_seq_len; yarn: YaRN's ramp between interpolated and extrapolated frequencies, with its "
        "attention factor; llama3: Llama 3.1's low/high-frequency rule.")
    factor: float = Field(gt=0, description="How many times longer a context the scaling stretches RoPE to.")
    original_max_seq_len: int | None = Field(
        None, gt=0, description="The context length the model was pretrained at (yarn, llama3: required; the HF key "
        "original_max_position_embeddings).")
    low_freq_factor: float = Field(1.0, gt=0, description="llama3: wavelengths above original/low_freq_factor are "
                                   "divided by `factor`.")
    high_freq_factor: float = Field(4.0, gt=0, description="llama3: wavelengths below original/high_freq_factor are "
                                    "kept; those between are interpolated.")
    beta_fast: float = Field(32.0, gt=0, description="yarn: rotations that bound the extrapolated dimensions.")
    beta_slow: float = Field(1.0, gt=0, description="yarn: rotations that bound the interpolated dimensions.")
    attention_factor: float | None = Field(
        None, gt=0, description="yarn: scale of cos and sin; null: 0.1 ln(factor) + 1 (or from mscale/mscale_all_dim).")
    mscale: float | None = Field(None, description="yarn: numerator of the default attention factor (DeepSeek style).")
    mscale_all_dim: float | None = Field(None, description="yarn: denominator of the default attention factor.")
    truncate: bool = Field(True, description="yarn: round the correction range to whole dimensions (transformers' "
                           "default).")

    @model_validator(mode="after")
    def _check_original(self) -> "RopeScaling":
        if self.type in ("yarn", "llama3") and self.original_max_seq_len is None:
            raise ValueError(f"model.rope_scaling.type={self.type!r} needs original_max_seq_len, the context length "
                             "the model was pretrained at (original_max_position_embeddings in config.json)")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"model.rope_scaling.high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor}")
        return self


class ModelConfig(BaseModel):
    """A Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, and the options of the families
    it imports and exports as (Llama 3.x / SmolLM, Mistral, Qwen2/2.5, Qwen3)."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int | None = Field(
        None, gt=0, description="Vocabulary size; null takes the tokenizer's size (recommended)."
    )
    hidden_size: int = Field(256, gt=0, description="Width of the residual stream.")
    intermediate_size: int = Field(688, gt=0, description="Hidden width of the SwiGLU MLP.")
    num_layers: int = Field(4, gt=0, description="Number of decoder layers.")
    num_heads: int = Field(4, gt=0, description="Query heads per layer.")
    num_kv_heads: int | None = Field(
        None, gt=0, description="Key/value heads (grouped-query attention); null means num_heads (MHA)."
    )
    head_dim: int | None = Field(None, gt=0, description="Width of one head; null means hidden_size // num_heads.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    max_seq_len: int = Field(2048, gt=0, description="Longest sequence the model is built for (RoPE cache).")
    tie_embeddings: bool = Field(False, description="Share the input embedding and the output head weights.")
    architecture: Literal["llama", "mistral", "qwen2", "qwen3"] = Field(
        "llama", description="The Hugging Face class the dense model exports as (LlamaForCausalLM, "
        "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM); taken from checkpoint.init_from_hf's config.json "
        "when the recipe imports one. Each class computes only some of the options below (refused otherwise).")
    rope_scaling: RopeScaling | None = Field(None, description="RoPE frequency scaling; null: plain RoPE.")
    qkv_bias: bool = Field(False, description="Biases on the q, k and v projections (Qwen2: always).")
    o_bias: bool = Field(False, description="A bias on the attention output projection (Llama/Qwen3 "
                         "attention_bias sets it with qkv_bias).")
    mlp_bias: bool = Field(False, description="Biases on the MLP projections (Llama's mlp_bias).")
    qk_norm: bool = Field(False, description="RMSNorm over each head of q and k before RoPE (Qwen3: always).")
    sliding_window: int | None = Field(
        None, gt=0, description="Sliding-window attention: a token attends to itself and the window - 1 tokens before "
        "it (transformers' rule); null: full causal attention.")
    sliding_window_layers: list[int] | None = Field(
        None, description="The layers that use the sliding window; null: every layer (Mistral). Qwen2/Qwen3 slide "
        "on the layers from max_window_layers on.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal init; output projections are scaled by 1/sqrt(2*num_layers).")
    attention: Literal["auto", "sdpa", "flex", "varlen", "flash", "eager"] = Field(
        "auto",
        description="Attention backend: auto (on CUDA in bf16/fp16: flash if flash-attn (FA2) is installed, else varlen "
        "on torch>=2.10 and Ampere or newer; "
        "else flex on CUDA; else sdpa), "
        "sdpa (document mask, CPU and GPU), flex (flex-attention block mask, CUDA), "
        "varlen (torch's built-in flash-attention varlen, torch>=2.10, CUDA), "
        "flash (flash-attn or flash-attn-4 varlen, when installed), "
        "eager (plain matmul softmax; the reference the others are tested against).",
    )

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        kv = self.kv_heads
        if self.num_heads % kv:
            raise ValueError(
                f"model.num_kv_heads={kv} must divide model.num_heads={self.num_heads}; "
                f"choose one of {[d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}; "
                "change one of them or set model.head_dim explicitly"
            )
        if self.dim_per_head % 2:
            raise ValueError(f"model.head_dim={self.dim_per_head} must be even for RoPE")
        bad = [i for i in self.sliding_window_layers or () if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"model.sliding_window_layers={self.sliding_window_layers} names layers {bad}, outside "
                             f"0..{self.num_layers - 1}")
        if self.sliding_window_layers is not None and self.sliding_window is None:
            raise ValueError("model.sliding_window_layers is set but model.sliding_window is null; set the window, or "
                             "remove sliding_window_layers")
        wrong = family_errors(self)
        if wrong:
            raise ValueError(f"model.architecture={self.architecture!r} cannot compute this model: " + "; ".join(wrong))
        return self

    def window_of(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer`, None for full attention."""
        if self.sliding_window is None:
            return None
        layers = self.sliding_window_layers
        return self.sliding_window if layers is None or layer in layers else None

    @property
    def kv_heads(self) -> int:
        """Effective number of key/value heads."""
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        """Effective head width."""
        return self.head_dim or self.hidden_size // self.num_heads

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied); needs vocab_size resolved."""
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is not resolved yet (it is taken from the tokenizer)")
        h, d, v = self.hidden_size, self.dim_per_head, self.vocab_size
        attn = h * d * (self.num_heads * 2 + self.kv_heads * 2)
        attn += (self.num_heads + 2 * self.kv_heads) * d * self.qkv_bias + h * self.o_bias + 2 * d * self.qk_norm
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        per_layer = attn + mlp + 2 * h
        emb = v * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def flops_per_token(self, seq_len: int, causal: bool = True) -> float:
        """Training FLOPs per token (6N plus attention), for MFU.

        causal=True counts the attention a causal mask leaves (half of each row): the FLOPs needed when a
        row holds one document. causal=False counts whole rows, PaLM's MFU convention that torchtitan and
        nanoGPT follow: use it to compare with MFU figures published by those (1.15x higher for a 1B model
        at seq 4096). Both count attention over the whole `seq_len`, as those frameworks do with packed rows;
        with a document mask the kernels skip the cross-document blocks, so short packed documents need less
        attention work than counted here (for the 1B model at seq 4096, attention is 15% of the causal count)."""
        n = self.num_params() - (0 if self.tie_embeddings else self.vocab_size * self.hidden_size)
        attn = 12 * self.num_layers * self.num_heads * self.dim_per_head * seq_len / (2 if causal else 1)
        return 6 * n + attn
