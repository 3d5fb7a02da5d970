"""The moe plugin on imported models of every dense family: a tiny random Llama (llama3 RoPE), Mistral (a sliding
window shorter than the sequence), Qwen2 (nonzero q/k/v biases, windows on the last layers) and Qwen3 (q/k norms,
attention biases, YaRN, a window on every layer) written by transformers, upcycled to an MoE through
`checkpoint.init_from_hf`, exported: transformers loads the family's MoE class and computes our logits; the export
imports back; a config.json that disagrees with the recipe is refused naming the field; options the family's MoE
class cannot compute are refused naming the option and the fix."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimtrain.modules.moe.config import MoEConfig
from slimtrain.modules.moe.hf_export import choose_target
from slimtrain.modules.moe.layer import MoELayer
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig
from slimtrain.modules.transformer.hf_llama import read_dense_dir
from slimtrain.trainer.backends.build import ModelInit, build_model
from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.export.hf import read_hf_config, write_hf_dir

IDS = {"bos_id": None, "eos_id": None, "pad_id": None}
CPU = torch.device("cpu")
SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
          "low_freq_factor": 1.0, "high_freq_factor": 4.0}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
WINDOW = 6  # shorter than the 24-token rows the logits are compared on


@dataclass(frozen=True)
class Case:
    """A dense transformers model (config class and its keys) and the moe block upcycling it; `moe_class` is what
    the export must be."""

    config_class: str
    dense: dict[str, Any]
    moe: dict[str, Any]
    moe_class: str


CASES = {
    "llama-mixtral": Case("LlamaConfig", dict(rope_parameters=LLAMA3), dict(num_experts=4, top_k=2),
                          "MixtralForCausalLM"),
    "llama-glm": Case("LlamaConfig", dict(rope_parameters=LLAMA3, tie_word_embeddings=True),
                      dict(router="sigmoid", num_experts=4, top_k=2, n_group=2, topk_group=1, num_shared_experts=1,
                           first_k_dense=1, expert_intermediate_size=48), "Glm4MoeForCausalLM"),
    "mistral": Case("MistralConfig", dict(sliding_window=WINDOW), dict(num_experts=4, top_k=2), "MixtralForCausalLM"),
    "qwen2": Case("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
                  dict(num_experts=4, top_k=2, num_shared_experts=1, shared_expert_gate=True, first_k_dense=1,
                       expert_intermediate_size=48), "Qwen2MoeForCausalLM"),
    "qwen3": Case("Qwen3Config", dict(attention_bias=True, use_sliding_window=True, sliding_window=WINDOW,
                                      max_window_layers=0, rope_parameters=YARN, tie_word_embeddings=True),
                  dict(num_experts=4, top_k=2, every=2, renormalize=False), "Qwen3MoeForCausalLM"),
}


def dense_dir(case: str, out: Path) -> Path:
    """A random dense model of `case` as transformers writes it, its biases and norm scales random too (HF
    initialises them to 0 and 1, which would hide a bias or norm that is dropped or misplaced)."""
    import transformers

    c = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, c.config_class)(**SIZES, **c.dense)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
    model.save_pretrained(out)
    return out


def plugins_of(case: str, **changes) -> PluginStack:
    """Fresh plugin instances (a plugin keeps the modules it applied to)."""
    return PluginStack.from_configs([validate_plugin_config({"type": "moe", **CASES[case].moe,
                                                             "upcycle_noise": 0.05, **changes})])


def build(cfg: ModelConfig, case: str, source: Path, seed: int = 1, **changes) -> nn.Module:
    return build_model(cfg, plugins_of(case, **changes), ModelInit(seed=seed, init_from_hf=source), CPU).eval()


def export(model: nn.Module, cfg: ModelConfig, case: str, out: Path) -> Path:
    """What `slimtrain export` writes for a live model: the plugins' export hooks, then the HF directory."""
    plugins = plugins_of(case)
    ctx = plugins.export(model.state_dict(), cfg, step=3)
    return write_hf_dir(ctx.state, cfg, out, tokenizer_dir=None, ids=IDS, plugins=plugins, plugin_export=ctx,
                        overwrite=True)


@dataclass
class Exported:
    cfg: ModelConfig
    model: nn.Module
    out: Path
    config: dict


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """case -> its dense model upcycled (routers made decisive) and exported, built once per module."""
    cache: dict[str, Exported] = {}

    def get(case: str) -> Exported:
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            dense = dense_dir(case, root / "dense")
            cfg, _ = read_dense_dir(dense)
            cfg = cfg.model_copy(update={"attention": "eager"})
            model = build(cfg, case, dense)
            with torch.no_grad():  # a fresh router is near uniform: make the top-k choice matter
                for layer in model.layers:
                    if isinstance(layer.mlp, MoELayer):
                        layer.mlp.router.weight.normal_(0.0, 0.5)
            out = export(model, cfg, case, root / "moe")
            cache[case] = Exported(cfg, model, out, read_hf_config(out))
        return cache[case]
    return get


def _ids() -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))


# -- transformers computes the upcycled model as the family's MoE class ----------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_the_family_moe_class_computes_our_logits(exports, case: str) -> None:
    from transformers import AutoModelForCausalLM

    ex = exports(case)
    assert ex.config["architectures"] == [CASES[case].moe_class]
    theirs = AutoModelForCausalLM.from_pretrained(str(ex.out), dtype=torch.float32, attn_implementation="eager").eval()
    assert type(theirs).__name__ == CASES[case].moe_class
    ours = ex.model(_ids()).logits
    assert float(ours.abs().max()) > 0.1  # logits large enough for the bound below to mean something
    assert float((ours - theirs(input_ids=_ids()).logits).abs().max()) <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_the_export_imports_back_to_the_same_model(exports, case: str) -> None:
    ex = exports(case)
    back = build(ex.cfg, case, ex.out, seed=7)  # another seed: only the import can make them equal
    torch.testing.assert_close(back(_ids()).logits, ex.model(_ids()).logits, rtol=0, atol=1e-6)


def test_the_config_json_keeps_what_the_family_computes(exports) -> None:
    llama3 = exports("llama-mixtral").config
    assert llama3["rope_parameters"] == {**LLAMA3}
    glm = exports("llama-glm").config["rope_parameters"]
    assert glm["rope_type"] == "llama3" and glm["partial_rotary_factor"] == 1.0
    assert exports("mistral").config["sliding_window"] == WINDOW
    qwen2 = exports("qwen2").config
    assert (qwen2["use_sliding_window"], qwen2["sliding_window"], qwen2["max_window_layers"]) == (True, WINDOW, 1)
    assert qwen2["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert qwen2["qkv_bias"] is True and qwen2["mlp_only_layers"] == [0]
    qwen3 = exports("qwen3").config
    assert (qwen3["use_sliding_window"], qwen3["sliding_window"], qwen3["attention_bias"]) == (True, WINDOW, True)
    assert qwen3["num_experts"] == qwen3["num_local_experts"] == 4 and qwen3["mlp_only_layers"] == [1]
    assert qwen3["norm_topk_prob"] is False and qwen3["rope_parameters"]["rope_type"] == "yarn"


def test_qwen2_biases_and_qwen3_norms_are_the_models(exports) -> None:
    from safetensors.torch import load_file

    qwen2 = exports("qwen2")
    saved = load_file(qwen2.out / "model.safetensors")
    bias = qwen2.model.layers[1].attn.k_proj.bias
    assert bool(bias.abs().gt(0.1).any()) and torch.equal(saved["model.layers.1.self_attn.k_proj.bias"], bias)
    qwen3 = exports("qwen3")
    saved = load_file(qwen3.out / "model.safetensors")
    for name, ours in (("q_norm.weight", qwen3.model.layers[2].attn.q_norm.weight),
                       ("o_proj.bias", qwen3.model.layers[2].attn.o_proj.bias)):
        assert torch.equal(saved[f"model.layers.2.self_attn.{name}"], ours)


# -- refusals --------------------------------------------------------------------------------------------------------

def _edited_copy(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_init_from_hf_refuses_an_export_whose_options_differ_naming_the_field(exports, tmp_path: Path) -> None:
    qwen2 = exports("qwen2")
    with pytest.raises(RecipeError, match=r"model.sliding_window=4, sliding_window_layers=\[1, 2\] give the layers "
                                          r"windows \[None, 4, 4\] but config.json's .* give \[None, 6, 6\]"):
        build(qwen2.cfg.model_copy(update={"sliding_window": 4}), "qwen2", qwen2.out)
    llama = exports("llama-mixtral")
    scaling = llama.cfg.rope_scaling.model_copy(update={"factor": 8.0})
    with pytest.raises(RecipeError, match=r"model.rope_scaling.factor=8.0 but the checkpoint's RoPE scaling has 4.0"):
        build(llama.cfg.model_copy(update={"rope_scaling": scaling}), "llama-mixtral", llama.out)
    qwen3 = exports("qwen3")
    unbiased = _edited_copy(qwen3.out, tmp_path / "unbiased", attention_bias=False)
    with pytest.raises(RecipeError, match=r"model.qkv_bias=True \(o_bias=True\) but attention_bias=False"):
        build(qwen3.cfg, "qwen3", unbiased)
    other = _edited_copy(qwen2.out, tmp_path / "other", architectures=["Qwen3MoeForCausalLM"])
    with pytest.raises(RecipeError, match=r"model.architecture='qwen2' with these moe options exports as "
                                          r"Qwen2MoeForCausalLM but config.json's architectures is "
                                          r"\['Qwen3MoeForCausalLM'\]; set model.architecture: qwen3"):
        build(qwen2.cfg, "qwen2", other)


BASE = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4)


@pytest.mark.parametrize("model, moe, message", [
    (dict(architecture="mistral", sliding_window=8), dict(first_k_dense=1),
     r"moe.first_k_dense=1, every=1 with model.architecture: mistral: MixtralForCausalLM.* set first_k_dense: 0"),
    (dict(architecture="mistral"), dict(router="sigmoid"), r"moe.router='sigmoid' with model.architecture: mistral.* "
     r"set router: softmax"),
    (dict(architecture="qwen3", qk_norm=True), dict(num_shared_experts=1, shared_expert_gate=True),
     r"moe.num_shared_experts=1 with model.architecture: qwen3: Qwen3MoeForCausalLM has no shared experts; set "
     r"num_shared_experts: 0"),
    (dict(architecture="qwen3", qk_norm=True, sliding_window=8, sliding_window_layers=[2]), {},
     r"model.sliding_window_layers=\[2\] .* but Qwen3MoeForCausalLM slides on every layer or none; set "
     r"sliding_window_layers: null"),
    (dict(qkv_bias=True, o_bias=True), {}, r"model.qkv_bias=true but MixtralForCausalLM has no attention biases.*"
     r"model.o_bias=true \(model.architecture: llama\) but MixtralForCausalLM has no bias on o_proj"),
    (dict(mlp_bias=True), dict(first_k_dense=1), r"model.mlp_bias=true but Qwen2MoeForCausalLM's dense MLPs "
     r"\(layers \[0\]\) have no biases; set mlp_bias: false"),
])
def test_what_the_familys_moe_class_cannot_compute_is_refused(model: dict, moe: dict, message: str) -> None:
    cfg = BASE.model_copy(update=model)
    ModelConfig(**cfg.model_dump())  # the dense model itself is valid for its family
    with pytest.raises(ValueError, match=message):
        choose_target(MoEConfig(type="moe", num_experts=4, top_k=2, **moe), cfg)


def test_each_family_keeps_its_moe_class() -> None:
    plain = MoEConfig(type="moe", num_experts=4, top_k=2)
    families = {"llama": {}, "mistral": {}, "qwen2": dict(qkv_bias=True), "qwen3": dict(qk_norm=True)}
    targets = {f: choose_target(plain, BASE.model_copy(update=dict(architecture=f, **o))) for f, o in families.items()}
    assert targets == {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2-moe", "qwen3": "qwen3-moe"}
    # llama with mlp_bias exports when every layer is MoE: the experts replaced every biased MLP
    assert choose_target(plain, BASE.model_copy(update=dict(mlp_bias=True))) == "mixtral"
