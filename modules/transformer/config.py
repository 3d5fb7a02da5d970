"""Configuration of the Llama-family decoder (the `model:` block of a recipe)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """A Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""

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
        return self

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
        mlp = 3 * h * self.intermediate_size
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
