"""Serving exports of the draft heads, each a variant directory beside the plain Hugging Face export, and their
reload into our speculative decoder (`load_heads`).

    mtp/      the whole model with MTP module k as decoder layer num_hidden_layers + k (DeepSeek-V3 / GLM-4.5
              layout: enorm, hnorm, eh_proj, the block, shared_head.norm, shared_head.head), config
              num_nextn_predict_layers: vLLM's `mtp` method, transformers' `generate(use_mtp=True)`. The class is the
              plain export's (the base's family, or its MoE class); the appended layers carry the family's biases
              and q/k norms, and attend fully (mtp.py), which `mtp_layer_types` states where the config has types.
    eagle3/   the draft alone in the `speculators` format vLLM loads (method `eagle3`).
    medusa/   the heads alone in the legacy Medusa layout (TGI, TensorRT-LLM, older vLLM).
    hydra/    the heads alone in our own layout (no serving engine loads Hydra).

The plain directory holds the base model only: the heads' tensors leave `ExportContext.state` here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from slimtrain.modules.plugin import ExportContext, ExportVariant, StateDict
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.modules.transformer.hf_config import FAMILIES, rope_keys
from slimtrain.modules.transformer.hf_llama import layer_names

from .config import DraftConfig

PREFIX = "draft."
SPECULATORS_VERSION = "0.9.0"  # the speculators release whose format these files follow (docs/draft.md)
EAGLE3_LAYER = {  # our names inside the EAGLE-3 head -> speculators' (llama first layer)
    "layer.hidden_norm.weight": "layers.0.hidden_norm.weight",
    "layer.input_layernorm.weight": "layers.0.input_layernorm.weight",
    "layer.post_attention_layernorm.weight": "layers.0.post_attention_layernorm.weight",
    **{f"layer.self_attn.{p}_proj.weight": f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"},
    **{f"layer.mlp.{p}_proj.weight": f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")},
    "fc.weight": "fc.weight", "norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight",
    "d2t": "d2t", "t2d": "t2d",
}
README = {
    "mtp": "**mtp/**: the model with its multi-token-prediction modules as decoder layers num_hidden_layers + k "
           "(DeepSeek-V3 layout, `num_nextn_predict_layers` in config.json). vLLM: `--speculative-config "
           "'{\"method\": \"mtp\", \"num_speculative_tokens\": D}'`; transformers: `generate(use_mtp=True)` once the "
           "model class lists the MTP layers in `_keys_to_ignore_on_load_unexpected` (the dense Llama, Mistral and "
           "Qwen classes do not). The MTP layers attend fully, whatever sliding window the model's layers use.",
    "eagle3": "**eagle3/**: the EAGLE-3 draft in the `speculators` format. vLLM: `--speculative-config "
              "'{\"model\": \"<this directory>\", \"method\": \"eagle3\", \"num_speculative_tokens\": K}'` with the "
              "parent directory as the target model; `verifier.name_or_path` is `..` (set it to the base model's "
              "path for tools that reload the verifier).",
    "medusa": "**medusa/**: Medusa heads in the legacy layout (`blocks.{i}.layers.{j}`, `lm_heads.{i}`) that TGI and "
              "TensorRT-LLM read; vLLM dropped Medusa.",
    "hydra": "**hydra/**: Hydra heads in slimtrain's own layout (config.json says which tensor is which); no serving "
             "engine loads Hydra: `slimtrain.modules.draft.export.load_heads` reads it into our speculative decoder.",
}


def _mtp_names(k: int, first: int) -> dict[str, str]:
    """MTP module k's own tensors (not its block's): our name inside the mtp head -> the name on disk (decoder
    layer first + k). The block is written as the model's own layer first + k (`ExportVariant.appended_layers`)."""
    hf = f"model.layers.{first + k}."
    names = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
             "norm.weight": "shared_head.norm.weight"}
    return {f"depths.{k}.{a}": hf + b for a, b in names.items()}


def _mtp_blocks(own: StateDict, depth: int, first: int) -> StateDict:
    """The MTP blocks' tensors under the names of the model's layers first + k."""
    out = {}
    for k in range(depth):
        prefix = f"depths.{k}.block."
        out.update({f"layers.{first + k}.{n.removeprefix(prefix)}": t for n, t in own.items() if n.startswith(prefix)})
    return out


def export_draft(cfg: DraftConfig, ctx: ExportContext) -> None:
    """Take the heads out of the plain export and add one variant per head kind."""
    heads = {n: ctx.state.pop(n) for n in [n for n in ctx.state if n.startswith(PREFIX)]}
    builders: dict[str, Callable[[StateDict, ExportContext, Any], ExportVariant | None]] = {
        "mtp": _mtp_variant, "eagle3": _eagle3_variant, "medusa": _medusa_variant, "hydra": _hydra_variant}
    for head in cfg.heads:
        own = {n.removeprefix(f"{PREFIX}{head.kind}."): t for n, t in heads.items() if n.startswith(f"{PREFIX}{head.kind}.")}
        variant = builders[head.kind](own, ctx, head)
        if variant is not None:
            ctx.variants.append(variant)
            ctx.notes.append(f"draft heads: {head.kind}/ holds the {head.kind} variant (see its README)")


def _cast(tensors: StateDict, like: torch.Tensor) -> StateDict:
    """Float tensors in the export's dtype (integer and boolean ones as they are), never sharing memory."""
    return {k: (v.to(like.dtype) if v.is_floating_point() else v).clone() for k, v in tensors.items()}


def _head_weight(hf_state: StateDict) -> torch.Tensor:
    return hf_state.get("lm_head.weight", hf_state["model.embed_tokens.weight"])


# Families whose transformers config has per-layer `layer_types`: transformers' `MtpModel` then needs
# `mtp_layer_types` (it refuses the config without), and reads the MTP layers' attention from it.
_TYPED_LAYERS = ("qwen2", "qwen3")


def mtp_config(cfg: ModelConfig, depth: int) -> dict[str, Any]:
    """The keys the mtp/ variant adds to the plain export's config.json for `depth` MTP layers."""
    keys: dict[str, Any] = {"num_nextn_predict_layers": depth, "num_mtp_layers": depth}
    if cfg.architecture in _TYPED_LAYERS:
        keys["mtp_layer_types"] = ["full_attention"] * depth  # as the blocks trained (mtp.MTP_WINDOW)
    return keys


def mtp_window_note(cfg: ModelConfig) -> str | None:
    """What a reader of the mtp/ variant of a Mistral model must know when its sliding window binds, else None.

    MistralConfig (and MixtralConfig) has no per-layer types: transformers' `MtpModel` masks the MTP layers fully (its documented rule,
    what the blocks trained with), but its flash-attention path also hands every attention the config's
    `sliding_window`, so it would slide them."""
    w = cfg.sliding_window
    if cfg.architecture != "mistral" or w is None or w >= cfg.max_seq_len:
        return None
    return (f"draft heads: mtp/'s MTP layers attend fully as trained, but the Mistral family's config (Mistral, or "
            f"Mixtral for an MoE) has one model.sliding_window={w} for every layer: load mtp/ in transformers with "
            f"attn_implementation eager or sdpa (flash-attention would slide the MTP layers over contexts longer than "
            f"{w} tokens)")


def _mtp_variant(own: StateDict, ctx: ExportContext, head) -> ExportVariant:
    first = ctx.model_cfg.num_layers
    note = mtp_window_note(ctx.model_cfg)
    if note is not None:
        ctx.notes.append(note)

    def tensors(hf_state: StateDict, hf_to_ours: dict[str, str]) -> StateDict:
        out = dict(hf_state)  # the model, and the blocks as its layers first + k (an MoE block as its MoE layers)
        like = hf_state["model.norm.weight"]
        for k in range(head.depth):
            out.update(_cast({disk: own[ours] for ours, disk in _mtp_names(k, first).items()}, like))
            out[f"model.layers.{first + k}.shared_head.head.weight"] = _head_weight(hf_state).clone()
        return out

    keys = mtp_config(ctx.model_cfg, head.depth)
    return ExportVariant("mtp", tensors, lambda _: keys, README["mtp"] + (f"\n\n{note}" if note else ""),
                         appended_layers=_mtp_blocks(own, head.depth, first))


def _eagle3_variant(own: StateDict, ctx: ExportContext, head) -> ExportVariant:
    cfg = ctx.model_cfg
    layers = list(ctx.model.draft["eagle3"].aux_layers)
    draft_vocab = own["lm_head.weight"].shape[0]
    # The plain export's class: the family's for a dense base (an MoE base's class is its MoE plugin's choice).
    verifier = [FAMILIES[cfg.architecture][0]] if type(ctx.model.layers[-1].mlp).__name__ == "MLP" else []

    def tensors(hf_state: StateDict, hf_to_ours: dict[str, str]) -> StateDict:
        out = _cast({b: own[a] for a, b in EAGLE3_LAYER.items()}, hf_state["model.norm.weight"])
        out["d2t"], out["t2d"] = out["d2t"].to(torch.int64), out["t2d"].bool()
        out["embed_tokens.weight"] = hf_state["model.embed_tokens.weight"].clone()
        return out

    def config(hf_to_ours: dict[str, str]) -> dict[str, Any]:
        layer = {"model_type": "llama", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                 "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
                 "head_dim": cfg.dim_per_head, "num_hidden_layers": 1, "rms_norm_eps": cfg.norm_eps,
                 **eagle3_rope(cfg), "max_position_embeddings": cfg.max_seq_len,
                 "vocab_size": cfg.vocab_size, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                 "tie_word_embeddings": False}
        return {"architectures": ["Eagle3DraftModel"], "speculators_model_type": "eagle3",
                "speculators_version": SPECULATORS_VERSION, "draft_vocab_size": draft_vocab,
                "norm_before_residual": False, "norm_before_fc": False, "fc_norm": False, "norm_output": False,
                "target_hidden_size": cfg.hidden_size, "eagle_aux_hidden_state_layer_ids": layers,
                "embed_requires_grad": False, "transformer_layer_config": layer,
                "speculators_config": {
                    "algorithm": "eagle3", "default_proposal_method": "greedy",
                    "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": head.steps,
                                          "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                    "verifier": {"name_or_path": "..", "architectures": verifier}}}

    return ExportVariant("eagle3", tensors, config, README["eagle3"], standalone=True)


def eagle3_rope(cfg: ModelConfig) -> dict[str, Any]:
    """The EAGLE-3 layer's RoPE keys (`transformer_layer_config`): the base's theta and scaling, which the layer
    trained with, in transformers 4's spelling (`rope_theta`, `rope_scaling`: what the speculators releases and vLLM
    read; transformers 5's LlamaConfig reads it too)."""
    keys = rope_keys(cfg)  # the installed transformers' spelling, converted
    params = dict(keys.get("rope_parameters") or keys.get("rope_scaling") or {})
    params.pop("rope_theta", None)
    return {"rope_theta": cfg.rope_theta,
            "rope_scaling": None if params.get("rope_type", "default") == "default" else params}


def _check_eagle3_rope(config: dict[str, Any], cfg: ModelConfig, directory: Path) -> None:
    """An EAGLE-3 directory's RoPE must be the base's: the layer is rebuilt with the base's (`rope_for`)."""
    layer = config.get("transformer_layer_config", {})
    written = layer.get("rope_scaling") or {}
    ours = eagle3_rope(cfg)["rope_scaling"] or {}
    theirs = (float(layer.get("rope_theta", cfg.rope_theta)), written.get("rope_type", written.get("type", "default")),
              written.get("factor"))
    want = (cfg.rope_theta, ours.get("rope_type", "default"), ours.get("factor"))
    if theirs != want:
        raise ValueError(f"{directory}/config.json: transformer_layer_config's RoPE (theta, type, factor) = {theirs} "
                         f"but the base model's is {want} (model.rope_theta, model.rope_scaling); load the heads onto "
                         "the base they were exported with")


def _medusa_variant(own: StateDict, ctx: ExportContext, head) -> ExportVariant:
    cfg = ctx.model_cfg

    def tensors(hf_state: StateDict, hf_to_ours: dict[str, str]) -> StateDict:
        names = {}
        for i in range(head.num_heads):
            names[f"lm_heads.{i}.weight"] = f"lm_heads.{i}.weight"
            for j in range(head.num_layers):
                for p in ("weight", "bias"):
                    names[f"blocks.{i}.{j}.linear.{p}"] = f"blocks.{i}.layers.{j}.{p}"
        return _cast({b: own[a] for a, b in names.items()}, hf_state["model.norm.weight"])

    return ExportVariant("medusa", tensors, lambda _: {
        "model_type": "medusa", "architectures": ["MedusaModel"], "num_heads": head.num_heads,
        "num_hidden_layers": head.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "truncated_vocab_size": None, "medusa_fc_bias": True, "original_lm_head": False}, README["medusa"],
        standalone=True)


def _hydra_variant(own: StateDict, ctx: ExportContext, head) -> ExportVariant:
    cfg = ctx.model_cfg

    def tensors(hf_state: StateDict, hf_to_ours: dict[str, str]) -> StateDict:
        return _cast({f"heads.{n}": t for n, t in own.items()}, hf_state["model.norm.weight"])

    return ExportVariant("hydra", tensors, lambda _: {
        "model_type": "slimtrain_hydra", "num_heads": head.num_heads, "num_layers": head.num_layers,
        "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "layout": "heads.blocks.{k}.{j}: residual blocks of head k (block 0 reads [hidden, embed(t+1), ..., "
                  "embed(t+k+1)], (k+2)H wide, with `residual` projecting it to H); heads.lm_heads.{k}: its "
                  "vocabulary projection; ResBlock(x) = residual(x) + silu(linear(x))"}, README["hydra"],
        standalone=True)


def _mtp_blocks_from_disk(state: StateDict, depth: int, cfg: Any, from_hf: FromHF | None) -> StateDict:
    """The MTP blocks (decoder layers num_layers + k on disk) under our names inside the mtp head."""
    first = cfg.num_layers
    if from_hf is None:
        return {f"depths.{k}.block.{a}": state[f"model.layers.{first + k}.{b}"]
                for k in range(depth) for a, b in layer_names(cfg).items()}
    # The whole file read as a model `depth` layers deeper, less what only MTP layers have.
    mtp_only = {b for k in range(depth) for b in _mtp_names(k, first).values()}
    mtp_only |= {f"model.layers.{first + k}.shared_head.head.weight" for k in range(depth)}
    mapped = from_hf({n: t for n, t in state.items() if n not in mtp_only},
                     cfg.model_copy(update={"num_layers": first + depth}))
    out = {}
    for name, tensor in mapped.items():
        parts = name.split(".", 2)
        if parts[0] == "layers" and int(parts[1]) >= first:
            out[f"depths.{int(parts[1]) - first}.block.{parts[2]}"] = tensor
    return out


# -- reload ------------------------------------------------------------------------------------------------


def read_safetensors(directory: Path) -> StateDict:
    """Every tensor of an HF directory (one file or shards)."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors file; point at a variant directory of an export")
    state: StateDict = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


FromHF = Callable[[StateDict, Any], StateDict]  # (HF state dict, our model config) -> our names: an export's mapping


def load_heads(directory: Path | str, kind: str, model: nn.Module, from_hf: FromHF | None = None) -> nn.Module:
    """A variant directory's heads as our module for `model` (the base, e.g. imported from the plain export), in
    the base's dtype and device, ready for `SpeculativeDecoder`. `from_hf`: the model's mapping from HF names
    (`trainer.export.mapping.ModelAdapters.from_hf`), which reads MTP blocks that are not dense layers (an MoE
    base's); None: the dense families' names (`layer_names`: biases and q/k norms as `model.cfg` has them)."""
    from .plugin import head_module

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    state = read_safetensors(directory)
    cfg = model.cfg
    if kind == "mtp":
        depth = int(config["num_nextn_predict_layers"])
        module = head_module({"kind": "mtp", "depth": depth}, cfg, model)
        ours = {a: state[b] for k in range(depth) for a, b in _mtp_names(k, cfg.num_layers).items()}
        ours.update(_mtp_blocks_from_disk(state, depth, cfg, from_hf))
    elif kind == "eagle3":
        _check_eagle3_rope(config, cfg, directory)
        module = head_module({"kind": "eagle3", "layers": config["eagle_aux_hidden_state_layer_ids"],
                              "steps": config["speculators_config"]["proposal_methods"][0]["speculative_tokens"],
                              "draft_vocab_size": config["draft_vocab_size"]}, cfg)
        ours = {a: state[b] for a, b in EAGLE3_LAYER.items()}
    elif kind == "medusa":
        module = head_module({"kind": "medusa", "num_heads": config["num_heads"],
                              "num_layers": config["num_hidden_layers"]}, cfg)
        ours = {}
        for i in range(config["num_heads"]):
            ours[f"lm_heads.{i}.weight"] = state[f"lm_heads.{i}.weight"]
            for j in range(config["num_hidden_layers"]):
                for p in ("weight", "bias"):
                    ours[f"blocks.{i}.{j}.linear.{p}"] = state[f"blocks.{i}.layers.{j}.{p}"]
    elif kind == "hydra":
        module = head_module({"kind": "hydra", "num_heads": config["num_heads"], "num_layers": config["num_layers"]},
                             cfg)
        ours = {n.removeprefix("heads."): t for n, t in state.items()}
    else:
        raise ValueError(f"unknown head kind {kind!r}; choose mtp, eagle3, medusa or hydra")
    weight = model.lm_head.weight
    module.load_state_dict(ours, strict=True)
    return module.to(device=weight.device, dtype=weight.dtype)
