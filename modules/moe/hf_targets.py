"""Which Hugging Face MoE class an MoE model exports as: its dense family (`model.architecture`) and its MoE options
choose one, and the model options that class cannot compute are refused, naming the field, its value and the fix.

    llama    MixtralForCausalLM (softmax, renormalised top-k, every layer MoE, no shared experts), else
             Qwen2MoeForCausalLM (softmax otherwise), or Glm4MoeForCausalLM (sigmoid router)
    mistral  MixtralForCausalLM, with the sliding window on every layer
    qwen2    Qwen2MoeForCausalLM, with the model's q/k/v biases and sliding-window layers
    qwen3    Qwen3MoeForCausalLM: softmax, no shared experts, q/k norms, attention_bias, a window on every layer

An export keeps the family: a Mistral, Qwen2 or Qwen3 model never becomes another family's class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from slimtrain.modules.transformer.config import ModelConfig

from .config import MoEConfig
from .plugin import moe_layer_indices

_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Layout:
    """How one HF class names an MoE block under `model.layers.{i}.`.

    block: the MoE module; experts: an expert's gate, up and down projections; shared: the shared experts'
    module (None: the class has none); shared_gate: the shared experts' sigmoid gate (Qwen2-MoE).
    """

    hf_class: str
    config_class: str
    block: str
    experts: tuple[str, str, str]
    shared: str | None = None
    shared_gate: str | None = None


LAYOUTS = {
    "mixtral": Layout("MixtralForCausalLM", "MixtralConfig", "block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2-moe": Layout("Qwen2MoeForCausalLM", "Qwen2MoeConfig", "mlp", _PROJ, "shared_expert", "shared_expert_gate"),
    "qwen3-moe": Layout("Qwen3MoeForCausalLM", "Qwen3MoeConfig", "mlp", _PROJ),
    "glm4-moe": Layout("Glm4MoeForCausalLM", "Glm4MoeConfig", "mlp", _PROJ, "shared_experts"),
}
# The dense family whose MoE class each layout is (GLM's sigmoid MoE exports from Llama only).
FAMILY_OF_TARGET = {"mixtral": "mistral", "qwen2-moe": "qwen2", "qwen3-moe": "qwen3", "glm4-moe": "llama"}


def choose_target(moe: MoEConfig, model_cfg: ModelConfig | None = None) -> str:
    """The key of LAYOUTS whose class computes exactly what `moe` on the dense model `model_cfg` computes (None: a
    plain Llama); a ValueError naming the option and the fix if none does."""
    family = model_cfg.architecture if model_cfg is not None else "llama"
    target = _FAMILY_TARGETS[family](moe)
    wrong = model_errors(target, moe, model_cfg) if model_cfg is not None else []
    if wrong:
        raise ValueError("; ".join(wrong))
    return target


def _llama_target(moe: MoEConfig) -> str:
    if moe.router == "sigmoid":
        _check_glm(moe)
        return "glm4-moe"
    _check_softmax(moe, "llama")
    if not moe.num_shared_experts and moe.renormalize and moe.first_k_dense == 0 and moe.every == 1:
        return "mixtral"
    _check_shared_gate(moe)
    return "qwen2-moe"


def _mistral_target(moe: MoEConfig) -> str:
    _check_softmax(moe, "mistral")
    mixtral = "MixtralForCausalLM, the Mistral family's MoE class,"
    if moe.num_shared_experts:
        raise ValueError(f"moe.num_shared_experts={moe.num_shared_experts} with model.architecture: mistral: {mixtral} "
                         "has no shared experts; set num_shared_experts: 0")
    if moe.first_k_dense or moe.every != 1:
        raise ValueError(f"moe.first_k_dense={moe.first_k_dense}, every={moe.every} with model.architecture: "
                         f"mistral: {mixtral} makes every layer an MoE layer; set first_k_dense: 0 and every: 1")
    if not moe.renormalize:
        raise ValueError(f"moe.renormalize=false with model.architecture: mistral: {mixtral} always renormalises "
                         "the top-k weights; set renormalize: true")
    return "mixtral"


def _qwen2_target(moe: MoEConfig) -> str:
    _check_softmax(moe, "qwen2")
    _check_shared_gate(moe)
    return "qwen2-moe"


def _qwen3_target(moe: MoEConfig) -> str:
    _check_softmax(moe, "qwen3")
    if moe.num_shared_experts:
        raise ValueError(f"moe.num_shared_experts={moe.num_shared_experts} with model.architecture: qwen3: "
                         "Qwen3MoeForCausalLM has no shared experts; set num_shared_experts: 0")
    return "qwen3-moe"


_FAMILY_TARGETS: dict[str, Callable[[MoEConfig], str]] = {
    "llama": _llama_target, "mistral": _mistral_target, "qwen2": _qwen2_target, "qwen3": _qwen3_target}


def _check_softmax(moe: MoEConfig, family: str) -> None:
    """Mixtral and the Qwen MoE classes route by softmax and never scale the routed weights."""
    glm = "use router: sigmoid (exported as Glm4MoeForCausalLM)"
    if moe.router == "sigmoid":  # a Llama model's sigmoid router went to GLM before this
        raise ValueError(f"moe.router='sigmoid' with model.architecture: {family}: its family's MoE class routes by "
                         f"softmax (sigmoid routing exports as Glm4MoeForCausalLM, from architecture: llama only); "
                         "set router: softmax")
    if moe.routed_scaling_factor != 1:
        fix = f"set routed_scaling_factor: 1, or {glm}" if family == "llama" else "set routed_scaling_factor: 1"
        raise ValueError(f"moe.routed_scaling_factor={moe.routed_scaling_factor} with router: softmax: no Hugging Face "
                         f"class scales softmax routing weights (Mixtral, Qwen2-MoE, Qwen3-MoE); {fix}")


def _check_shared_gate(moe: MoEConfig) -> None:
    if moe.num_shared_experts and not moe.shared_expert_gate:
        raise ValueError(f"moe.num_shared_experts={moe.num_shared_experts} with shared_expert_gate: false and router: "
                         "softmax: the class for softmax MoE with shared experts (Qwen2MoeForCausalLM) always scales "
                         "its shared expert by a sigmoid gate; set shared_expert_gate: true (or router: sigmoid, "
                         "exported as Glm4MoeForCausalLM with ungated shared experts)")


def _check_glm(moe: MoEConfig) -> None:
    if moe.every != 1:
        raise ValueError(f"moe.every={moe.every} with router: sigmoid: Glm4MoeForCausalLM makes every layer from "
                         "first_k_dense_replace on an MoE layer; set every: 1")
    if moe.num_shared_experts and moe.shared_expert_gate:
        raise ValueError("moe.shared_expert_gate=true with router: sigmoid: Glm4MoeForCausalLM's shared experts are "
                         "not gated; set shared_expert_gate: false")
    if moe.n_group > 1 and moe.num_experts // moe.n_group < 2:
        raise ValueError(f"moe.n_group={moe.n_group} leaves {moe.num_experts // moe.n_group} expert per group: "
                         "Glm4MoeForCausalLM scores a group by its two best experts; lower n_group to at most "
                         f"{moe.num_experts // 2}")


# -- the dense model's options ----------------------------------------------------------------------------------

def model_errors(target: str, moe: MoEConfig, cfg: ModelConfig) -> list[str]:
    """One line per option of the dense model `cfg` that `target`'s class does not compute, each with the fix.
    (The family rules, `families.py`, already hold: these are what the MoE class lacks beside its dense one.)"""
    cls, wrong = LAYOUTS[target].hf_class, []
    if cfg.qkv_bias and target == "mixtral":
        wrong.append(f"model.qkv_bias=true but {cls} has no attention biases; set qkv_bias: false (and o_bias: false)")
    if cfg.o_bias and target != "qwen3-moe":
        wrong.append(f"model.o_bias=true (model.architecture: {cfg.architecture}) but {cls} has no bias on o_proj; set "
                     "o_bias: false (Llama's attention_bias sets both: qkv_bias: false too)")
    dense = [i for i in range(cfg.num_layers) if i not in moe_layer_indices(moe, cfg.num_layers)]
    if cfg.mlp_bias and dense:  # the MoE layers' experts replace the MLP and its biases; a dense layer keeps them
        wrong.append(f"model.mlp_bias=true but {cls}'s dense MLPs (layers {dense}) have no biases; set mlp_bias: false "
                     "(or make every layer an MoE layer: moe.first_k_dense: 0, every: 1)")
    if cfg.qk_norm != (target == "qwen3-moe"):
        wrong.append(f"model.qk_norm={cfg.qk_norm} but {cls} {'always has' if target == 'qwen3-moe' else 'has no'} "
                     f"q/k norms; set qk_norm: {str(target == 'qwen3-moe').lower()}")
    return wrong + _window_errors(target, cfg)


def _window_errors(target: str, cfg: ModelConfig) -> list[str]:
    """Qwen2-MoE names each layer's attention (layer_types); Mixtral and Qwen3-MoE slide on every layer or none;
    GLM never slides."""
    sliding = [i for i in range(cfg.num_layers) if cfg.window_of(i) is not None]
    cls = LAYOUTS[target].hf_class
    if not sliding or target == "qwen2-moe" or (target != "glm4-moe" and len(sliding) == cfg.num_layers):
        return []
    if target == "glm4-moe":
        return [f"model.sliding_window={cfg.sliding_window} but {cls} has no sliding window; set sliding_window: null"]
    return [f"model.sliding_window_layers={cfg.sliding_window_layers} (a window of {cfg.sliding_window} on layers "
            f"{sliding}) but {cls} slides on every layer or none; set sliding_window_layers: null (every layer) or "
            "sliding_window: null"]
