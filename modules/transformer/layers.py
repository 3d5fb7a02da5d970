"""The decoder's building blocks: RMSNorm, grouped-query attention, SwiGLU MLP, the pre-norm block.

Every projection is a plain `nn.Linear` (biased where the config asks: Qwen2's q/k/v), reachable by module path
(`layers.{i}.attn.q_proj`, `layers.{i}.mlp.down_proj`, ...), so plugins and parallel backends can
swap them after the model is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import BoundAttention
from .config import ModelConfig
from .rope import apply_rope

Aux = dict[str, torch.Tensor]
BlockOutput = tuple[torch.Tensor, Aux]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32, then back to the input dtype before the scale: the order HF Llama
        # uses, so that bf16 outputs match a checkpoint loaded there.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; the kernel is the `attend` bound for this forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.dim_per_head
        q_width, kv_width = cfg.num_heads * self.head_dim, cfg.kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_width, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: one RMSNorm over head_dim, shared by every head, before RoPE
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: BoundAttention) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # Head counts come from the projections' widths (-1), not the config, so that a
        # tensor-parallel backend that shards the projections needs no change here; the sequence length from
        # their outputs, not x: under megatron's sequence parallelism x is this rank's slice of the sequence and
        # the projections gather the whole of it.
        b, s = q.shape[:2]
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        out = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return self.o_proj(out.reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def replicate_mlp(mlp: nn.Module, cfg: ModelConfig) -> nn.Module:
    """A new, uninitialised MLP of `mlp`'s kind, for a block built beside the model's layers (an MTP block takes
    the kind of MLP the model's last layer has): the dense MLP, or what a plugin put in its place when that module
    offers `replica()` (a fresh module of its kind and shape, holding all its experts, without what other plugins
    installed inside it). Whoever owns that kind initialises it (`Plugin.init_weights` sees the whole model)."""
    if type(mlp) is MLP:
        return MLP(cfg)
    replica = getattr(mlp, "replica", None)
    if replica is None:
        raise ValueError(f"{type(mlp).__name__}, the model's MLP, cannot be replicated for a block outside the "
                         "model's layers: give that class a replica() method returning a fresh module of its kind")
    return replica()


class DecoderBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, mlp: nn.Module | None = None) -> None:
        """`mlp`: the block's MLP (default: a dense one)."""
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg) if mlp is None else mlp
        self.recompute = False  # activation checkpointing: see Transformer.set_activation_checkpointing

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: BoundAttention) -> BlockOutput:
        """(new residual stream, aux): aux holds what the sub-layers reported (see `with_aux`)."""
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, attend, use_reentrant=False)
        return self._forward(x, cos, sin, attend)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: BoundAttention) -> BlockOutput:
        out, aux = with_aux(self.attn(self.input_norm(x), cos, sin, attend), {})
        x = x + out
        out, aux = with_aux(self.mlp(self.post_attn_norm(x)), aux)
        return x + out, aux


def with_aux(out: torch.Tensor | tuple[torch.Tensor, Aux], aux: Aux) -> tuple[torch.Tensor, Aux]:
    """A sub-layer's output and `aux` with what it reported added.

    A sub-layer a plugin swaps in (an MoE MLP) may return `(output, {name: tensor})` instead of a tensor:
    its router logits or expert loads then reach `TransformerOutput.aux` as return values, which
    activation checkpointing and torch.compile keep intact (state stashed on a module would be written
    again by the recomputation, and breaks the compiled graph).
    """
    if isinstance(out, tuple):
        out, more = out
        return out, {**aux, **more}
    return out, aux
