"""The dense decoder as Hugging Face `LlamaForCausalLM`: parameter names, config, and the config check.

Our RoPE uses the same "rotate half" layout as HF Llama, so weights map by name only, with no
permutation of q/k rows. With tied embeddings HF stores only `model.embed_tokens.weight`.
Registered as the "llama" architecture adapter when `slimtrain.modules.hf_adapters` is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from slimtrain.modules.hf_adapters import Adapter, NameMismatch, StateDict, register_adapter
from slimtrain.modules.transformer.config import ModelConfig

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import LlamaConfig

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


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Every parameter name of our dense model -> its HF Llama name."""
    names = dict(_GLOBAL_NAMES)
    for i in range(cfg.num_layers):
        names.update({f"layers.{i}.{ours}": f"model.layers.{i}.{hf}" for ours, hf in LAYER_NAMES.items()})
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


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our model config for a `LlamaForCausalLM` config.json (what `slimtrain export` writes for a dense model)."""
    rope = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                       intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                       num_heads=hf["num_attention_heads"], num_kv_heads=hf.get("num_key_value_heads"),
                       head_dim=hf.get("head_dim"), rope_theta=rope, norm_eps=hf.get("rms_norm_eps", 1e-5),
                       max_seq_len=hf.get("max_position_embeddings", 2048),
                       tie_embeddings=hf.get("tie_word_embeddings", False), attention="sdpa")


def read_llama_dir(path: "Path | str") -> tuple[ModelConfig, StateDict]:
    """A local `LlamaForCausalLM` directory (config.json and .safetensors files) as our config and state dict
    (fp32). A directory of another architecture is refused, naming it."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path} holds no config.json: give a Hugging Face model directory (an export)")
    hf = json.loads(config.read_text(encoding="utf-8"))
    if hf.get("architectures") != [HF_ARCHITECTURE]:
        raise ValueError(f"{path} holds a {hf.get('architectures')} model; a {HF_ARCHITECTURE} directory is needed")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors file")
    cfg = model_config_from_hf(hf)
    hf_state = {k: v.float() for f in files for k, v in load_file(str(f)).items()}
    return cfg, from_hf(hf_state, cfg)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, object]:
    import transformers
    from packaging.version import Version

    # transformers renamed `torch_dtype` to `dtype` in 4.56; the old name is deprecated since.
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: str(dtype).removeprefix("torch.")}


def hf_config(
    cfg: ModelConfig,
    *,
    bos_id: int | None,
    eos_id: int | list[int] | None,
    pad_id: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> "LlamaConfig":
    """The `LlamaConfig` of our model; `dtype` is the dtype the weights are saved in."""
    from transformers import LlamaConfig

    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is None; resolve it from the tokenizer before exporting")
    return LlamaConfig(
        architectures=[HF_ARCHITECTURE],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_per_head,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,  # transformers 5 folds it into rope_parameters
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **_dtype_kwarg(dtype),
    )


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
# What our decoder computes and a Llama-family config may say otherwise: the weights would load into a
# model that computes something else (e.g. Llama 3's `llama3` RoPE scaling, theta 500000).
_PLAIN = {"hidden_act": ("silu", None), "attention_bias": (False, None), "mlp_bias": (False, None)}


def check_config(hf: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """Every value of a Llama-family config.json that our decoder with `cfg` does not compute, one line each."""
    wrong = []
    for hf_key, ours in _MATCH.items():
        theirs, mine = hf.get(hf_key), getattr(cfg, ours)
        if hf_key == "num_key_value_heads" and theirs is None:  # LlamaConfig's default: one per query head
            theirs = hf.get("num_attention_heads")
        if theirs is not None and theirs != mine:
            wrong.append(f"model.{ours}={mine} but {hf_key}={theirs}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta"))
    if theta is not None and float(theta) != cfg.rope_theta:
        wrong.append(f"model.rope_theta={cfg.rope_theta} but rope_theta={theta}")
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        wrong.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}, which slimtrain's decoder does "
                     "not compute (plain RoPE only)")
    wrong += [f"{key}={hf[key]!r}, which slimtrain's decoder does not compute" for key, ok in _PLAIN.items()
              if key in hf and hf[key] not in ok]
    return wrong


LLAMA = register_adapter("llama", Adapter(hf_architecture=HF_ARCHITECTURE, to_hf=to_hf, from_hf=from_hf,
                                          hf_config=hf_config, check_config=check_config))
