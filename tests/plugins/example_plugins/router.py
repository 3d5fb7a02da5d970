"""`router`: every MLP becomes two MLPs and a router (top-1, Mixtral's routing). Seams: a sub-layer that
reports `aux` (router logits), a loss read from `aux`, a load counter all-reduced over the data-parallel
ranks after each optimizer step and kept in a buffer (so it resumes), parameter groups with engine keys,
FLOPs and active parameters that differ from the total, an architecture adapter (Mixtral) for export."""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtrain.modules.plugin import LossTerm, ModelCounts, ParamGroup, Plugin, PluginConfig, PluginContext, WeightInit


class RouterConfig(PluginConfig):
    """Two experts per MLP; each token goes to the one its router scores higher."""

    type: Literal["router"] = Field(description="Plugin name.")
    balance_weight: float = Field(0.01, ge=0, description="Weight of the Switch-style balance loss (the router's "
                                  "only gradient: Mixtral's top-1 weight is renormalised to 1).")


class TwoExperts(nn.Module):
    """A router and two copies of the replaced MLP; returns (output, {"router_logits": [tokens, 2], ...})."""

    def __init__(self, mlp: nn.Module, hidden: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList([mlp, copy.deepcopy(mlp)])
        self.router = nn.Linear(hidden, 2, bias=False)
        # Tokens routed, all ranks, all steps. Integer: an engine's bf16 cast of the module leaves it exact.
        self.register_buffer("load", torch.zeros(2, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Mixtral's top-1: the chosen expert's weight is renormalised to 1, so an export to MixtralForCausalLM
        # computes the same. Both experts run here (a toy: a real MoE dispatches each token to one).
        logits = self.router(x).float()
        choice = logits.argmax(-1)
        out = torch.where((choice == 0).unsqueeze(-1), self.experts[0](x), self.experts[1](x))
        return out, {"router_logits": logits.reshape(-1, 2), "router_choice": choice.reshape(-1)}


class RouterPlugin(Plugin):
    order = 10

    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__(cfg)
        self.cfg: RouterConfig = cfg
        self.pending: torch.Tensor | None = None  # this step's routed tokens on this rank, per layer

    def apply(self, model: nn.Module) -> None:
        for layer in model.layers:
            layer.mlp = TwoExperts(layer.mlp, model.cfg.hidden_size)

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        generator = init.generator
        for i, layer in enumerate(model.layers):
            moe, prefix = layer.mlp, f"layers.{i}.mlp."
            if prefix + "router.weight" not in init.imported:
                moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=generator) * 0.02)
            # The second expert starts as a perturbed copy of the first (the dense MLP, maybe imported).
            for (name, mine), other in zip(moe.experts[1].named_parameters(), moe.experts[0].parameters()):
                if f"{prefix}experts.1.{name}" not in init.imported:
                    mine.copy_(other + 0.01 * torch.randn(other.shape, generator=generator))
            moe.load.zero_()

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        experts = [p for layer in model.layers for p in layer.mlp.experts.parameters()]
        routers = [layer.mlp.router.weight for layer in model.layers]
        return [ParamGroup("router/experts", experts, engine={"expert_group": "experts"}),
                ParamGroup("router/routers", routers, lr_scale=0.5, weight_decay=0.0)]

    def losses(self, outputs, batch, ctx: PluginContext) -> dict[str, LossTerm]:
        logits, choices = outputs.aux["router_logits"], outputs.aux["router_choice"]
        # Padding excluded by weights, not by boolean indexing: no wait on the device per layer.
        real = (batch.doc_ids.reshape(-1, 1) >= 0)
        tokens = real.sum().clamp_min(1)
        balance = logits[0].new_zeros(())
        counts = []
        for layer_logits, choice in zip(logits, choices):
            chosen = F.one_hot(choice, 2) * real
            prob = (torch.softmax(layer_logits, -1) * real).sum(0) / tokens
            balance = balance + 2 * (chosen.sum(0) / tokens * prob).sum()
            counts.append(chosen.sum(0))
        if ctx.training:
            step_counts = torch.stack(counts)
            self.pending = step_counts if self.pending is None else self.pending + step_counts
        return {"balance": LossTerm(balance / len(logits), self.cfg.balance_weight)}

    def after_optimizer_step(self, ctx: PluginContext) -> None:
        if self.pending is None:
            return
        total = ctx.comm.all_reduce(self.pending.to(ctx.device), group="data")
        self.pending = None
        with torch.no_grad():
            for layer, counts in zip(ctx.model.layers, total):
                layer.mlp.load += counts.to(layer.mlp.load.device)

    def metrics(self, ctx: PluginContext) -> dict[str, float]:
        loads = torch.stack([layer.mlp.load for layer in ctx.model.layers]).double()
        share = loads[:, 0] / loads.sum(-1).clamp_min(1)
        # A vector metric: expert 0's share per layer, drawn at the end by `plots`.
        return {"router/expert0_share": float(share.mean()), "router/layer_share": share.tolist()}

    def plots(self, records, out_dir):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [(r["step"], r["router/layer_share"]) for r in records if "router/layer_share" in r]
        fig, ax = plt.subplots()
        ax.plot([s for s, _ in rows], [v for _, v in rows])
        fig.savefig(out_dir / "router_share.png")
        plt.close(fig)
        return [out_dir / "router_share.png"]

    def hf_architecture(self, model_cfg) -> str:
        _register_mixtral()  # a registration of this plugin's, like its entry in the plugin registry
        return "router-mixtral"

    def counts(self, model_cfg, counts: ModelCounts, seq_len: int, causal: bool) -> ModelCounts:
        mlp = 3 * model_cfg.hidden_size * model_cfg.intermediate_size * model_cfg.num_layers
        router = 2 * model_cfg.hidden_size * model_cfg.num_layers
        return ModelCounts(total_params=counts.total_params + mlp + router,
                           active_params=counts.active_params + router,
                           flops_per_token=counts.flops_per_token + 6 * router)


ENTRY = (RouterConfig, RouterPlugin)


# -- export: the router's model is a Mixtral with 2 experts, top-1 -----------------------------------------
# (the legacy per-expert layout that checkpoints on the Hub and vLLM use; transformers converts it on load)

_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _mixtral_names(cfg) -> dict[str, str]:
    from slimtrain.modules.transformer.hf_llama import name_map

    names = {k: v for k, v in name_map(cfg).items() if ".mlp." not in k}
    for i in range(cfg.num_layers):
        moe = f"model.layers.{i}.block_sparse_moe"
        names[f"layers.{i}.mlp.router.weight"] = f"{moe}.gate.weight"
        for e in range(2):
            for ours, theirs in _EXPERT.items():
                names[f"layers.{i}.mlp.experts.{e}.{ours}.weight"] = f"{moe}.experts.{e}.{theirs}.weight"
    return names


def _dropped(name: str) -> bool:
    # The load counter is a training statistic: it changes no output.
    return name.startswith("layers.") and name.endswith(".mlp.load")


def _mixtral_to_hf(state, cfg):
    from slimtrain.modules.hf_adapters import NameMismatch

    names = _mixtral_names(cfg)
    kept = {k: v for k, v in state.items() if not _dropped(k)}
    missing = set(names) - set(kept) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    unexpected = set(kept) - set(names)
    if missing or unexpected:
        raise NameMismatch(f"not a router model: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}",
                           missing, unexpected)
    return {names[k]: v for k, v in kept.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}


def _mixtral_from_hf(hf_state, cfg):
    from slimtrain.modules.hf_adapters import NameMismatch

    ours = {v: k for k, v in _mixtral_names(cfg).items()}
    unexpected = set(hf_state) - set(ours)
    if unexpected:
        raise NameMismatch(f"not a router model: unexpected {sorted(unexpected)[:4]}", (), unexpected)
    state = {ours[k]: v for k, v in hf_state.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def _mixtral_config(cfg, *, bos_id, eos_id, pad_id=None, dtype=torch.float32):
    from transformers import MixtralConfig

    from slimtrain.modules.transformer.hf_llama import hf_config

    llama = hf_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, dtype=dtype).to_dict()
    for key in ("architectures", "model_type", "attention_bias", "mlp_bias", "pretraining_tp", "transformers_version"):
        llama.pop(key, None)
    return MixtralConfig(**llama, architectures=["MixtralForCausalLM"], num_local_experts=2, num_experts_per_tok=1,
                         sliding_window=None)


def _register_mixtral() -> None:
    from slimtrain.modules.hf_adapters import ADAPTERS, Adapter, register_adapter

    if "router-mixtral" not in ADAPTERS:
        register_adapter("router-mixtral", Adapter(hf_architecture="MixtralForCausalLM", to_hf=_mixtral_to_hf,
                                                   from_hf=_mixtral_from_hf, hf_config=_mixtral_config))

