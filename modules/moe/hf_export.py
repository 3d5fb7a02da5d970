"""The `moe` plugin's models as Hugging Face MoE classes: the adapter that maps our stacked experts to per-expert
tensors and back, the config.json, and the check `checkpoint.init_from_hf` runs. Which class a model becomes (its
family and MoE options choose it) is `hf_targets`:

    MixtralForCausalLM   softmax, renormalised top-k, every layer MoE, no shared experts; Mistral's sliding window
    Qwen2MoeForCausalLM  softmax otherwise: dense layers (mlp_only_layers), norm_topk_prob, one shared expert gated
                         by sigmoid(shared_expert_gate(x)); the model's q/k/v biases (zeros when it has none) and
                         sliding-window layers (layer_types)
    Qwen3MoeForCausalLM  softmax, dense layers (mlp_only_layers), norm_topk_prob, no shared experts; q/k norms,
                         attention_bias, a sliding window on every layer
    Glm4MoeForCausalLM   sigmoid router with the selection bias (e_score_correction_bias), expert groups, a
                         routed scaling factor, ungated shared experts, first_k_dense_replace dense layers

On disk every expert is its own three tensors (`experts.{e}.{gate,up,down}_proj.weight`, Mixtral's
`w1/w3/w2`): what transformers' save_pretrained writes by default and what older transformers and vLLM read.
A configuration no class computes exactly is refused with a ValueError naming the option to change.
Attention, norms, embeddings and dense MLPs are named as the dense families name them (`hf_llama`); RoPE and its
scaling are written as the dense family writes them (`hf_config.rope_keys`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from slimtrain.modules.hf_adapters import ADAPTERS, Adapter, NameMismatch, StateDict, register_adapter
from slimtrain.modules.transformer import hf_llama
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.modules.transformer.families import max_window_layers
from slimtrain.modules.transformer.hf_config import rope_keys

from .config import MoEConfig
from .hf_checks import config_errors
from .hf_targets import LAYOUTS, Layout, choose_target  # noqa: F401 - re-exported: callers choose targets here
from .plugin import moe_layer_indices

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_PROJ = ("gate_proj", "up_proj", "down_proj")


# -- the target ------------------------------------------------------------------------------------------------

def register_architecture(moe: MoEConfig, model_cfg: ModelConfig) -> str:
    """Register (once) the adapter of `moe`'s target on the dense model `model_cfg`, bound to `moe`, and return
    its name.

    The name encodes the target and the MoE options ("moe-glm4-moe-<12 hex digits>"), so that calling again is
    free and two MoE configurations never share an adapter. Refusals (`choose_target`: MoE options or model options
    the family's MoE class does not compute) are ValueErrors, which the exporter and the importer report. The
    adapter depends on the target and the MoE options alone; `model_cfg` (biases, windows) reaches it with every
    call.
    """
    target = choose_target(moe, model_cfg)
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
        """Our name -> HF name of every tensor that maps one to one: the dense family's names (biases and q/k
        norms included) of everything but the MoE layers' MLPs, the routers and the shared experts. Stacked experts
        and buffers are mapped apart."""
        moe_layers = moe_layer_indices(self.moe, cfg.num_layers)
        replaced = tuple(f"layers.{i}.mlp." for i in moe_layers)  # the dense MLP's weights and biases went
        names = {k: v for k, v in hf_llama.name_map(cfg).items() if not k.startswith(replaced)}
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
        tensors the class has and our model lacks (Qwen2-MoE's zero q/k/v biases, empty shared experts) are new."""
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
        if self.target == "qwen2-moe" and not cfg.qkv_bias:
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
        """HF tensors our model has no use for and that change nothing: zero q/k/v biases (a model without
        them), empty shared experts. A nonzero bias or a shared expert of nonzero width is a ValueError (the model
        would compute otherwise)."""
        lay, extra = self.layout, set()
        if self.target == "qwen2-moe" and not cfg.qkv_bias:
            extra |= {f"model.layers.{i}.self_attn.{p}.bias" for i in range(cfg.num_layers) for p in _PROJ_QKV}
            _refuse_nonzero(hf_state, extra)
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
        """The transformers config of the target class, built on the dense family's values and RoPE keys."""
        import transformers

        family = hf_llama.hf_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, dtype=dtype).to_dict()
        common = {k: family[k] for k in _COMMON_KEYS if k in family}
        keys = {**common, **self._rope_keys(cfg), **self.config_keys(cfg), "architectures": [self.layout.hf_class]}
        config = getattr(transformers, self.layout.config_class)(**keys)
        aliases = getattr(config, "attribute_map", {})
        for key, value in self._written_as_is(cfg).items():  # keys the class folds away or does not declare
            if key in aliases:  # setattr would write the name the alias points to: the file gets both names
                config.__dict__[key] = value
            else:
                setattr(config, key, value)
        return config

    def _rope_keys(self, cfg: ModelConfig) -> dict[str, Any]:
        """RoPE and its scaling as the installed transformers spells them; GLM's rotates the whole head."""
        keys = rope_keys(cfg)
        if self.target == "glm4-moe" and "rope_parameters" in keys:  # the class's default factor is 0.5
            keys["rope_parameters"] = {**keys["rope_parameters"], "partial_rotary_factor": 1.0}
        return keys

    def config_keys(self, cfg: ModelConfig) -> dict[str, Any]:
        """The target's own config.json keys (those the dense family's config lacks or sets otherwise)."""
        m, width = self.moe, self.width(cfg)
        if self.target == "mixtral":  # all layers MoE: its intermediate_size is the experts'
            return dict(intermediate_size=width, num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
                        output_router_logits=False, router_aux_loss_coef=m.aux_loss_weight, **self._window_keys(cfg))
        if self.target == "qwen2-moe":  # q/k/v biases always (zeros for a model without): vLLM builds them anyway
            return dict(self._qwen_keys(cfg), shared_expert_intermediate_size=m.num_shared_experts * width,
                        qkv_bias=True)
        if self.target == "qwen3-moe":
            return dict(self._qwen_keys(cfg), attention_bias=cfg.qkv_bias)
        return dict(n_routed_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=width,
                    n_shared_experts=m.num_shared_experts, first_k_dense_replace=m.first_k_dense, n_group=m.n_group,
                    topk_group=m.topk_group, routed_scaling_factor=m.routed_scaling_factor,
                    norm_topk_prob=m.renormalize, use_qk_norm=False, attention_bias=cfg.qkv_bias,
                    num_nextn_predict_layers=0, output_router_logits=False,
                    partial_rotary_factor=1.0)  # the class's default is 0.5

    def _qwen_keys(self, cfg: ModelConfig) -> dict[str, Any]:
        """What Qwen2-MoE and Qwen3-MoE share: experts, their layers, the window."""
        m, moe_layers = self.moe, set(moe_layer_indices(self.moe, cfg.num_layers))
        # Sparse in transformers: not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0. With a step of 1,
        # mlp_only_layers names our dense layers exactly, whatever first_k_dense and every are.
        return dict(num_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=self.width(cfg),
                    norm_topk_prob=m.renormalize, decoder_sparse_step=1,
                    mlp_only_layers=[i for i in range(cfg.num_layers) if i not in moe_layers],
                    output_router_logits=False, router_aux_loss_coef=m.aux_loss_weight, **self._window_keys(cfg))

    def _window_keys(self, cfg: ModelConfig) -> dict[str, Any]:
        """The sliding window as the target reads it: Mixtral's on every layer; Qwen3-MoE's on every layer when
        use_sliding_window; Qwen2-MoE's on the layers layer_types names (max_window_layers for older readers)."""
        if self.target == "mixtral":
            return {"sliding_window": cfg.sliding_window}
        keys: dict[str, Any] = {"use_sliding_window": cfg.sliding_window is not None,
                                "sliding_window": cfg.sliding_window}
        if self.target == "qwen2-moe":
            keys["max_window_layers"] = max_window_layers(cfg)
            keys["layer_types"] = ["sliding_attention" if cfg.window_of(i) else "full_attention"
                                   for i in range(cfg.num_layers)]
        return keys

    def _written_as_is(self, cfg: ModelConfig) -> dict[str, Any]:
        # The Qwen MoE classes name the expert count num_experts or num_local_experts (transformers 5 writes the
        # latter for Qwen3-MoE, 4.x and vLLM's older readers the former): both are written. GLM: transformers folds
        # partial_rotary_factor into rope_parameters, and vLLM's glm4_moe reads the top-level key with a default of
        # 0.5: both places.
        if self.target == "qwen2-moe":
            return {"num_local_experts": self.moe.num_experts}
        if self.target == "qwen3-moe":
            return {"num_experts": self.moe.num_experts}
        if self.target == "glm4-moe":
            return {"partial_rotary_factor": 1.0}
        return {}

    def check_config(self, hf: dict[str, Any], cfg: ModelConfig) -> list[str]:
        """Every value of a config.json that our model with `cfg` and these MoE options does not compute."""
        return config_errors(self, hf, cfg)


# What the dense family's config holds that every target takes as is (RoPE comes from `rope_keys`).
_COMMON_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
                "torch_dtype")
_PROJ_QKV = ("q_proj", "k_proj", "v_proj")


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


def _refuse_nonzero(hf_state: StateDict, names: set[str]) -> None:
    for name in sorted(n for n in names if n in hf_state):
        if bool(hf_state[name].any()):
            raise ValueError(f"{name} is nonzero (max |b| = {float(hf_state[name].abs().max()):.3g}) and slimtrain's "
                             "attention has no q/k/v biases with model.qkv_bias=false: the checkpoint cannot be "
                             "imported exactly; set model.qkv_bias: true (model.architecture: qwen2) to import them")


def _check_tied(state: StateDict, cfg: ModelConfig) -> None:
    """A tied model's head must be its embedding (as the Llama adapter requires): HF stores only the embedding."""
    if cfg.tie_embeddings and "lm_head.weight" in state:
        head, embed = state["lm_head.weight"], state["embed.weight"]
        if head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed):
            raise ValueError("model.tie_embeddings=true but lm_head.weight differs from embed.weight; the weights "
                             "were untied (e.g. by to_empty) - call model.tie_weights() or set tie_embeddings=false")
