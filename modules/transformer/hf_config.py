"""config.json <-> `ModelConfig` for the dense families slimtrain imports and exports: Llama (2, 3.x, SmolLM),
Mistral, Qwen2/2.5 and Qwen3.

`model_fields_from_hf` reads what a family's config.json says the model computes (sizes, RoPE and its scaling,
biases, q/k norms, sliding windows) and refuses, naming the key and value, what slimtrain's decoder does not
compute. `hf_config` writes the family's transformers config back. Both spellings of RoPE are read: transformers
5's `rope_parameters` and 4.x's `rope_theta` + `rope_scaling`; the installed version's is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .config import ModelConfig, RopeScaling
from .families import max_window_layers

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# our architecture name -> (the HF model class, its config class)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig"),
    "mistral": ("MistralForCausalLM", "MistralConfig"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
}
FAMILY_OF_CLASS = {cls: name for name, (cls, _) in FAMILIES.items()}
SUPPORTED = ", ".join(cls for cls, _ in FAMILIES.values())

# config.json keys whose value changes what the model computes, and the values slimtrain computes.
_PLAIN = {"hidden_act": ("silu",), "attention_dropout": (0, 0.0, None), "partial_rotary_factor": (1, 1.0, None)}


def family_of(hf: dict[str, Any], where: str) -> str:
    """Our architecture name for a config.json's `architectures`; a ValueError naming the supported classes."""
    arch = hf.get("architectures") or []
    if len(arch) != 1 or arch[0] not in FAMILY_OF_CLASS:
        raise ValueError(f"{where} holds a {arch} model; slimtrain imports {SUPPORTED} (and the MoE classes its moe "
                         "plugin exports)")
    return FAMILY_OF_CLASS[arch[0]]


def model_fields_from_hf(hf: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """The `ModelConfig` fields (as keyword arguments) that a dense family's config.json describes."""
    family = family_of(hf, where)
    wrong = [f"{key}={hf[key]!r}" for key, ok in _PLAIN.items() if key in hf and hf[key] not in ok]
    rope = rope_dict(hf)
    if rope.get("partial_rotary_factor", 1.0) not in (1, 1.0):
        wrong.append(f"rope_parameters.partial_rotary_factor={rope['partial_rotary_factor']!r}")
    theta, scaling = rope_from_hf(rope, hf, wrong)
    if wrong:
        raise ValueError(f"{where}: " + "; ".join(wrong) + " — slimtrain's decoder does not compute "
                         f"{'this' if len(wrong) == 1 else 'these'} (it computes SiLU MLPs, full-width RoPE of type "
                         "default/linear/dynamic/yarn/llama3, no dropout); start from a checkpoint without them")
    heads = hf["num_attention_heads"]
    fields: dict[str, Any] = dict(
        architecture=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=theta, rope_scaling=scaling, norm_eps=hf.get("rms_norm_eps", 1e-6 if family != "llama" else 1e-5),
        max_seq_len=hf.get("max_position_embeddings", 2048), tie_embeddings=hf.get("tie_word_embeddings", False))
    bias = bool(hf.get("attention_bias", False))
    fields.update(qkv_bias=bias or family == "qwen2", o_bias=bias and family in ("llama", "qwen3"),
                  mlp_bias=bool(hf.get("mlp_bias", False)) and family == "llama", qk_norm=family == "qwen3")
    fields.update(_window_from_hf(hf, family))
    return fields


def model_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our model config for a dense family's config.json (what `slimtrain export` writes for a dense model)."""
    return ModelConfig(**model_fields_from_hf(hf, where), attention="sdpa")


def rope_dict(hf: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings in one dict, whichever transformers version wrote the file."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope.pop("type")
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return rope


def rope_from_hf(rope: dict[str, Any], hf: dict[str, Any], wrong: list[str]) -> tuple[float, RopeScaling | None]:
    kind = rope.get("rope_type", "default")
    theta = float(rope["rope_theta"])
    if kind == "default":
        return theta, None
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        wrong.append(f"rope_parameters.rope_type={kind!r}")
        return theta, None
    original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if kind in ("yarn", "llama3") and original is None:  # transformers' default
        original = hf.get("max_position_embeddings")
    factor = rope.get("factor")
    if factor is None and kind == "yarn":  # transformers: the ratio of the context lengths
        factor = hf["max_position_embeddings"] / original
    known = ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate")
    extra = {k: rope[k] for k in known if rope.get(k) is not None}
    return theta, RopeScaling(type=kind, factor=factor, original_max_seq_len=original, **extra)


def _window_from_hf(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """sliding_window and sliding_window_layers as each family's class reads them."""
    window = hf.get("sliding_window")
    if family == "llama" or window is None:
        return {}
    if family == "mistral":
        return {"sliding_window": window}
    types = hf.get("layer_types")
    if types is not None:  # transformers 5 writes the pattern out
        layers = [i for i, t in enumerate(types) if t == "sliding_attention"]
    elif hf.get("use_sliding_window"):
        layers = list(range(hf.get("max_window_layers", 28), hf["num_hidden_layers"]))
    else:
        layers = []
    if not layers or (types is None and not hf.get("use_sliding_window")):
        return {}
    return {"sliding_window": window, "sliding_window_layers": layers}


def _new_transformers() -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("5.0.0.dev0")


def rope_keys(cfg: ModelConfig) -> dict[str, Any]:
    """The RoPE keys of `cfg` as the installed transformers spells them."""
    params: dict[str, Any] = {"rope_type": "default"}
    s = cfg.rope_scaling
    if s is not None:
        params = {"rope_type": s.type, "factor": s.factor}
        if s.original_max_seq_len is not None:
            params["original_max_position_embeddings"] = s.original_max_seq_len
        if s.type == "llama3":
            params.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.type == "yarn":
            params.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
            params.update({k: v for k in ("attention_factor", "mscale", "mscale_all_dim")
                           if (v := getattr(s, k)) is not None})
    if _new_transformers():
        return {"rope_parameters": {**params, "rope_theta": cfg.rope_theta}}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": None if s is None else params}


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, object]:
    import transformers
    from packaging.version import Version

    # transformers renamed `torch_dtype` to `dtype` in 4.56; the old name is deprecated since.
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: str(dtype).removeprefix("torch.")}


def family_keys(cfg: ModelConfig) -> dict[str, Any]:
    """The keys that differ between the families: biases, sliding windows."""
    family = cfg.architecture
    if family == "llama":
        return {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}
    if family == "mistral":
        return {"sliding_window": cfg.sliding_window}
    keys: dict[str, Any] = {"use_sliding_window": cfg.sliding_window is not None,
                            "sliding_window": cfg.sliding_window, "max_window_layers": max_window_layers(cfg)}
    if cfg.sliding_window is not None:
        keys["layer_types"] = ["sliding_attention" if cfg.window_of(i) else "full_attention"
                               for i in range(cfg.num_layers)]
    if family == "qwen3":
        keys["attention_bias"] = cfg.qkv_bias
    return keys


def hf_config(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | list[int] | None, pad_id: int | None = None,
              dtype: torch.dtype = torch.float32) -> "PretrainedConfig":
    """The transformers config of `cfg`'s family; `dtype` is the dtype the weights are saved in."""
    import transformers

    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is None; resolve it from the tokenizer before exporting")
    model_class, config_class = FAMILIES[cfg.architecture]
    return getattr(transformers, config_class)(
        architectures=[model_class], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
        hidden_act="silu", max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=bos_id,
        eos_token_id=eos_id, pad_token_id=pad_id, **rope_keys(cfg), **family_keys(cfg), **_dtype_kwarg(dtype))


# Our fields a config.json must agree with for the weights to compute our model (the rest are how we train), with
# the config.json keys they come from.
COMPUTED = {"architecture": "architectures", "vocab_size": "vocab_size", "hidden_size": "hidden_size",
            "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
            "rope_theta": "rope_theta", "rope_scaling": "rope_parameters", "norm_eps": "rms_norm_eps",
            "tie_embeddings": "tie_word_embeddings", "qkv_bias": "attention_bias", "o_bias": "attention_bias",
            "mlp_bias": "mlp_bias", "qk_norm": "(the class)", "sliding_window": "sliding_window",
            "sliding_window_layers": "layer_types / max_window_layers",
            # the context the checkpoint declares; a shorter training length is data.seq_len's
            "max_seq_len": "max_position_embeddings"}


def differences(theirs: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """`model.FIELD=ours but config.json's KEY gives theirs` for each computed field of `cfg` that differs from
    `theirs` (fields as `model_fields_from_hf` gives them)."""
    ours = _normalised(cfg.model_dump())
    other = _normalised(ModelConfig(**theirs).model_dump())
    return [f"model.{f}={ours[f]!r} but config.json's {key} gives {other[f]!r}"
            for f, key in COMPUTED.items() if ours[f] != other[f]]


def _normalised(fields: dict[str, Any]) -> dict[str, Any]:
    fields = dict(fields)
    fields["num_kv_heads"] = fields["num_kv_heads"] or fields["num_heads"]
    fields["head_dim"] = fields["head_dim"] or fields["hidden_size"] // fields["num_heads"]
    if fields["sliding_window"] is not None and fields["sliding_window_layers"] is None:
        fields["sliding_window_layers"] = list(range(fields["num_layers"]))
    return fields


def check_config(hf: dict[str, Any], cfg: ModelConfig) -> list[str]:
    """Every value of a dense family's config.json that our decoder with `cfg` does not compute, one line each."""
    try:
        theirs = model_fields_from_hf(hf)
    except (ValueError, KeyError) as exc:
        return [str(exc)]
    return differences(theirs, cfg)
