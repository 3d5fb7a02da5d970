"""The MoE layer that replaces a decoder block's MLP: router, grouped experts, optional shared experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimtrain.modules.context import Communicator
from slimtrain.modules.quantizable import keep_high_precision, shard_weight_transform

from .config import MoEConfig
from .experts import GroupedExperts
from .parallel import expert_parallel_forward
from .router import Routing, apply_capacity, route_sigmoid, route_softmax


class SharedExperts(nn.Module):
    """The always-on experts as one SwiGLU (n experts of width I are one of width n x I); with `gated`, its
    output is scaled per token by sigmoid(gate(x)), a learned H -> 1 projection (Qwen2-MoE)."""

    def __init__(self, hidden: int, width: int, gated: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)
        self.gate = nn.Linear(hidden, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out if self.gate is None else out * torch.sigmoid(self.gate(x))


class MoELayer(nn.Module):
    """Routes each token to top-k experts; returns (output, aux) with the router's logits and choices.

    `bias_steps` counts the aux-loss-free updates per expert (+1 / -1 each step); `bias_base` holds the fp32
    bits (as int32) of a bias imported from a checkpoint. The selection bias is
    `bias_base + bias_update_rate x bias_steps`. Integer buffers are exact, and an engine's bf16 cast of the
    module leaves them alone (a float buffer would be rounded to bf16).

    Expert parallelism (`slimtrain.modules.expert_parallel`): after `shard_experts`, `experts` holds this rank's
    E / size experts (global ids `expert_slice`) and the forward exchanges tokens over the communicator's group
    (`parallel.expert_parallel_forward`); the router, the shared experts and the bias stay whole on every rank.
    """

    def __init__(self, cfg: MoEConfig, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(hidden, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, hidden, intermediate, cfg.experts_impl)
        self.shared = (SharedExperts(hidden, cfg.num_shared_experts * intermediate, cfg.shared_expert_gate)
                       if cfg.num_shared_experts else None)
        self.register_buffer("bias_steps", torch.zeros(cfg.num_experts, dtype=torch.int64))
        self.register_buffer("bias_base", torch.zeros(cfg.num_experts, dtype=torch.int32))
        # The router is read as a weight in fp32 below, never called as a Linear: a QAT swap would do nothing.
        keep_high_precision(self.router, "computed in fp32 from router.weight by the MoE layer")
        # What this layer initialises (a later plugin may add parameters inside it, e.g. QAT step sizes).
        self.own_parameters = tuple(name for name, _ in self.named_parameters())
        # "Dense training, sparse inference" (moe.dense_training_steps): set by the plugin from the step
        # (`on_step_start`, idempotent, so a resume is exact); False in every model built for export or serving.
        self.dense_routing = False
        # Expert parallelism: set by `shard_experts` (a backend); None while this module holds every expert.
        self.expert_comm: Communicator | None = None
        self.expert_group = "expert"
        self.expert_slice = slice(0, cfg.num_experts)

    @property
    def num_experts(self) -> int:
        """The routed experts of the layer, over all ranks."""
        return self.cfg.num_experts

    def replica(self) -> "MoELayer":
        """A fresh, uninitialised layer of this configuration holding all its experts (a block built beside the
        model's layers, e.g. an MTP block: `slimtrain.modules.transformer.layers.replicate_mlp`)."""
        return MoELayer(self.cfg, self.router.in_features, self.experts.intermediate)

    def expert_parameters(self) -> dict[str, nn.Parameter]:
        """The stacked expert weights (dim 0: this rank's experts)."""
        return {f"experts.{name}": p for name, p in self.experts.named_parameters(recurse=False)}

    def shard_experts(self, comm: Communicator, group: str, rank: int, size: int) -> None:
        """Keep experts [rank x E/size, (rank+1) x E/size) only (new, uninitialised parameters on the current
        experts' device, the meta device in a backend's build) and exchange tokens over `group` from now on.

        A weight transform a plugin installed on the experts (QAT) moves to the new module through
        `slimtrain.modules.quantizable.shard_weight_transform`, told which experts it now sees."""
        old, total = self.experts, self.cfg.num_experts
        if total % size:
            fits = [n for n in range(1, total + 1) if total % n == 0]
            raise ValueError(f"num_experts={total} is not divisible by the {size} ranks that share the experts; "
                             f"use an expert-parallel size that divides it ({fits}) or a multiple of it as "
                             "num_experts")
        if self.expert_comm is not None:
            raise ValueError("its experts are sharded already")
        local = total // size
        part = slice(rank * local, (rank + 1) * local)
        transform = shard_weight_transform(old, part, self.gather_experts)  # before any change: it may refuse
        with torch.device(old.gate_up.device):
            self.experts = GroupedExperts(local, old.gate_up.shape[-1], old.intermediate, old.impl)
        if transform is not None:
            self.experts.set_weight_transform(transform)
        self.expert_comm, self.expert_group = comm, group
        self.expert_slice = part

    @torch.no_grad()
    def gather_experts(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's per-expert rows [E/size, ...] -> the layer's [E, ...] in expert order, from every rank of
        the expert group (collective: each rank of the group calls it at the same point; one all-to-all, each
        rank sending its rows to all). The rows as they are while this module holds every expert."""
        comm = self.expert_comm
        if comm is None:
            return local
        size = comm.size(self.expert_group)
        if local.shape[0] * size != self.num_experts:
            raise RuntimeError(f"gathering {local.shape[0]} experts' rows from each of the {size} ranks of group "
                               f"{self.expert_group!r} gives {local.shape[0] * size}, the layer has "
                               f"{self.num_experts}: the communicator is not the one its experts were sharded over "
                               "(a single-process communicator cannot stand in for the other ranks here)")
        sent = local.detach().contiguous().repeat(size, *([1] * (local.dim() - 1)))
        return comm.all_to_all(sent, group=self.expert_group)

    def selection_bias(self) -> torch.Tensor:
        """The sigmoid router's selection bias, fp32 [E] (zeros for a softmax router)."""
        base = self.bias_base.view(torch.float32)
        return base + self.bias_steps.float() * self.cfg.bias_update_rate

    def set_selection_bias(self, bias: torch.Tensor) -> None:
        """Take `bias` (fp32 [E], e.g. a checkpoint's e_score_correction_bias) as the base; no updates yet."""
        self.bias_base.copy_(bias.detach().to(torch.float32).contiguous().view(torch.int32))
        self.bias_steps.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A sharded layer takes whole [E, ...] expert tensors (an import, a single-process state dict) and keeps
        # its share; tensors of its own size (a checkpoint of this layout) load as they are. The children load
        # after this, from the same dict.
        if self.expert_comm is not None:
            for name, p in self.expert_parameters().items():
                value = state_dict.get(prefix + name)
                if value is not None and value.shape[0] == self.num_experts != p.shape[0]:
                    state_dict[prefix + name] = value[self.expert_slice]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def route(self, logits: torch.Tensor) -> Routing:
        c = self.cfg
        if c.router == "softmax":
            routing = route_softmax(logits, c.top_k, c.renormalize)
            return Routing(routing.weights * c.routed_scaling_factor, routing.experts, routing.scores)
        bias = self.selection_bias()
        return route_sigmoid(logits, c.top_k, bias, c.n_group, c.topk_group, c.renormalize, c.routed_scaling_factor)

    def every_expert(self, routing: Routing) -> Routing:
        """Dense training: every token to every routed expert, weighted by the router's whole distribution
        (softmax probabilities; sigmoid scores normalised to sum to 1), times the routed scaling factor."""
        scores = routing.scores
        weights = scores if self.cfg.router == "softmax" else scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
        experts = torch.arange(scores.shape[-1], device=scores.device).expand(scores.shape[0], -1)
        return Routing(weights * self.cfg.routed_scaling_factor, experts, scores)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat.float(), self.router.weight.float())  # router math in fp32 (bf16 ties flip choices)
        routing = self.route(logits)
        # The top-k choices, also while training densely: the balancing losses and load metrics keep
        # measuring the routing that inference will use.
        aux = {"moe/logits": logits, "moe/scores": routing.scores, "moe/experts": routing.experts}
        # Both only while training: evaluation and export route top-k without drops, as serving does.
        if self.dense_routing and self.training:
            routing = self.every_expert(routing)  # no capacity: every token through every expert
        elif self.cfg.capacity_factor is not None and self.training:
            capacity = math.ceil(self.cfg.capacity_factor * flat.shape[0] * self.cfg.top_k / self.cfg.num_experts)
            routing, aux["moe/dropped"] = apply_capacity(routing, self.cfg.num_experts, capacity, self.cfg.drop_policy)
        if self.expert_comm is not None:
            out = expert_parallel_forward(flat, routing, self.experts, self.expert_comm, self.expert_group)
        else:
            out = self.experts(flat, routing)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view_as(x), aux
