"""Load-balancing losses read from one MoE layer's routing: Switch/GShard's auxiliary loss at micro-batch,
sequence (per packed row, DeepSeek-V3) and global-batch level (expert counts summed over data-parallel
ranks, Qwen), and ST-MoE's router z-loss. Padding tokens count nowhere.

All share one form: `E x sum_e f_e P_e`, with f_e the share of routed slots expert e received (counts over
tokens x top_k; no gradient) and P_e its mean normalised router score (the gradient's path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def slot_counts(experts: torch.Tensor, num_experts: int, real: torch.Tensor) -> torch.Tensor:
    """[T, E]: how many of each real token's top-k slots went to each expert (padding rows are zero)."""
    return F.one_hot(experts, num_experts).sum(1) * real


def normalised(scores: torch.Tensor) -> torch.Tensor:
    """Scores as a distribution over experts: softmax probabilities unchanged, sigmoid affinities scaled."""
    return scores / scores.sum(-1, keepdim=True)


def aux_loss(counts: torch.Tensor, probs: torch.Tensor, real: torch.Tensor, top_k: int) -> torch.Tensor:
    """The micro-batch loss from this micro-batch's [T, E] slot counts and probabilities."""
    tokens = real.sum().clamp_min(1)
    frac = counts.sum(0) / (tokens * top_k)
    return counts.shape[-1] * (frac * (probs * real).sum(0) / tokens).sum()


def sequence_aux_loss(counts: torch.Tensor, probs: torch.Tensor, real: torch.Tensor, top_k: int,
                      rows: int) -> torch.Tensor:
    """The same loss on each of `rows` packed rows alone, averaged over the rows that hold real tokens."""
    e = counts.shape[-1]
    counts, probs, real = counts.view(rows, -1, e), probs.view(rows, -1, e), real.view(rows, -1, 1)
    tokens = real.sum(1)  # [rows, 1]
    frac = counts.sum(1) / (tokens * top_k).clamp_min(1)
    per_row = e * (frac * (probs * real).sum(1) / tokens.clamp_min(1)).sum(-1)
    used = (tokens.squeeze(-1) > 0).to(per_row.dtype)
    return (per_row * used).sum() / used.sum().clamp_min(1)


def global_aux_loss(global_counts: torch.Tensor, global_tokens: torch.Tensor, probs: torch.Tensor,
                    real: torch.Tensor, top_k: int) -> torch.Tensor:
    """The loss with f_e from counts summed over the data-parallel ranks (`global_counts` [E] and
    `global_tokens`), P_e from this rank's tokens: a rank's skew may be balanced by another's."""
    frac = global_counts / (global_tokens.clamp_min(1) * top_k)
    return global_counts.shape[-1] * (frac * (probs * real).sum(0) / real.sum().clamp_min(1)).sum()


def z_loss(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of the squared log-sum-exp of the router logits."""
    return (torch.logsumexp(logits, -1).square() * real.squeeze(-1)).sum() / real.sum().clamp_min(1)


def entropy(probs: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Sum over real tokens of the router distribution's entropy (nats)."""
    return (-(probs * probs.clamp_min(1e-20).log()).sum(-1) * real.squeeze(-1)).sum()
