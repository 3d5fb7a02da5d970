"""Per-step routing statistics of the MoE layers: gathered per micro-batch, summed over the micro-batches
of a step and over the data-parallel ranks (one all-reduce), turned into the logged metrics.

One row per MoE layer, float64 (integer counts stay exact): the E expert loads (routed slots of real
tokens, before any capacity drop), then the columns below.
"""

from __future__ import annotations

import torch

from .balancing import entropy

ENTROPY, TOKENS, DROPPED, MAXVIO, MICRO = range(5)  # offsets past the E load columns
EXTRA = 5


def micro_batch_row(counts: torch.Tensor, probs: torch.Tensor, real: torch.Tensor,
                    dropped: torch.Tensor | None) -> torch.Tensor:
    """One layer's statistics of one micro-batch, [E + EXTRA]."""
    with torch.no_grad():
        loads = counts.sum(0).double()
        maxvio = loads.max() / loads.mean().clamp_min(1e-9) - 1
        lost = (dropped * real).sum() if dropped is not None else loads.new_zeros(())
        extra = torch.stack([entropy(probs.double(), real), real.sum().double(), lost.double(), maxvio,
                             loads.new_ones(())])
        return torch.cat([loads, extra])


def layer_metrics(totals: torch.Tensor, num_experts: int, top_k: int) -> dict[str, torch.Tensor]:
    """Per-layer metrics [L] from the step's summed rows [L, E + EXTRA] (ranks and micro-batches)."""
    loads, extra = totals[:, :num_experts], totals[:, num_experts:]
    mean = loads.mean(-1).clamp_min(1e-9)
    tokens = extra[:, TOKENS].clamp_min(1)
    return {
        "maxvio": loads.max(-1).values / mean - 1,  # over the global batch
        "maxvio_micro": extra[:, MAXVIO] / extra[:, MICRO].clamp_min(1),  # per micro-batch, averaged
        "cv": loads.std(-1, unbiased=False) / mean,
        "entropy": extra[:, ENTROPY] / tokens,
        "dropped": extra[:, DROPPED] / (tokens * top_k),
    }


def load_shares(totals: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[L, E]: each expert's share of its layer's routed slots this step."""
    loads = totals[:, :num_experts]
    return loads / loads.sum(-1, keepdim=True).clamp_min(1)
