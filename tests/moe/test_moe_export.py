"""MoE models exported as transformers' MoE classes (Mixtral, Qwen2-MoE, GLM-4.5) and imported back: logits and
greedy tokens of the transformers load equal ours, per-expert tensors on disk, config.json, `init_from_hf` then
export is the identity, the refusals, `slimtrain export --verify` on a checkpoint, and the exporter's map of HF
names to ours for views (an expert's slice of a stacked weight)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from slimtrain.modules.moe.config import MoEConfig
from slimtrain.modules.moe.hf_export import choose_target, selection_bias
from slimtrain.modules.moe.layer import MoELayer
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig
from slimtrain.trainer.backends.build import ModelInit, build_model
from slimtrain.trainer.errors import CheckpointError, RecipeError
from slimtrain.trainer.export.hf import _hf_to_ours, read_hf_config, write_hf_dir

REPO = Path(__file__).resolve().parents[2]
IDS = {"bos_id": None, "eos_id": None, "pad_id": None}  # no eos: greedy decoding runs all 32 tokens
MODEL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, max_seq_len=64)

# name -> (layers, tied embeddings, moe block). The first three are the targets' full cases (dense first layer
# for Qwen2-MoE and GLM); the others check logits only.
CASES = {
    "mixtral": (2, False, dict(num_experts=4, top_k=2)),
    "qwen2-moe": (3, True, dict(num_experts=4, top_k=2, num_shared_experts=1, shared_expert_gate=True,
                                first_k_dense=1, renormalize=False, expert_intermediate_size=32)),
    "glm4-moe": (3, False, dict(router="sigmoid", num_experts=8, top_k=2, n_group=2, topk_group=1,
                                num_shared_experts=1, first_k_dense=1, routed_scaling_factor=2.5,
                                bias_update_rate=0.01, expert_intermediate_size=32)),
    "qwen2-moe-unshared-every-2": (3, False, dict(num_experts=4, top_k=2, every=2)),
    "glm4-moe-unshared": (2, False, dict(router="sigmoid", num_experts=4, top_k=1, renormalize=False)),
}
FULL = ["mixtral", "qwen2-moe", "glm4-moe"]


def cfg_of(case: str) -> ModelConfig:
    layers, tied, _ = CASES[case]
    return ModelConfig(num_layers=layers, tie_embeddings=tied, attention="eager", **MODEL)


def plugins_of(case: str, **changes) -> PluginStack:
    """Fresh plugin instances (a plugin keeps the modules it applied to)."""
    return PluginStack.from_configs([validate_plugin_config({"type": "moe", **CASES[case][2], **changes})])


def build(case: str, seed: int = 0, init_from_hf: Path | None = None, **changes) -> nn.Module:
    return build_model(cfg_of(case), plugins_of(case, **changes), ModelInit(seed=seed, init_from_hf=init_from_hf),
                       torch.device("cpu")).eval()


@torch.no_grad()
def trained_looking(model: nn.Module, seed: int = 1) -> nn.Module:
    """What training leaves that a fresh build does not: a selection bias (base and steps) and shared gates."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        if isinstance(layer.mlp, MoELayer):
            moe = layer.mlp
            if moe.cfg.router == "sigmoid":
                moe.set_selection_bias(torch.randn(moe.cfg.num_experts, generator=g) * 0.05)
                moe.bias_steps.copy_(torch.randint(-3, 4, moe.bias_steps.shape, generator=g))
            if moe.shared is not None and moe.shared.gate is not None:
                moe.shared.gate.weight.copy_(torch.randn(moe.shared.gate.weight.shape, generator=g))
    return model


def export(model: nn.Module, case: str, out: Path) -> Path:
    """What `slimtrain export` writes for a live model: the plugins' export hooks, then the HF directory."""
    plugins = plugins_of(case)
    ctx = plugins.export(model.state_dict(), cfg_of(case), step=3)
    return write_hf_dir(ctx.state, cfg_of(case), out, tokenizer_dir=None, ids=IDS, plugins=plugins,
                        plugin_export=ctx, overwrite=True)


@dataclass
class Exported:
    case: str
    model: nn.Module
    out: Path
    saved: dict[str, torch.Tensor]
    config: dict


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """case -> its trained-looking model exported (built and written once per module)."""
    cache: dict[str, Exported] = {}

    def get(case: str) -> Exported:
        if case not in cache:
            model = trained_looking(build(case))
            out = export(model, case, tmp_path_factory.mktemp(case) / "hf")
            cache[case] = Exported(case, model, out, load_file(out / "model.safetensors"), read_hf_config(out))
        return cache[case]
    return get


def _moe_layers(model: nn.Module) -> list[tuple[int, MoELayer]]:
    return [(i, layer.mlp) for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoELayer)]


# -- transformers computes our model ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_transformers_computes_our_logits_and_greedy_tokens(exports, case: str) -> None:
    from transformers import AutoModelForCausalLM

    ex = exports(case)
    theirs = AutoModelForCausalLM.from_pretrained(str(ex.out), dtype=torch.float32, attn_implementation="eager").eval()
    assert type(theirs).__name__ == ex.config["architectures"][0]
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    assert float((ex.model(ids).logits - theirs(input_ids=ids).logits).abs().max()) <= 1e-4
    prompt = ids[:1, :8]
    ours = prompt
    for _ in range(32):
        ours = torch.cat([ours, ex.model(ours).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(theirs.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False), ours)


@pytest.mark.parametrize("case", FULL)
def test_every_expert_is_its_own_tensor_on_disk_as_a_slice_of_ours(exports, case: str) -> None:
    ex = exports(case)
    block, (gate, up, down) = ("block_sparse_moe", ("w1", "w3", "w2")) if case == "mixtral" else \
        ("mlp", ("gate_proj", "up_proj", "down_proj"))
    assert not [k for k in ex.saved if "gate_up" in k or k.endswith("experts.down_proj")]
    for i, moe in _moe_layers(ex.model):
        inter, prefix = moe.experts.intermediate, f"model.layers.{i}.{block}"
        assert torch.equal(ex.saved[f"{prefix}.gate.weight"], moe.router.weight)
        for e in range(moe.cfg.num_experts):
            expert = f"{prefix}.experts.{e}"
            assert torch.equal(ex.saved[f"{expert}.{gate}.weight"], moe.experts.gate_up[e, :inter])
            assert torch.equal(ex.saved[f"{expert}.{up}.weight"], moe.experts.gate_up[e, inter:])
            assert torch.equal(ex.saved[f"{expert}.{down}.weight"], moe.experts.down[e])
    dense = [i for i in range(len(ex.model.layers)) if i not in dict(_moe_layers(ex.model))]
    assert dense == ([] if case == "mixtral" else [0])
    assert all(torch.equal(ex.saved[f"model.layers.{i}.mlp.gate_proj.weight"], ex.model.layers[i].mlp.gate_proj.weight)
               for i in dense)


def test_qwen2_moe_writes_its_gated_shared_expert_and_zero_qkv_biases(exports) -> None:
    ex = exports("qwen2-moe")
    for i, moe in _moe_layers(ex.model):
        assert torch.equal(ex.saved[f"model.layers.{i}.mlp.shared_expert_gate.weight"], moe.shared.gate.weight)
        assert torch.equal(ex.saved[f"model.layers.{i}.mlp.shared_expert.up_proj.weight"], moe.shared.up_proj.weight)
    biases = [k for k in ex.saved if k.endswith("_proj.bias")]
    assert len(biases) == 3 * 3 and not any(ex.saved[k].any() for k in biases)
    assert "lm_head.weight" not in ex.saved  # tied: HF stores the embedding only
    unshared = exports("qwen2-moe-unshared-every-2")  # width 0: the class builds one anyway
    assert unshared.saved["model.layers.0.mlp.shared_expert.down_proj.weight"].shape == (32, 0)
    assert unshared.config["mlp_only_layers"] == [1] and unshared.config["shared_expert_intermediate_size"] == 0


def test_glm_writes_the_selection_bias_in_fp32(exports) -> None:
    ex = exports("glm4-moe")
    for i, moe in _moe_layers(ex.model):
        bias = ex.saved[f"model.layers.{i}.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and bool(moe.bias_steps.any()) and bool(moe.bias_base.any())
        assert torch.equal(bias, moe.selection_bias())
        shared = ex.saved[f"model.layers.{i}.mlp.shared_experts.down_proj.weight"]
        assert torch.equal(shared, moe.shared.down_proj.weight)


@pytest.mark.parametrize("case", FULL)
def test_config_json_holds_what_loaders_read(exports, case: str) -> None:
    ex = exports(case)
    c, moe = ex.config, CASES[case][2]
    assert c["head_dim"] == 8 and c["num_experts_per_tok"] == 2 and c["output_router_logits"] is False
    if case == "mixtral":
        assert c["num_local_experts"] == 4 and c["intermediate_size"] == 64 and c["sliding_window"] is None
    if case == "qwen2-moe":
        assert c["num_experts"] == c["num_local_experts"] == 4
        assert (c["moe_intermediate_size"], c["shared_expert_intermediate_size"]) == (32, 32)
        assert c["intermediate_size"] == 64  # the dense first layer's
        assert c["mlp_only_layers"] == [0] and c["decoder_sparse_step"] == 1 and c["norm_topk_prob"] is False
        assert c["qkv_bias"] is True and c["tie_word_embeddings"] is True
    if case == "glm4-moe":
        assert c["partial_rotary_factor"] == 1.0 and c["rope_parameters"]["partial_rotary_factor"] == 1.0
        assert c["num_nextn_predict_layers"] == 0 and c["use_qk_norm"] is False and c["attention_bias"] is False
        assert (c["n_routed_experts"], c["n_shared_experts"], c["first_k_dense_replace"]) == (8, 1, 1)
        assert (c["n_group"], c["topk_group"], c["routed_scaling_factor"]) == (2, 1, moe["routed_scaling_factor"])
        assert c["norm_topk_prob"] is True and c["moe_intermediate_size"] == 32


# -- import ------------------------------------------------------------------------------------------------------

# The selection bias leaves as fp32 and comes back as its bits in an int32 buffer; the import's cast of every
# tensor to float rounds those bits (by ~1e-7 here). Its own test below holds it to the bit.
BIAS = ("bias_base", "bias_steps", "e_score_correction_bias")


@pytest.mark.parametrize("case", FULL)
def test_init_from_hf_then_export_is_the_identity(exports, case: str, tmp_path: Path) -> None:
    ex = exports(case)
    back = build(case, seed=7, init_from_hf=ex.out)  # another seed: only the import can make them equal
    ours, theirs = ex.model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(theirs[k], v) for k, v in ours.items() if not k.endswith(BIAS))
    for (_, a), (_, b) in zip(_moe_layers(ex.model), _moe_layers(back)):
        torch.testing.assert_close(a.selection_bias(), b.selection_bias(), rtol=0, atol=1e-6)
        assert not b.bias_steps.any()
    again = load_file(export(back, case, tmp_path / "again") / "model.safetensors")
    assert again.keys() == ex.saved.keys()
    assert all(again[k].dtype == v.dtype and torch.equal(again[k], v) for k, v in ex.saved.items()
               if not k.endswith(BIAS))


def test_an_imported_selection_bias_keeps_its_bits(exports) -> None:
    ex = exports("glm4-moe")
    back = build("glm4-moe", seed=7, init_from_hf=ex.out)
    for i, moe in _moe_layers(back):
        assert torch.equal(moe.selection_bias(), ex.saved[f"model.layers.{i}.mlp.gate.e_score_correction_bias"])


@pytest.mark.parametrize("case", FULL)
def test_init_from_hf_refuses_a_config_json_that_disagrees(exports, case: str, tmp_path: Path) -> None:
    ex = exports(case)
    with pytest.raises(RecipeError, match=r"moe.top_k=1 but num_experts_per_tok=2"):
        build(case, init_from_hf=ex.out, top_k=1)
    if case == "mixtral":
        with pytest.raises(RecipeError, match=r"moe.expert_intermediate_size=16 \(expert width 16\) but "
                                              r"intermediate_size=64"):
            build(case, init_from_hf=ex.out, expert_intermediate_size=16)
    if case == "qwen2-moe":
        edited = _edited_copy(ex.out, tmp_path, lambda c: c.update(mlp_only_layers=[]))
        with pytest.raises(RecipeError, match=r"moe.first_k_dense/every=1/1 make layers \[1, 2\] MoE but "
                                              r"decoder_sparse_step=1 and mlp_only_layers=\[\] make \[0, 1, 2\]"):
            build(case, init_from_hf=edited)
    if case == "glm4-moe":
        with pytest.raises(RecipeError, match=r"moe.routed_scaling_factor=1.0 but routed_scaling_factor=2.5.*"
                                              r"moe.renormalize=False but norm_topk_prob=True"):
            build(case, init_from_hf=ex.out, routed_scaling_factor=1.0, renormalize=False)
        edited = _edited_copy(ex.out, tmp_path, _default_partial_rotary)
        with pytest.raises(RecipeError, match=r"partial_rotary_factor=0.5: slimtrain's RoPE rotates the whole head"):
            build(case, init_from_hf=edited)


def _default_partial_rotary(config: dict) -> None:
    """A GLM config.json as transformers writes it by default: partial_rotary_factor left to the class (0.5)."""
    config.pop("partial_rotary_factor")
    config["rope_parameters"].pop("partial_rotary_factor")


def _edited_copy(src: Path, tmp_path: Path, edit) -> Path:
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _with_tensors(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_init_from_hf_names_a_missing_expert_and_refuses_nonzero_qkv_biases(exports, tmp_path: Path) -> None:
    out = exports("qwen2-moe").out
    missing = _with_tensors(out, tmp_path / "missing", lambda t: t.pop("model.layers.2.mlp.experts.3.down_proj.weight"))
    with pytest.raises(RecipeError, match=r"missing \['model.layers.2.mlp.experts.3.down_proj.weight'\]"):
        build("qwen2-moe", init_from_hf=missing)
    biased = _with_tensors(out, tmp_path / "biased", lambda t: t["model.layers.1.self_attn.k_proj.bias"].fill_(0.5))
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.k_proj.bias is nonzero \(max \|b\| = 0.5\) and "
                                         "slimtrain's attention has no q/k/v biases"):
        build("qwen2-moe", init_from_hf=biased)


# -- refusals ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(router="sigmoid", every=2), r"moe.every=2 with router: sigmoid: Glm4MoeForCausalLM .* set every: 1"),
    (dict(router="sigmoid", num_shared_experts=1, shared_expert_gate=True), r"shared experts are not gated; set "
     r"shared_expert_gate: false"),
    (dict(router="sigmoid", num_experts=4, n_group=4, topk_group=2), r"moe.n_group=4 leaves 1 expert per group.*"
     r"lower n_group to at most 2"),
    (dict(routed_scaling_factor=2.0), r"moe.routed_scaling_factor=2.0 with router: softmax.* set "
     r"routed_scaling_factor: 1"),
    (dict(num_shared_experts=2), r"moe.num_shared_experts=2 with shared_expert_gate: false .* set "
     r"shared_expert_gate: true"),
])
def test_what_no_class_computes_is_refused_naming_the_option(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_target(MoEConfig(type="moe", **{"num_experts": 8, "top_k": 2, **options}))


def test_the_exporter_reports_a_refusal_and_writes_nothing(tmp_path: Path) -> None:
    plugins = plugins_of("glm4-moe-unshared", every=2)
    model = build_model(cfg_of("glm4-moe-unshared"), plugins, ModelInit(seed=0), torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"cannot export: moe.every=2 with router: sigmoid"):
        write_hf_dir(model.state_dict(), cfg_of("glm4-moe-unshared"), tmp_path / "hf", tokenizer_dir=None, ids=IDS,
                     plugins=plugins)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


def test_targets_and_adapter_names() -> None:
    assert choose_target(MoEConfig(type="moe", renormalize=False)) == "qwen2-moe"
    assert choose_target(MoEConfig(type="moe", first_k_dense=1)) == "qwen2-moe"
    assert choose_target(MoEConfig(type="moe", expert_intermediate_size=16)) == "mixtral"
    cfg = cfg_of("mixtral")
    a, b = plugins_of("mixtral").hf_architecture(cfg), plugins_of("mixtral").hf_architecture(cfg)
    assert a == b and a.startswith("moe-mixtral-")  # registered once, found again
    assert plugins_of("mixtral", top_k=1).hf_architecture(cfg) != a


# -- the exporter's map of HF names to ours ------------------------------------------------------------------------

def test_hf_names_of_views_map_to_the_tensor_they_view() -> None:
    stacked, embed, other = torch.randn(3, 8, 4), torch.randn(5, 4), torch.randn(2)
    state = {"embed.weight": embed, "lm_head.weight": embed, "experts.gate_up": stacked, "x": other}
    mapped = {"embed": embed, "e1.gate": stacked[1, :4], "e1.up": stacked[1, 4:], "e2.t": stacked[2].T,
              "new": torch.zeros(2), "empty": stacked[:0], "copy": stacked[0].clone()}
    assert _hf_to_ours(state, mapped) == {"embed": "embed.weight", "e1.gate": "experts.gate_up",
                                          "e1.up": "experts.gate_up", "e2.t": "experts.gate_up"}
    flat = torch.randn(40)  # a consolidation's one flat buffer: the byte range says whose slice it is
    state = {"a": flat[:24].view(3, 8), "b": flat[24:40].view(2, 8)}
    assert _hf_to_ours(state, {"a1": state["a"][1], "b0": state["b"][0], "b": state["b"]}) == \
        {"a1": "a", "b0": "b", "b": "b"}


def test_selection_bias_from_a_state_dict_is_the_layers() -> None:
    moe = MoELayer(MoEConfig(type="moe", router="sigmoid", num_experts=4, top_k=2, bias_update_rate=0.25), 8, 16)
    moe.set_selection_bias(torch.tensor([-0.0, 0.1, -0.2, 0.3]))
    assert selection_bias(moe.bias_base, moe.bias_steps, 0.25).view(torch.int32).tolist() == moe.bias_base.tolist()
    moe.bias_steps.copy_(torch.tensor([1, -2, 0, 3]))
    assert torch.equal(selection_bias(moe.bias_base, moe.bias_steps, 0.25), moe.selection_bias())


# -- `slimtrain export --verify` on a checkpoint ---------------------------------------------------------------------

def fake_checkpoint(run: Path, case: str, state: dict[str, torch.Tensor], step: int = 3) -> Path:
    """A complete ZeRO-0 fp32 checkpoint directory of `case` holding `state`, laid out as save_checkpoint does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = run / "checkpoints" / f"step_{step:08d}"
    (path / "ds").mkdir(parents=True)
    torch.save({"module": state}, path / "ds" / "mp_rank_00_model_states.pt")
    recipe = yaml.safe_load((REPO / "recipes" / "tiny-cpu.yaml").read_text())
    cfg = cfg_of(case)
    recipe.update(model=cfg.model_dump(mode="json", exclude={"vocab_size", "attention"}),
                  plugins=[{"type": "moe", **CASES[case][2]}])
    recipe["backend"]["zero_stage"] = 0
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "tokens_seen": 0, "tokenizer": IDS,
                                                         "model_config": cfg.model_dump(mode="json")}))
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(cfg.vocab_size)}, unk_token="w2"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w2").save_pretrained(path / "tokenizer")
    files = {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}
    (path / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
    return path


def test_slimtrain_export_verify_on_a_glm_checkpoint(exports, tmp_path: Path) -> None:
    from slimtrain.trainer.cli import main

    ex = exports("glm4-moe")
    fake_checkpoint(tmp_path / "run", "glm4-moe", ex.model.state_dict())
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--verify"]) == 0
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    assert saved.keys() == ex.saved.keys()
    assert all(torch.equal(saved[k], v) for k, v in ex.saved.items() if not k.endswith(BIAS))
    for k in (k for k in saved if k.endswith(BIAS)):  # exact in the test below
        torch.testing.assert_close(saved[k], ex.saved[k], rtol=0, atol=1e-6)


def test_a_checkpoints_selection_bias_is_exported_to_the_bit(exports, tmp_path: Path) -> None:
    from slimtrain.trainer.export.consolidate import load_checkpoint_for_export
    from slimtrain.trainer.export.hf import write_export

    ex = exports("glm4-moe")
    fake_checkpoint(tmp_path / "run", "glm4-moe", ex.model.state_dict())
    out = write_export(load_checkpoint_for_export(tmp_path / "run"), tmp_path / "hf")
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[k], ex.saved[k]) for k in saved if k.endswith("e_score_correction_bias"))


def test_a_bf16_export_keeps_the_selection_bias_in_fp32(exports, tmp_path: Path) -> None:
    """GLM checkpoints keep e_score_correction_bias in fp32: a bf16 export would round the learned bias."""
    from slimtrain.trainer.export.consolidate import load_checkpoint_for_export
    from slimtrain.trainer.export.hf import write_export

    ex = exports("glm4-moe")
    fake_checkpoint(tmp_path / "run", "glm4-moe", ex.model.state_dict())
    out = write_export(load_checkpoint_for_export(tmp_path / "run"), tmp_path / "hf", dtype="bf16")
    saved = load_file(out / "model.safetensors")
    biases = [k for k in saved if k.endswith(BIAS)]
    assert biases and all(saved[k].dtype == torch.float32 and torch.equal(saved[k], ex.saved[k]) for k in biases)
    assert all(v.dtype == torch.bfloat16 for k, v in saved.items() if k not in biases)
