"""Initialise our model from a local Hugging Face checkpoint (continued pretraining)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.export.adapters import get_adapter

# HF config.json key -> (our ModelConfig attribute, how to read it)
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


def read_hf_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards its index lists."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r} holds no model.safetensors(.index.json); "
                          "point it at a directory written by save_pretrained or `slimtrain export`")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state


def check_hf_config(path: Path, cfg: ModelConfig) -> None:
    """Refuse a checkpoint whose shape differs from the recipe's model, naming every mismatch."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r} has no config.json")
    hf = json.loads(config_file.read_text())
    wrong = []
    for hf_key, ours in _MATCH.items():
        theirs, mine = hf.get(hf_key), getattr(cfg, ours)
        if hf_key == "num_key_value_heads" and theirs is None:
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
    if wrong:
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r} does not match the recipe's model: "
                          + "; ".join(wrong) + " — set these model fields to the checkpoint's values")


@torch.no_grad()
def load_hf_into(model: nn.Module, cfg: ModelConfig, path: Path, architecture: str = "llama") -> frozenset[str]:
    """Copy the HF weights into `model` (every parameter of the dense model must be covered); returns the
    names of the tensors it filled."""
    check_hf_config(path, cfg)
    state = get_adapter(architecture).from_hf(read_hf_state(path), cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    # What plugins added to the model is theirs to initialise; every tensor of the dense model must load.
    dense = set(_dense_names(cfg))
    missing = [m for m in missing if m in dense and not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r}: missing {missing}, unexpected {unexpected}")
    return frozenset(state)


def _dense_names(cfg: ModelConfig) -> list[str]:
    from slimtrain.modules.transformer import Transformer

    with torch.device("meta"):
        return list(Transformer(cfg).state_dict())
