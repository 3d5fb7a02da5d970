"""The `moe` plugin's models as Hugging Face MoE classes: which class a config can be, the adapter that maps our
stacked experts to per-expert tensors and back, the config.json, and the check `checkpoint.init_from_hf` runs.

    MixtralForCausalLM   softmax, renormalised top-k, every layer MoE, no shared experts
    Qwen2MoeForCausalLM  softmax otherwise: dense layers (mlp_only_layers), norm_topk_prob false, one shared
                         expert gated by sigmoid(shared_expert_gate(x)); zero q/k/v biases are written
    Glm4MoeForCausalLM   sigmoid router with the selection bias (e_score_correction_bias), expert groups, a
                         routed scaling factor, ungated shared experts, first_k_dense_replace dense layers

On disk every expert is its own three tensors (`experts.{e}.{gate,up,down}_proj.weight`, Mixtral's
`w1/w3/w2`): what transformers' save_pretrained writes by default and what older transformers and vLLM read.
A configuration no class computes exactly is refused with a ValueError naming the option to change.
Attention, norms, embeddings and dense MLPs are named as the Llama adapter names them (`hf_llama`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from slimtrain.modules.hf_adapters import ADAPTERS, Adapter, NameMismatch, StateDict, register_adapter
from slimtrain.modules.transformer import hf_llama
from slimtrain.modules.transformer.config import ModelConfig

from .config import MoEConfig
from .plugin import moe_layer_indices

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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
    "glm4-moe": Layout("Glm4MoeForCausalLM", "Glm4MoeConfig", "mlp", _PROJ, "shared_experts"),
}


# -- the target ------------------------------------------------------------------------------------------------

def choose_target(moe: MoEConfig) -> str:
    """The key of LAYOUTS whose class computes exactly what `moe` computes; a ValueError naming the fix if none."""
    if moe.router == "sigmoid":
        _check_glm(moe)
        return "glm4-moe"
    if moe.routed_scaling_factor != 1:
        raise ValueError(f"moe.routed_scaling_factor={moe.routed_scaling_factor} with router: softmax: no Hugging Face "
                         "class scales softmax routing weights (Mixtral, Qwen2-MoE); set routed_scaling_factor: 1, "
                         "or use router: sigmoid (exported as Glm4MoeForCausalLM)")
    if not moe.num_shared_experts and moe.renormalize and moe.first_k_dense == 0 and moe.every == 1:
        return "mixtral"
    if moe.num_shared_experts and not moe.shared_expert_gate:
        raise ValueError(f"moe.num_shared_experts={moe.num_shared_experts} with shared_expert_gate: false and router: "
                         "softmax: the class for softmax MoE with shared experts (Qwen2MoeForCausalLM) always scales "
                         "its shared expert by a sigmoid gate; set shared_expert_gate: true (or router: sigmoid, "
                         "exported as Glm4MoeForCausalLM with ungated shared experts)")
    return "qwen2-moe"


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


def register_architecture(moe: MoEConfig, model_cfg: ModelConfig) -> str:
    """Register (once) the adapter of `moe`'s target bound to `moe`, and return its name.

    The name encodes the MoE options ("moe-glm4-moe-<12 hex digits>"), so that calling again is free and two
    MoE configurations never share an adapter. Refusals (`choose_target`) are ValueErrors, which the exporter
    and the importer report. The target depends on the MoE options alone; `model_cfg` reaches the adapter
    with every call.
    """
    target = choose_target(moe)
    digest = hashlib.sha256(moe.model_dump_json().encode()).hexdigest()[:12]
    name = f"moe-{target}-{digest}"
    if name not in ADAPTERS:
        arch = MoEArchitecture(moe, target)
        register_adapter(name, Adapter(hf_architecture=arch.layout.hf_class, to_hf=arch.to_hf, from_hf=arch.from_hf,
                                       hf_config=arch.hf_config, check_config=arch.check_config,
                                       keeps_fp32=lambda hf_name: hf_name.endswith(".e_score_correction_bias")))
    return name


# -- the adapter -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoEArchitecture:
    """The adapter of one MoE configuration exported as the class `target` (a key of LAYOUTS)."""

    moe: MoEConfig
    target: str

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.target]

    def width(self, cfg: ModelConfig) -> int:
        """Hidden width of one routed expert."""
        return self.moe.expert_intermediate_size or cfg.intermediate_size

    def names(self, cfg: ModelConfig) -> dict[str, str]:
        """Our name -> HF name of every tensor that maps one to one: the Llama names of everything but the
        MoE layers' MLPs, the routers and the shared experts. Stacked experts and buffers are mapped apart."""
        moe_layers = moe_layer_indices(self.moe, cfg.num_layers)
        dense_mlp = {f"layers.{i}.mlp.{p}.weight" for i in moe_layers for p in _PROJ}
        names = {k: v for k, v in hf_llama.name_map(cfg).items() if k not in dense_mlp}
        lay = self.layout
        for i in moe_layers:
            block = f"model.layers.{i}.{lay.block}"
            names[f"layers.{i}.mlp.router.weight"] = f"{block}.gate.weight"
            if self.moe.num_shared_experts:
                names.update({f"layers.{i}.mlp.shared.{p}.weight": f"{block}.{lay.shared}.{p}.weight" for p in _PROJ})
            if self.moe.num_shared_experts and self.moe.shared_expert_gate:
                names[f"layers.{i}.mlp.shared.gate.weight"] = f"{block}.{lay.shared_gate}.weight"
        return names

    def expert_names(self, cfg: ModelConfig, i: int) -> list[tuple[str, str, str]]:
        """HF names of (gate, up, down) of each expert of MoE layer `i`."""
        prefix = f"model.layers.{i}.{self.layout.block}.experts"
        return [tuple(f"{prefix}.{e}.{p}.weight" for p in self.layout.experts) for e in range(self.moe.num_experts)]

    def to_hf(self, state: StateDict, cfg: ModelConfig) -> StateDict:
        """Our state dict -> HF names. Every expert's tensors are views of our stacked ones (no copies); the
        tensors the class has and our model lacks (zero biases, empty shared experts) are new."""
        names, moe_layers = self.names(cfg), moe_layer_indices(self.moe, cfg.num_layers)
        stacked = {f"layers.{i}.mlp.{t}" for i in moe_layers for t in ("experts.gate_up", "experts.down",
                                                                        "bias_steps", "bias_base")}
        tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
        self._check_names(set(state), set(names) | stacked, tied, "slimtrain")
        _check_tied(state, cfg)
        hf = {names[k]: v for k, v in state.items() if k in names and k not in tied}
        for i in moe_layers:
            ours = f"layers.{i}.mlp."
            hf.update(_split(state[ours + "experts.gate_up"], state[ours + "experts.down"], self.expert_names(cfg, i)))
            hf.update(self._extras(state, cfg, i))
        if self.target == "qwen2-moe":
            hf.update(_zero_qkv_biases(state, cfg))
        return hf

    def _extras(self, state: StateDict, cfg: ModelConfig, i: int) -> StateDict:
        """The tensors of MoE layer `i` that are not ours one to one: GLM's selection bias, empty shared experts."""
        block, lay, extra = f"model.layers.{i}.{self.layout.block}", self.layout, {}
        if self.target == "glm4-moe":
            extra[f"{block}.gate.e_score_correction_bias"] = selection_bias(
                state[f"layers.{i}.mlp.bias_base"], state[f"layers.{i}.mlp.bias_steps"], self.moe.bias_update_rate)
        if lay.shared and not self.moe.num_shared_experts:  # the class always builds them: width 0 computes 0
            like = state["embed.weight"]
            h = cfg.hidden_size
            extra.update({f"{block}.{lay.shared}.{p}.weight": like.new_zeros(shape)
                          for p, shape in zip(_PROJ, [(0, h), (0, h), (h, 0)])})
            if lay.shared_gate:
                extra[f"{block}.{lay.shared_gate}.weight"] = like.new_zeros(1, h)
        return extra

    def from_hf(self, hf_state: StateDict, cfg: ModelConfig) -> StateDict:
        """HF state dict -> our names; the inverse of `to_hf` (the selection bias comes back as `bias_base`)."""
        names, moe_layers = self.names(cfg), moe_layer_indices(self.moe, cfg.num_layers)
        experts = {n for i in moe_layers for e in self.expert_names(cfg, i) for n in e}
        required = set(names.values()) | experts | self._required_extras(cfg)
        optional = self._optional_extras(hf_state, cfg) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
        self._check_names(set(hf_state), required | optional, optional, "Hugging Face")
        to_ours = {hf: ours for ours, hf in names.items()}
        state = {to_ours[k]: v for k, v in hf_state.items() if k in to_ours and k not in optional}
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["embed.weight"]
        for i in moe_layers:
            state.update(self._moe_layer_from_hf(hf_state, cfg, i))
        return state

    def _moe_layer_from_hf(self, hf_state: StateDict, cfg: ModelConfig, i: int) -> StateDict:
        ours = f"layers.{i}.mlp."
        gate_up, down = _stack(hf_state, self.expert_names(cfg, i))
        bias = torch.zeros(self.moe.num_experts, dtype=torch.float32)
        if self.target == "glm4-moe":
            bias = hf_state[f"model.layers.{i}.mlp.gate.e_score_correction_bias"].to(torch.float32).contiguous()
        return {ours + "experts.gate_up": gate_up, ours + "experts.down": down,
                ours + "bias_base": bias.view(torch.int32),  # the bits: an engine's bf16 cast leaves ints alone
                ours + "bias_steps": torch.zeros(bias.shape, dtype=torch.int64)}

    def _required_extras(self, cfg: ModelConfig) -> set[str]:
        if self.target != "glm4-moe":
            return set()
        layers = moe_layer_indices(self.moe, cfg.num_layers)
        return {f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in layers}

    def _optional_extras(self, hf_state: StateDict, cfg: ModelConfig) -> set[str]:
        """HF tensors our model has no use for and that change nothing: zero q/k/v biases, empty shared experts.
        A nonzero bias or a shared expert of nonzero width is a ValueError (the model would compute otherwise)."""
        lay, extra = self.layout, set()
        if self.target == "qwen2-moe":
            extra |= {f"model.layers.{i}.self_attn.{p}.bias" for i in range(cfg.num_layers) for p in _PROJ_QKV}
            _refuse_nonzero(hf_state, extra, "slimtrain's attention has no q/k/v biases", "qkv_bias")
        if lay.shared and not self.moe.num_shared_experts:
            blocks = [f"model.layers.{i}.{lay.block}" for i in moe_layer_indices(self.moe, cfg.num_layers)]
            shared = {f"{b}.{lay.shared}.{p}.weight" for b in blocks for p in _PROJ}
            wide = sorted(n for n in shared if n in hf_state and hf_state[n].numel())
            if wide:
                raise ValueError(f"{wide[0]} has shape {tuple(hf_state[wide[0]].shape)}: the checkpoint has shared "
                                 "experts and moe.num_shared_experts=0; set num_shared_experts to the checkpoint's")
            extra |= shared | ({f"{b}.{lay.shared_gate}.weight" for b in blocks} if lay.shared_gate else set())
        return extra

    def _check_names(self, given: set[str], expected: set[str], optional: set[str], side: str) -> None:
        missing, unexpected = sorted(expected - given - optional), sorted(given - expected)
        if missing or unexpected:
            raise NameMismatch(
                f"the {side} state dict does not match a {self.layout.hf_class} model with this config: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; "
                "parameters a plugin adds must be mapped by that plugin's hf_adapter()",
                missing=missing, unexpected=unexpected)

    def hf_config(self, cfg: ModelConfig, *, bos_id: int | None, eos_id: int | list[int] | None,
                  pad_id: int | None = None, dtype: torch.dtype = torch.float32) -> "PretrainedConfig":
        """The transformers config of the target class, built on the Llama adapter's values."""
        import transformers

        llama = hf_llama.hf_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, dtype=dtype).to_dict()
        common = {k: llama[k] for k in _COMMON_KEYS if k in llama}
        keys = {**common, **self.config_keys(cfg), "architectures": [self.layout.hf_class]}
        config = getattr(transformers, self.layout.config_class)(**keys)
        for key, value in self._written_as_is(cfg).items():  # keys the class folds away or does not declare
            setattr(config, key, value)
        return config

    def config_keys(self, cfg: ModelConfig) -> dict[str, Any]:
        """The target's own config.json keys (those the Llama config lacks or sets otherwise)."""
        m, width = self.moe, self.width(cfg)
        if self.target == "mixtral":  # all layers MoE: its intermediate_size is the experts'
            return dict(intermediate_size=width, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                        sliding_window=None, output_router_logits=False, router_aux_loss_coef=m.aux_loss_weight)
        if self.target == "qwen2-moe":
            moe_layers = set(moe_layer_indices(m, cfg.num_layers))
            # Sparse in transformers: not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0. With a step
            # of 1, mlp_only_layers names our dense layers exactly, whatever first_k_dense and every are.
            dense = [i for i in range(cfg.num_layers) if i not in moe_layers]
            return dict(num_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=width,
                        shared_expert_intermediate_size=m.num_shared_experts * width, norm_topk_prob=m.renormalize,
                        decoder_sparse_step=1, mlp_only_layers=dense, qkv_bias=True, use_sliding_window=False,
                        output_router_logits=False, router_aux_loss_coef=m.aux_loss_weight)
        return dict(n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=width,
                    n_shared_experts=m.num_shared_experts, first_k_dense_replace=m.first_k_dense, n_group=m.n_group,
                    topk_group=m.topk_group, routed_scaling_factor=m.routed_scaling_factor,
                    norm_topk_prob=m.renormalize, use_qk_norm=False, attention_bias=False, num_nextn_predict_layers=0,
                    output_router_logits=False, partial_rotary_factor=1.0,  # the class's default is 0.5
                    rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                                     "partial_rotary_factor": 1.0})

    def _written_as_is(self, cfg: ModelConfig) -> dict[str, Any]:
        # Qwen2-MoE's class reads num_experts; readers that expect num_local_experts (the name Mixtral and
        # Qwen3-MoE's save_pretrained use) find it too. GLM: transformers folds partial_rotary_factor into
        # rope_parameters, and vLLM's glm4_moe reads the top-level key with a default of 0.5: both places.
        if self.target == "qwen2-moe":
            return {"num_local_experts": self.moe.num_experts}
        if self.target == "glm4-moe":
            return {"partial_rotary_factor": 1.0}
        return {}

    def check_config(self, hf: dict[str, Any], cfg: ModelConfig) -> list[str]:
        """Every value of a config.json that our model with `cfg` and these MoE options does not compute."""
        import transformers

        # Absent keys take the installed class's defaults (e.g. Glm4Moe's num_experts_per_tok 8).
        defaults = getattr(transformers, self.layout.config_class)().to_dict()
        effective = {**defaults, **hf}
        dense = len(moe_layer_indices(self.moe, cfg.num_layers)) < cfg.num_layers
        # intermediate_size is the dense MLPs' (Mixtral: the experts'); without dense layers it computes nothing.
        llama_view = {k: v for k, v in hf.items() if k != "intermediate_size" or (dense and self.target != "mixtral")}
        wrong = hf_llama.check_common(llama_view, cfg)
        ours = self.config_keys(cfg)
        for key, field in _MOE_FIELDS[self.target].items():
            theirs = effective.get(key)
            if theirs != ours[key]:
                wrong.append(f"moe.{field}={self._field_value(field, cfg)} but {key}={theirs}")
        return wrong + self._check_computation(effective, hf, cfg)

    def _field_value(self, field: str, cfg: ModelConfig) -> Any:
        if field == "expert_intermediate_size":
            return f"{self.moe.expert_intermediate_size} (expert width {self.width(cfg)})"
        if field == "num_shared_experts":
            return f"{self.moe.num_shared_experts} (shared width {self.moe.num_shared_experts * self.width(cfg)})"
        return getattr(self.moe, field)

    def _check_computation(self, effective: dict[str, Any], hf: dict[str, Any], cfg: ModelConfig) -> list[str]:
        """What else the class may compute unlike ours: Qwen2-MoE's layer pattern, sliding windows, partial
        RoPE, q/k norms."""
        wrong = []
        if self.target == "mixtral" and (hf.get("sliding_window") or cfg.max_seq_len) < cfg.max_seq_len:
            wrong.append(f"sliding_window={hf['sliding_window']}, which slimtrain's attention does not compute "
                         f"(model.max_seq_len={cfg.max_seq_len})")
        if self.target == "qwen2-moe":
            layers = _qwen2_moe_layers(effective, cfg.num_layers)
            if layers != moe_layer_indices(self.moe, cfg.num_layers):
                wrong.append(f"moe.first_k_dense/every={self.moe.first_k_dense}/{self.moe.every} make layers "
                             f"{moe_layer_indices(self.moe, cfg.num_layers)} MoE but decoder_sparse_step="
                             f"{effective.get('decoder_sparse_step')} and mlp_only_layers="
                             f"{effective.get('mlp_only_layers')} make {layers}")
            if effective.get("use_sliding_window"):
                wrong.append("use_sliding_window=True, which slimtrain's attention does not compute")
        if self.target == "glm4-moe":
            rope = hf.get("rope_parameters") or {}
            factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))  # the class's default
            if factor != 1.0:
                wrong.append(f"partial_rotary_factor={factor}: slimtrain's RoPE rotates the whole head (1.0)")
            if effective.get("use_qk_norm"):
                wrong.append("use_qk_norm=True, which slimtrain's attention does not compute")
        return wrong


# config.json key -> the MoE option it must equal, per target (Qwen2-MoE's layer pattern is checked apart).
_MOE_FIELDS = {
    "mixtral": {"num_local_experts": "num_experts", "num_experts_per_tok": "top_k",
                "intermediate_size": "expert_intermediate_size"},
    "qwen2-moe": {"num_experts": "num_experts", "num_experts_per_tok": "top_k",
                  "moe_intermediate_size": "expert_intermediate_size",
                  "shared_expert_intermediate_size": "num_shared_experts", "norm_topk_prob": "renormalize"},
    "glm4-moe": {"n_routed_experts": "num_experts", "num_experts_per_tok": "top_k",
                 "moe_intermediate_size": "expert_intermediate_size", "n_shared_experts": "num_shared_experts",
                 "first_k_dense_replace": "first_k_dense", "n_group": "n_group", "topk_group": "topk_group",
                 "routed_scaling_factor": "routed_scaling_factor", "norm_topk_prob": "renormalize"},
}
# What the Llama config holds that every target takes as is.
_COMMON_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id", "dtype", "torch_dtype")
_PROJ_QKV = ("q_proj", "k_proj", "v_proj")


def _qwen2_moe_layers(effective: dict[str, Any], num_layers: int) -> list[int]:
    """The layers transformers' Qwen2-MoE makes sparse: not in mlp_only_layers and (i + 1) % step == 0."""
    only, step = effective.get("mlp_only_layers") or [], effective.get("decoder_sparse_step") or 1
    if not effective.get("num_experts"):
        return []
    return [i for i in range(num_layers) if i not in only and (i + 1) % step == 0]


# -- tensors ---------------------------------------------------------------------------------------------------

def selection_bias(bias_base: torch.Tensor, bias_steps: torch.Tensor, rate: float) -> torch.Tensor:
    """`MoELayer.selection_bias()` from the two buffers of a state dict, fp32 [E].

    Without updates the imported bits come back as they were (adding 0 would turn a -0.0 into 0.0). A state
    whose integer buffers were cast to float (a consolidation that casts every tensor) holds their values.
    """
    base = (bias_base.to(torch.int32) if bias_base.is_floating_point() else bias_base).contiguous()
    base = base.view(torch.float32)
    if not bool(bias_steps.any()):
        return base
    return base + bias_steps.float() * rate


def _split(gate_up: torch.Tensor, down: torch.Tensor, names: list[tuple[str, str, str]]) -> StateDict:
    """Each expert's (gate, up, down) as views of the stacked [E, 2I, H] and [E, H, I] tensors."""
    inter = down.shape[-1]
    out: StateDict = {}
    for e, (gate, up, dn) in enumerate(names):
        out[gate], out[up], out[dn] = gate_up[e, :inter], gate_up[e, inter:], down[e]
    return out


def _stack(hf_state: StateDict, names: list[tuple[str, str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked gate_up [E, 2I, H] (gate rows then up rows) and down [E, H, I] from per-expert tensors."""
    gate_up = torch.stack([torch.cat([hf_state[gate], hf_state[up]]) for gate, up, _ in names])
    return gate_up, torch.stack([hf_state[dn] for _, _, dn in names])


def _zero_qkv_biases(state: StateDict, cfg: ModelConfig) -> StateDict:
    """Qwen2-MoE's q/k/v biases, zero (vLLM builds them whatever qkv_bias says)."""
    out: StateDict = {}
    for i in range(cfg.num_layers):
        for p in _PROJ_QKV:
            weight = state[f"layers.{i}.attn.{p}.weight"]
            out[f"model.layers.{i}.self_attn.{p}.bias"] = weight.new_zeros(weight.shape[0])
    return out


def _refuse_nonzero(hf_state: StateDict, names: set[str], why: str, key: str) -> None:
    for name in sorted(n for n in names if n in hf_state):
        if bool(hf_state[name].any()):
            raise ValueError(f"{name} is nonzero (max |b| = {float(hf_state[name].abs().max()):.3g}) and {why}: this "
                             f"checkpoint ({key}) cannot be imported exactly; start from a checkpoint without "
                             "attention biases")


def _check_tied(state: StateDict, cfg: ModelConfig) -> None:
    """A tied model's head must be its embedding (as the Llama adapter requires): HF stores only the embedding."""
    if cfg.tie_embeddings and "lm_head.weight" in state:
        head, embed = state["lm_head.weight"], state["embed.weight"]
        if head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed):
            raise ValueError("model.tie_embeddings=true but lm_head.weight differs from embed.weight; the weights "
                             "were untied (e.g. by to_empty) - call model.tie_weights() or set tie_embeddings=false")
