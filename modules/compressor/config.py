"""The compressor's model side: which encoder, how it pools a context span into vectors, the projector's width.

Everything that can be checked without the decoder fails here, with the field, the value and the fix. What needs
the decoder (a truncation deeper than the decoder, the decoder's width) fails when the modules are built
(`encoder_model_config`, `ContextCompressor`), still before any step.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimtrain.modules.transformer import ModelConfig

DEFAULT_POOLING_FACTOR = 4
"""Pooling factor of mean pooling when neither pooling_factor nor vectors_per_span is given (ARC4)."""


class TruncatedEncoder(BaseModel):
    """The decoder's own architecture cut after its first `layers` layers (ARC-Encoder: Llama-3.2-3B without its
    last 2 layers), with its own token embeddings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["truncate"] = Field(description="Encoder kind.")
    layers: int = Field(description="Encoder layers N: the decoder's first N. 0 keeps only the embeddings (with "
                        "pooled_layers 0 the vectors are then mean-pooled token embeddings, a no-encoder control).")
    init: Literal["decoder", "fresh"] = Field(
        "decoder", description="decoder: the embeddings and the N layers start as copies of the decoder's (ARC: "
        "the encoder starts from the LLM). fresh: drawn like a new model's (the model's init_std).")

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"encoder.layers={value} must be >= 0: the number of the decoder's first layers the "
                             "encoder keeps (e.g. the decoder's num_layers - 2, as ARC-Encoder)")
        return value


class SeparateEncoder(BaseModel):
    """A Llama-style encoder of its own size (fresh weights: plain RoPE, no biases, no q/k norms, whatever the
    decoder's family); it shares only the decoder's vocabulary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["separate"] = Field(description="Encoder kind.")
    hidden_size: int = Field(gt=0, description="Width of the encoder's residual stream (the projector's input).")
    num_layers: int = Field(gt=0, description="Encoder layers.")
    num_heads: int = Field(gt=0, description="Query heads per layer.")
    num_kv_heads: int | None = Field(None, gt=0, description="Key/value heads; null means num_heads.")
    head_dim: int | None = Field(None, gt=0, description="Width of one head; null means hidden_size // num_heads.")
    intermediate_size: int = Field(gt=0, description="Hidden width of the SwiGLU MLP.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    max_seq_len: int = Field(2048, gt=0, description="Longest span (with memory tokens) the encoder takes.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal init (as model.init_std).")

    @model_validator(mode="after")
    def _check_heads(self) -> "SeparateEncoder":
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            divisors = [d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]
            raise ValueError(f"encoder.num_kv_heads={kv} must divide encoder.num_heads={self.num_heads}; choose one "
                             f"of {divisors}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"encoder.hidden_size={self.hidden_size} is not divisible by encoder.num_heads="
                             f"{self.num_heads}; change one of them or set encoder.head_dim")
        if (self.head_dim or self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"encoder head width {self.head_dim or self.hidden_size // self.num_heads} must be even "
                             "for RoPE; set encoder.head_dim to an even value")
        return self

    @property
    def layers(self) -> int:
        return self.num_layers


EncoderSource = Annotated[Union[TruncatedEncoder, SeparateEncoder], Field(discriminator="source")]


class CompressorModelConfig(BaseModel):
    """Encoder, pooling and projector of an ARC-Encoder-style context compressor (plugins.md (a))."""

    model_config = ConfigDict(extra="forbid")

    encoder: EncoderSource = Field(description="The encoder: `source: truncate` (the decoder's first layers) or "
                                   "`source: separate` (its own size).")
    pooling: Literal["mean", "memory"] = Field(
        "mean", description="mean: ARC-Encoder's mean-pooled queries (a span of n tokens gives ceil(n / "
        "pooling_factor) vectors, or vectors_per_span). memory: ICAE's learned memory tokens appended to each span, "
        "read out after the last layer (num_memory_tokens vectors per span).")
    pooling_factor: int | None = Field(
        None, description="Mean pooling: tokens per pooled vector PF (groups of PF consecutive tokens of a span, the "
        f"last one shorter). null: {DEFAULT_POOLING_FACTOR}, unless vectors_per_span is set. 1 keeps every token.")
    vectors_per_span: int | None = Field(
        None, description="Mean pooling: a fixed count K of vectors per span instead of a factor (the span split into "
        "K near-equal groups; a span shorter than K gives one vector per token). Excludes pooling_factor.")
    pooled_layers: int = Field(
        1, description="Mean pooling: how many of the encoder's last layers run pooled queries against the span's "
        "un-pooled keys and values (ARC: 1). With more than 1, the token stream keeps running beside the pooled one, "
        "so each pooled layer reads the tokens at its own depth and the factor stays the total compression. 0 runs "
        "every layer on tokens and mean-pools the last layer's output.")
    num_memory_tokens: int = Field(32, description="Memory pooling: learned memory tokens per span M (the vectors it "
                                   "gives per span; ICAE: 128 for 512-token segments).")
    projector_bottleneck: int | None = Field(
        None, description="Width between the projector's two bias-free linear layers (ARC: 2048 between 3072 and "
        "4096). null: the smaller of the encoder's and the decoder's widths.")
    final_norm: bool = Field(
        True, description="RMSNorm (learned scale, starting at 1) on the encoder's output before the projector. ARC "
        "has none; a truncated decoder's middle layers have no norm of their own after them, and the norm keeps the "
        "projector's input at unit scale whatever the depth. false: ARC's raw residual stream.")

    @field_validator("pooling_factor")
    @classmethod
    def _check_factor(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"pooling_factor={value} must be >= 1 (tokens per compressed vector: 4 or 8 as ARC4/ARC8;"
                             " 1 keeps every token)")
        return value

    @field_validator("vectors_per_span")
    @classmethod
    def _check_count(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"vectors_per_span={value} must be >= 1; or leave it null and set pooling_factor")
        return value

    @field_validator("pooled_layers")
    @classmethod
    def _check_pooled_layers(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"pooled_layers={value} must be >= 0 (1 as ARC-Encoder; 0 pools the encoder's output)")
        return value

    @field_validator("num_memory_tokens")
    @classmethod
    def _check_memory(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"num_memory_tokens={value} must be >= 1 (the vectors per span of memory pooling)")
        return value

    @field_validator("projector_bottleneck")
    @classmethod
    def _check_bottleneck(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"projector_bottleneck={value} must be >= 1, or null for the smaller of the encoder's and "
                             "the decoder's widths")
        return value

    @model_validator(mode="after")
    def _check_pooling(self) -> "CompressorModelConfig":
        # A key of the other pooling would be silently ignored: say so instead. "Given" means "not its default", so
        # that a recipe dumped whole (a checkpoint's recipe.yaml) loads again.
        fields = type(self).model_fields
        given = {k for k in ("pooling_factor", "vectors_per_span", "pooled_layers", "num_memory_tokens")
                 if getattr(self, k) != fields[k].default}
        if self.pooling == "memory":
            stray = [k for k in ("pooling_factor", "vectors_per_span", "pooled_layers") if k in given]
            if stray:
                raise ValueError(f"{stray[0]} applies to pooling 'mean', but pooling is 'memory' (num_memory_tokens "
                                 f"vectors per span); remove {stray[0]} or set pooling: mean")
            return self
        if "num_memory_tokens" in given:
            raise ValueError("num_memory_tokens applies to pooling 'memory', but pooling is 'mean'; remove it or set "
                             "pooling: memory")
        if self.pooling_factor is not None and self.vectors_per_span is not None:
            raise ValueError(f"pooling_factor={self.pooling_factor} and vectors_per_span={self.vectors_per_span} are "
                             "both set; keep one (a factor: vectors grow with the span; a count: fixed per span)")
        if self.pooled_layers > self.encoder.layers:
            raise ValueError(f"pooled_layers={self.pooled_layers} exceeds the encoder's {self.encoder.layers} layers; "
                             f"lower pooled_layers to at most {self.encoder.layers} (0 mean-pools the encoder's "
                             "output)")
        return self

    @property
    def factor(self) -> int | None:
        """The effective pooling factor of mean pooling (None with vectors_per_span or memory pooling)."""
        if self.pooling != "mean" or self.vectors_per_span is not None:
            return None
        return self.pooling_factor if self.pooling_factor is not None else DEFAULT_POOLING_FACTOR


def encoder_model_config(cfg: CompressorModelConfig, decoder: ModelConfig) -> ModelConfig:
    """The encoder's architecture as a `ModelConfig` (its blocks are built from it), given the decoder's.

    A truncated encoder is the decoder's config with `layers` layers (its family's biases, q/k norms and RoPE
    scaling included) and no sliding window; a separate one takes the decoder's vocabulary only. The attention
    backend field is unused: the encoder attends through its own span mask.

    No window, by choice: the encoder attends bidirectionally over whole spans (ARC drops the decoder's causal
    mask too), and spans are short (context_tokens, 64 by default) next to the windows released models slide
    (4096 and up). Keeping the decoder's window would also name layers a truncation cuts off (Qwen's windows are
    on the last layers), which the config refuses when the export is reloaded.
    """
    if decoder.vocab_size is None:
        raise ValueError("the decoder's model.vocab_size is not resolved yet; resolve it from the tokenizer before "
                         "building the compressor (the encoder reads the decoder's tokens)")
    enc = cfg.encoder
    if isinstance(enc, TruncatedEncoder):
        if enc.layers > decoder.num_layers:
            raise ValueError(f"encoder.layers={enc.layers} exceeds the decoder's model.num_layers="
                             f"{decoder.num_layers}; truncate to at most {decoder.num_layers} layers")
        # num_layers >= 1 for ModelConfig; a 0-layer encoder builds no block, so 1 only sizes the (unused) init scale.
        # Validated (not model_copy'd): the export writes it out and `load_compressor` validates it again.
        return ModelConfig.model_validate({**decoder.model_dump(), "num_layers": max(enc.layers, 1),
                                           "sliding_window": None, "sliding_window_layers": None})
    return ModelConfig(vocab_size=decoder.vocab_size, hidden_size=enc.hidden_size,
                       intermediate_size=enc.intermediate_size, num_layers=enc.num_layers, num_heads=enc.num_heads,
                       num_kv_heads=enc.num_kv_heads, head_dim=enc.head_dim, rope_theta=enc.rope_theta,
                       norm_eps=enc.norm_eps, max_seq_len=enc.max_seq_len, init_std=enc.init_std, attention="eager")
