"""The dense decoder as a Hugging Face Llama-family class: tensor names, and the adapters of the four families.

Llama, Mistral, Qwen2 and Qwen3 name their tensors alike (Qwen's biases and q/k norms under the same layer
prefixes), so one mapping serves all four; their config.json differs and lives in `hf_config`.

Our RoPE uses the same "rotate half" layout as HF Llama, so weights map by name only, with no
permutation of q/k rows. With tied embeddings HF stores only `model.embed_tokens.weight`.
Registered as the "llama", "mistral", "qwen2" and "qwen3" adapters when `slimtrain.modules.hf_adapters` is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from slimtrain.modules.hf_adapters import Adapter, NameMismatch, StateDict, get_adapter, register_adapter
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.modules.transformer.hf_config import (  # noqa: F401 - re-exported: callers read configs here
    FAMILIES, rope_dict, check_config, hf_config, model_config_from_hf)

if TYPE_CHECKING:
    from pathlib import Path

HF_ARCHITECTURE = "LlamaForCausalLM"

_GLOBAL_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# Per decoder layer: our suffix after "layers.{i}." -> HF suffix after "model.layers.{i}.".
LAYER_NAMES = {
    "input_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def layer_names(cfg: ModelConfig) -> dict[str, str]:
    """Per decoder layer of `cfg`: our suffix -> the HF suffix, with the options' tensors (biases, q/k norms), which
    Llama, Mistral, Qwen2 and Qwen3 all name alike."""
    names = dict(LAYER_NAMES)
    qkv = ("q", "k", "v") if cfg.qkv_bias else ()
    names.update({f"attn.{p}_proj.bias": f"self_attn.{p}_proj.bias" for p in qkv + (("o",) if cfg.o_bias else ())})
    if cfg.mlp_bias:
        names.update({f"mlp.{p}.bias": f"mlp.{p}.bias" for p in ("gate_proj", "up_proj", "down_proj")})
    if cfg.qk_norm:
        names.update({f"attn.{p}_norm.weight": f"self_attn.{p}_norm.weight" for p in ("q", "k")})
    return names


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Every parameter name of our dense model -> its HF name (the Llama family's names)."""
    names = dict(_GLOBAL_NAMES)
    per_layer = layer_names(cfg)
    for i in range(cfg.num_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{hf}" for ours, hf in per_layer.items()})
    return names


def _check_names(given: set[str], expected: set[str], optional: set[str], side: str) -> None:
    missing = sorted(expected - given - optional)
    unexpected = sorted(given - expected)
    if missing or unexpected:
        raise NameMismatch(
            f"the {side} state dict does not match a Llama model with this config: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; "
            "parameters a plugin adds must be mapped by that plugin's hf_adapter()",
            missing=missing, unexpected=unexpected,
        )


def to_hf(state: StateDict, cfg: ModelConfig) -> StateDict:
    """Our state dict -> `LlamaForCausalLM` names. Tensors are shared, not copied."""
    names = name_map(cfg)
    tied = cfg.tie_embeddings
    _check_names(set(state), set(names), {"lm_head.weight"} if tied else set(), "slimtrain")
    if tied and "lm_head.weight" in state:
        head, embed = state["lm_head.weight"], state["embed.weight"]
        if head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed):
            raise ValueError(
                "model.tie_embeddings=true but lm_head.weight differs from embed.weight; the weights were "
                "untied (e.g. by to_empty) - call model.tie_weights() or set tie_embeddings=false"
            )
    return {names[k]: v for k, v in state.items() if not (tied and k == "lm_head.weight")}


def from_hf(hf_state: StateDict, cfg: ModelConfig) -> StateDict:
    """`LlamaForCausalLM` state dict -> our names; the inverse of `to_hf`."""
    to_ours = {hf: ours for ours, hf in name_map(cfg).items()}
    # HF's own state_dict() lists lm_head.weight even when tied; files written by save_pretrained don't.
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    _check_names(set(hf_state), set(to_ours), optional, "Hugging Face")
    state = {to_ours[k]: v for k, v in hf_state.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


def read_dense_dir(path: "Path | str") -> tuple[ModelConfig, StateDict]:
    """A local directory of a dense family (Llama, Mistral, Qwen2, Qwen3: config.json and .safetensors files) as our
    config and state dict (fp32). A directory of another architecture is refused, naming the supported ones."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} holds no config.json: give a Hugging Face model directory (an export)")
    cfg = model_config_from_hf(json.loads(config.read_text(encoding="utf-8")), str(path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors file")
    hf_state = {k: v.float() for f in files for k, v in load_file(str(f)).items()}
    return cfg, from_hf(hf_state, cfg)


# config.json key -> our ModelConfig field that must equal it for the weights to compute our model.
_MATCH = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "kv_heads",
    "tie_word_embeddings": "tie_embeddings",
    "head_dim": "dim_per_head",
    "rms_norm_eps": "norm_eps",
}


def check_common(hf: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """Every value among the keys all Llama-style classes share (sizes, RoPE, activation, biases) of a config.json
    that our decoder with `cfg` does not compute, one line each: what the MoE classes' checks build on. A dense
    family's own config.json is checked field by field instead (`hf_config.check_config`)."""
    wrong = []
    for hf_key, ours in _MATCH.items():
        theirs, mine = hf.get(hf_key), getattr(cfg, ours)
        if hf_key == "num_key_value_heads" and theirs is None:  # LlamaConfig's default: one per query head
            theirs = hf.get("num_attention_heads")
        if theirs is not None and theirs != mine:
            wrong.append(f"model.{ours}={mine} but {hf_key}={theirs}")
    rope = rope_dict(hf)
    if float(rope["rope_theta"]) != cfg.rope_theta:
        wrong.append(f"model.rope_theta={cfg.rope_theta} but rope_theta={rope['rope_theta']}")
    kind = rope.get("rope_type", "default")
    ours = "default" if cfg.rope_scaling is None else cfg.rope_scaling.type
    if kind != ours:
        wrong.append(f"model.rope_scaling is {ours!r} but the checkpoint's RoPE scaling is {kind!r}")
    plain = {"hidden_act": ("silu", None), "attention_bias": (cfg.qkv_bias, None), "mlp_bias": (cfg.mlp_bias, None)}
    wrong += [f"{key}={hf[key]!r}, which slimtrain's decoder with this model block does not compute"
              for key, ok in plain.items() if key in hf and hf[key] not in ok]
    return wrong


for _name, (_class, _) in FAMILIES.items():
    register_adapter(_name, Adapter(hf_architecture=_class, to_hf=to_hf, from_hf=from_hf, hf_config=hf_config,
                                    check_config=check_config))
LLAMA = get_adapter("llama")
