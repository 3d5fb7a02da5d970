"""What `checkpoint.init_from_hf` checks of an MoE class's config.json against the recipe: every value our model
(its dense options and its MoE options) would compute otherwise is one line naming our field, the key and both
values. Absent keys take the installed class's defaults, as transformers would load them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimtrain.modules.transformer import hf_llama
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.modules.transformer.hf_config import rope_dict, rope_from_hf

from .hf_targets import FAMILY_OF_TARGET, LAYOUTS
from .plugin import moe_layer_indices

if TYPE_CHECKING:
    from .hf_export import MoEArchitecture

# config.json key -> the MoE option it must equal, per target (the Qwen classes' layer pattern is checked apart).
_QWEN = {"num_experts": "num_experts", "num_experts_per_tok": "top_k",
         "moe_intermediate_size": "expert_intermediate_size", "norm_topk_prob": "renormalize"}
MOE_FIELDS = {
    "mixtral": {"num_local_experts": "num_experts", "num_experts_per_tok": "top_k",
                "intermediate_size": "expert_intermediate_size"},
    "qwen2-moe": {**_QWEN, "shared_expert_intermediate_size": "num_shared_experts"},
    "qwen3-moe": _QWEN,
    "glm4-moe": {"n_routed_experts": "num_experts", "num_experts_per_tok": "top_k",
                 "moe_intermediate_size": "expert_intermediate_size", "n_shared_experts": "num_shared_experts",
                 "first_k_dense_replace": "first_k_dense", "n_group": "n_group", "topk_group": "topk_group",
                 "routed_scaling_factor": "routed_scaling_factor", "norm_topk_prob": "renormalize"},
}


def config_errors(arch: "MoEArchitecture", hf: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """Every value of the config.json `hf` that our model with `cfg` and `arch`'s MoE options does not compute."""
    effective = _effective(arch, hf)
    dense = len(moe_layer_indices(arch.moe, cfg.num_layers)) < cfg.num_layers
    # intermediate_size is the dense MLPs' (Mixtral: the experts'); without dense layers it computes nothing.
    # attention_bias means another thing per class: checked below.
    common = {k: v for k, v in hf.items() if k != "attention_bias"
              and (k != "intermediate_size" or (dense and arch.target != "mixtral"))}
    return [*_class_errors(arch, hf, cfg), *hf_llama.check_common(common, cfg), *_moe_errors(arch, effective, cfg),
            *_bias_errors(arch, effective, cfg), *_window_errors(arch, effective, hf, cfg), *_rope_errors(hf, cfg),
            *_other_errors(arch, effective, hf, cfg)]


def _effective(arch: "MoEArchitecture", hf: dict[str, Any]) -> dict[str, Any]:
    import transformers

    # Absent keys take the installed class's defaults (e.g. Glm4Moe's num_experts_per_tok 8).
    effective = {**getattr(transformers, arch.layout.config_class)().to_dict(), **hf}
    if arch.target == "qwen3-moe" and "num_experts" not in hf:  # transformers 5 writes num_local_experts only
        effective["num_experts"] = effective.get("num_local_experts")
    return effective


def _class_errors(arch: "MoEArchitecture", hf: dict[str, Any], cfg: ModelConfig) -> list[str]:
    theirs, ours = hf.get("architectures"), arch.layout.hf_class
    if theirs is None or theirs == [ours]:
        return []
    family = {LAYOUTS[t].hf_class: f for t, f in FAMILY_OF_TARGET.items()}.get((theirs or [None])[0])
    fix = f"model.architecture: {family} and moe options that export as {theirs[0]}" if family else "another checkpoint"
    return [f"model.architecture={cfg.architecture!r} with these moe options exports as {ours} but config.json's "
            f"architectures is {theirs}; set {fix}"]


def _moe_errors(arch: "MoEArchitecture", effective: dict[str, Any], cfg: ModelConfig) -> list[str]:
    ours, wrong = arch.config_keys(cfg), []
    for key, field in MOE_FIELDS[arch.target].items():
        if effective.get(key) != ours[key]:
            wrong.append(f"moe.{field}={_field_value(arch, field, cfg)} but {key}={effective.get(key)}")
    if arch.target in ("qwen2-moe", "qwen3-moe"):
        layers, ours_layers = _qwen_moe_layers(effective, cfg.num_layers), moe_layer_indices(arch.moe, cfg.num_layers)
        if layers != ours_layers:
            wrong.append(f"moe.first_k_dense/every={arch.moe.first_k_dense}/{arch.moe.every} make layers "
                         f"{ours_layers} MoE but decoder_sparse_step={effective.get('decoder_sparse_step')} and "
                         f"mlp_only_layers={effective.get('mlp_only_layers')} make {layers}")
    return wrong


def _field_value(arch: "MoEArchitecture", field: str, cfg: ModelConfig) -> Any:
    if field == "expert_intermediate_size":
        return f"{arch.moe.expert_intermediate_size} (expert width {arch.width(cfg)})"
    if field == "num_shared_experts":
        return f"{arch.moe.num_shared_experts} (shared width {arch.moe.num_shared_experts * arch.width(cfg)})"
    return getattr(arch.moe, field)


def _qwen_moe_layers(effective: dict[str, Any], num_layers: int) -> list[int]:
    """The layers transformers' Qwen2-MoE and Qwen3-MoE make sparse: not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0."""
    only, step = effective.get("mlp_only_layers") or [], effective.get("decoder_sparse_step") or 1
    if not effective.get("num_experts"):
        return []
    return [i for i in range(num_layers) if i not in only and (i + 1) % step == 0]


def _bias_errors(arch: "MoEArchitecture", effective: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """Qwen2-MoE: qkv_bias builds q/k/v biases (zeros may stand for none); Qwen3-MoE: attention_bias builds them on
    q, k, v and o; GLM: on q, k and v. Mixtral has none (a model with biases never exports as it)."""
    if arch.target == "qwen2-moe" and cfg.qkv_bias and not effective.get("qkv_bias"):
        return [f"model.qkv_bias=True but qkv_bias={effective.get('qkv_bias')}: the checkpoint has no q/k/v biases"]
    if arch.target in ("qwen3-moe", "glm4-moe") and bool(effective.get("attention_bias")) != cfg.qkv_bias:
        return [f"model.qkv_bias={cfg.qkv_bias} (o_bias={cfg.o_bias}) but attention_bias="
                f"{effective.get('attention_bias')}"]
    return []


def _window_errors(arch: "MoEArchitecture", effective: dict[str, Any], hf: dict[str, Any],
                   cfg: ModelConfig) -> list[str]:
    """Each layer's sliding window as the class computes it against ours; a window at least as long as
    model.max_seq_len slides nowhere."""
    if effective.get("num_hidden_layers") != cfg.num_layers:
        return []  # check_common names the layer count
    try:
        theirs = [_capped(w, cfg) for w in _class_windows(arch, effective, hf, cfg.num_layers)]
    except Exception as exc:  # transformers' config validation raises its own error types
        why = " ".join(str(exc).split())
        return [f"config.json's sliding-window keys are not valid for {arch.layout.hf_class}: {why}"]
    ours = [_capped(cfg.window_of(i), cfg) for i in range(cfg.num_layers)]
    if theirs == ours:
        return []
    keys = {"mixtral": "sliding_window", "qwen2-moe": "use_sliding_window, sliding_window and layer_types",
            "qwen3-moe": "use_sliding_window and sliding_window", "glm4-moe": "(the class: none)"}[arch.target]
    return [f"model.sliding_window={cfg.sliding_window}, sliding_window_layers={cfg.sliding_window_layers} give the "
            f"layers windows {ours} but config.json's {keys} give {theirs}"]


def _class_windows(arch: "MoEArchitecture", effective: dict[str, Any], hf: dict[str, Any],
                   num_layers: int) -> list[int | None]:
    if arch.target == "glm4-moe":
        return [None] * num_layers
    if arch.target == "mixtral":
        return [effective.get("sliding_window")] * num_layers
    if arch.target == "qwen3-moe":
        return [effective.get("sliding_window") if effective.get("use_sliding_window") else None] * num_layers
    import transformers

    # Qwen2-MoE's default layer_types (when the file has none) is the class's own rule: ask the class.
    keys = {k: hf[k] for k in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types") if k in hf}
    config = transformers.Qwen2MoeConfig(num_hidden_layers=num_layers, **keys)
    return [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]


def _capped(window: int | None, cfg: ModelConfig) -> int | None:
    return None if window is None or window >= cfg.max_seq_len else window


def _rope_errors(hf: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """The RoPE scaling's parameters, when its type agrees (`check_common` names another type)."""
    unknown: list[str] = []
    try:
        _, theirs = rope_from_hf(rope_dict(hf), hf, unknown)
    except (ValueError, KeyError) as exc:
        return [f"the checkpoint's RoPE scaling ({rope_dict(hf)}) is not one slimtrain computes: {exc}"]
    ours = cfg.rope_scaling
    if unknown or theirs is None or ours is None or theirs.type != ours.type:
        return []
    return [f"model.rope_scaling.{k}={getattr(ours, k)!r} but the checkpoint's RoPE scaling has {getattr(theirs, k)!r}"
            for k in type(ours).model_fields if getattr(ours, k) != getattr(theirs, k)]


def _other_errors(arch: "MoEArchitecture", effective: dict[str, Any], hf: dict[str, Any],
                  cfg: ModelConfig) -> list[str]:
    """GLM's partial RoPE and optional q/k norms."""
    if arch.target != "glm4-moe":
        return []
    wrong = []
    rope = hf.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))  # the class's default
    if factor != 1.0:
        wrong.append(f"partial_rotary_factor={factor}: slimtrain's RoPE rotates the whole head (1.0)")
    if effective.get("use_qk_norm") != cfg.qk_norm:
        wrong.append(f"model.qk_norm={cfg.qk_norm} but use_qk_norm={effective.get('use_qk_norm')}")
    return wrong
