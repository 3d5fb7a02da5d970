"""The `moe` plugin's recipe block."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slimtrain.modules.plugin import PluginConfig


class MoEConfig(PluginConfig):
    """Replace the MLP of chosen layers by routed experts (plus optional always-on shared experts)."""

    type: Literal["moe"] = Field(description="Plugin name.")
    num_experts: int = Field(8, gt=1, description="Routed experts per MoE layer.")
    top_k: int = Field(2, gt=0, description="Experts each token goes to.")
    expert_intermediate_size: int | None = Field(
        None, gt=0, description="Hidden width of one expert; null: model.intermediate_size (smaller values give "
        "fine-grained experts).")
    num_shared_experts: int = Field(0, ge=0, description="Always-on experts (one SwiGLU this many experts wide).")
    shared_expert_gate: bool = Field(
        False, description="Scale the shared experts' output per token by a learned sigmoid gate (Qwen2-MoE).")
    first_k_dense: int = Field(0, ge=0, description="Leave the first k layers dense (first_k_dense_replace).")
    every: int = Field(1, gt=0, description="Then make every n-th layer an MoE layer (decoder_sparse_step).")
    experts_impl: Literal["auto", "grouped_mm", "triton", "loop"] = Field(
        "auto", description="How the routed experts compute: auto takes torch's grouped GEMM where it runs for the "
        "device and dtype, else the Triton kernel (CUDA), else the per-expert loop (the reference).")
    router: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="softmax: probabilities, top-k (Mixtral, Qwen-MoE). sigmoid: affinities with a "
        "selection-only bias (DeepSeek-V3, GLM-4.5).")
    renormalize: bool = Field(True, description="Make each token's top-k weights sum to 1.")
    n_group: int = Field(1, gt=0, description="sigmoid: expert groups for group-limited selection.")
    topk_group: int = Field(1, gt=0, description="sigmoid: groups each token may choose experts from.")
    routed_scaling_factor: float = Field(1.0, gt=0, description="Multiplies the routed experts' weights.")
    aux_loss_weight: float = Field(0.01, ge=0, description="Switch/GShard load-balancing loss weight (per micro-batch).")
    seq_aux_loss_weight: float = Field(
        0.0, ge=0, description="The same loss per packed row, averaged over rows (DeepSeek-V3's sequence-wise "
        "loss, a small weight next to the aux-loss-free bias); 0 disables.")
    global_aux_loss_weight: float = Field(
        0.0, ge=0, description="The same loss with expert shares from counts summed over the data-parallel "
        "ranks (global-batch balancing, Qwen): one small all-reduce per micro-batch; 0 disables.")
    z_loss_weight: float = Field(0.0, ge=0, description="Router z-loss weight (ST-MoE): mean squared log-sum-exp.")
    capacity_factor: float | None = Field(
        None, description="null: dropless (every slot computed). A number: each expert takes at most "
        "ceil(factor x tokens x top_k / num_experts) slots per micro-batch and the rest are dropped (the token "
        "keeps its residual for that slot); the dropped fraction is logged as moe/dropped.")
    drop_policy: Literal["probability", "position"] = Field(
        "probability", description="Which slots an over-full expert keeps: its highest-weighted ones, or by "
        "position (first choices of all tokens before second choices, in token order).")
    bias_update_rate: float = Field(
        0.0, ge=0, description="Aux-loss-free balancing (DeepSeek-V3): after each optimizer step every expert's "
        "selection bias moves by this rate towards balance, from loads summed over micro-batches and ranks. "
        "sigmoid routers only; 0 disables.")
    upcycle_noise: float = Field(
        0.0, ge=0, description="Upcycling (an MoE started from a dense checkpoint through checkpoint.branch_from "
        "or checkpoint.init_from_hf: every routed expert starts as the dense MLP of its layer): each expert's "
        "copy gets Gaussian noise of std upcycle_noise x the RMS of the dense matrix it copies, so that the "
        "experts diverge; 0 keeps exact copies.")
    dense_training_steps: int = Field(
        0, ge=0, description="Dense training, sparse inference: up to and including this optimizer step, every "
        "token goes through every routed expert, weighted by the router's whole distribution (softmax "
        "probabilities, or sigmoid scores normalised to sum to 1), in training only; evaluations, exports and "
        "every step after it route top-k as configured here. The balancing losses "
        "and load metrics measure the top-k choices throughout. Steps are the run's count, which a branch "
        "continues from its source: 200 dense steps after a branch from step 1000 is 1200. 0 disables.")

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0 (1.0-1.25 is usual); null is "
                             "dropless")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; lower top_k")
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} does not divide num_experts={self.num_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"top_k={self.top_k} exceeds the experts of topk_group={self.topk_group} groups "
                             f"({self.topk_group * (self.num_experts // self.n_group)}); raise topk_group")
        if self.router == "softmax" and (self.n_group > 1 or self.bias_update_rate > 0):
            raise ValueError("n_group and bias_update_rate need router: sigmoid (DeepSeek-style routing)")
        return self
