"""Expert parallelism: each rank of the "expert" group holds E/ep of a layer's experts and runs them on the
tokens that every rank of the group routes there.

Rank r of ep holds the global experts [r*E/ep, (r+1)*E/ep) in a `GroupedExperts` of E/ep experts. A layer's
forward sorts this rank's (token, slot) pairs by global expert, which also groups them by the rank holding
that expert; exchanges the per-expert counts, then the token rows (all-to-all); runs the local experts as
one grouped computation; sends the results back to the ranks their tokens came from, which weight them and
sum them per token. The output equals the single-process `GroupedExperts` over all E experts; a rank's expert
weights get the gradient of every rank's tokens routed to them, so their data-parallel reduction must run
only over the ranks holding the same experts (the expert-data-parallel group), never the whole data group.

A slot routed to expert E (== num_experts, one past the last) was dropped by a capacity limit: it is sent
nowhere and adds nothing, whatever its weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimtrain.modules.context import Communicator

from .experts import GroupedExperts, choose_impl, sorted_swiglu
from .router import Routing


def expert_parallel_forward(x: torch.Tensor, routing: Routing, experts: GroupedExperts, comm: Communicator,
                            group: str = "expert") -> torch.Tensor:
    """x [T, H] -> [T, H]: the sum over each token's kept slots of weight x expert(x), the E experts spread
    over the ranks of `group` (`experts` holds this rank's E / size(group) of them).

    Every rank of the group must call it for the same layer at the same time, also with no tokens: it runs
    three all-to-alls in the forward and two in the backward.
    """
    ep, local = comm.size(group), experts.num_experts
    k = routing.experts.shape[-1]
    order, counts = _sort_by_expert(routing.experts, local * ep)
    recv_counts = comm.all_to_all(counts, group=group).view(ep, local)  # rows from each rank per local expert
    send_per_rank, recv_per_rank = _rows_per_rank(counts.view(ep, local), recv_counts)
    slot = order[: sum(send_per_rank)]  # the kept slots: a dropped one (expert E) sorts after every expert
    token = slot // k
    rows = comm.all_to_all(x[token], recv_per_rank, send_per_rank, group)
    y = _run_received(rows, recv_counts, experts)
    back = comm.all_to_all(y, send_per_rank, recv_per_rank, group)  # in the order this rank sent them
    weights = routing.weights.reshape(-1)[slot].unsqueeze(-1).to(back.dtype)
    return torch.zeros_like(x).index_add_(0, token, back * weights)


def _sort_by_expert(chosen: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts): the flat [T*k] slots of `chosen` [T, k] grouped by expert, in token order within each
    (the dropped-slot sentinel `num_experts` last); the slots per expert [num_experts], sentinel excluded."""
    flat = chosen.reshape(-1)
    return flat.argsort(stable=True), torch.bincount(flat, minlength=num_experts + 1)[:num_experts]


def _rows_per_rank(send_counts: torch.Tensor, recv_counts: torch.Tensor) -> tuple[list[int], list[int]]:
    """Rows sent to and received from each rank, on the host: all_to_all takes its split sizes there (the
    layer's one wait for the device; both in one transfer)."""
    both = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).cpu()
    return both[0].tolist(), both[1].tolist()


def _run_received(rows: torch.Tensor, recv_counts: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
    """The local experts on `rows` as received (grouped by source rank, then by local expert), returned in
    that same order.

    recv_counts [ep, local]: rows from each source rank for each local expert.
    """
    ep, local = recv_counts.shape
    expert_of_row = torch.arange(local, device=rows.device).repeat(ep).repeat_interleave(
        recv_counts.reshape(-1), output_size=rows.shape[0])
    by_expert = expert_of_row.argsort(stable=True)
    y = _local_swiglu(rows[by_expert], recv_counts.sum(0), experts)
    return torch.empty_like(y).index_copy_(0, by_expert, y)  # back to the received order


def _local_swiglu(rows: torch.Tensor, counts: torch.Tensor, experts: GroupedExperts) -> torch.Tensor:
    """This rank's experts on rows sorted by local expert (counts[e] rows for expert e), unweighted [N, H]:
    the computation `GroupedExperts.forward` picks for these rows (grouped GEMM or Triton kernel), or one
    product per expert where neither runs. Every row is kept, so offs[-1] is N: no row is left
    uncomputed."""
    # The weights as the products use them (a QAT plugin's fake-quantization included).
    gate_up, down = experts.transformed_weight("gate_up"), experts.transformed_weight("down")
    impl = "loop"
    if rows.dtype == gate_up.dtype:
        impl = choose_impl(rows, rows.shape[-1], experts.intermediate, experts.impl)
    if impl != "loop":
        return sorted_swiglu(rows, counts.cumsum(0).to(torch.int32), gate_up, down, impl)
    inter, outs = experts.intermediate, []
    for e, part in enumerate(rows.split(counts.tolist())):
        gate, up = (part @ gate_up[e].T).split(inter, dim=-1)
        outs.append((F.silu(gate) * up) @ down[e].T)
    return torch.cat(outs) if outs else rows.new_zeros((0, rows.shape[-1]))
