"""MTP on an MoE base, as DeepSeek-V3 and GLM-4.5 build it: each MTP block's MLP is an MoE layer like the base's,
initialised, balanced and bias-updated by the MoE plugin as layers num_layers + k; frozen base layers keep their
routing; the mtp/ export is a Glm4MoeForCausalLM whose MTP layers transformers' own MtpModel loads and drafts with
our logits, and which reloads into our speculative decoder exactly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mtp_parity import check_transformers_mtp

from slimtrain.core.sentinels import IGNORE_INDEX
from slimtrain.modules.draft.export import load_heads, read_safetensors
from slimtrain.modules.draft.speculate import SpeculativeDecoder
from slimtrain.modules.moe.layer import MoELayer
from slimtrain.modules.plugin import PluginContext
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig
from slimtrain.modules.transformer.generate import greedy_generate
from slimtrain.trainer.backends.build import ModelInit, build_model
from slimtrain.trainer.export.hf import _adapters, write_hf_dir

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                  max_seq_len=64, attention="eager")
GLM = dict(type="moe", router="sigmoid", num_experts=8, top_k=2, n_group=2, topk_group=1, num_shared_experts=1,
           first_k_dense=1, routed_scaling_factor=2.5, bias_update_rate=0.01, expert_intermediate_size=32)
DEPTH = 2


def stack_of(mode: str = "joint") -> PluginStack:
    return PluginStack.from_configs([validate_plugin_config(GLM), validate_plugin_config(
        {"type": "draft", "mode": mode, "heads": [{"kind": "mtp", "depth": DEPTH}]})])


def build(mode: str = "joint", seed: int = 0) -> tuple[nn.Module, PluginStack]:
    stack = stack_of(mode)
    return build_model(CFG, stack, ModelInit(seed=seed), torch.device("cpu")), stack


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def batch():
    ids = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[0] * 10 + [1] * 6, [0] * 16])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(doc_ids[:, 1:] == doc_ids[:, :-1], ids[:, 1:], IGNORE_INDEX)
    positions = torch.tensor([list(range(10)) + list(range(6)), list(range(16))])
    return SimpleNamespace(input_ids=ids, labels=labels, doc_ids=doc_ids, position_ids=positions,
                           attention_documents=doc_ids)


def test_mtp_blocks_are_moe_layers_initialised_by_the_moe_plugin() -> None:
    model, _ = build()
    blocks = [d.block.mlp for d in model.draft["mtp"].depths]
    assert all(isinstance(m, MoELayer) and m.cfg.num_experts == 8 for m in blocks)
    again, _ = build()
    for ours, twin in zip(blocks, [d.block.mlp for d in again.draft["mtp"].depths]):
        for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), name  # drawn from the plugin's seed, not left as torch.empty
            assert 0.2 * CFG.init_std < p.std() < 2 * CFG.init_std, name
    base = model.layers[-1].mlp
    assert not torch.equal(blocks[0].experts.gate_up, base.experts.gate_up)
    assert not torch.equal(blocks[0].experts.gate_up, blocks[1].experts.gate_up)


@pytest.mark.parametrize("mode", ["joint", "frozen"])
def test_mtp_routing_is_balanced_and_bias_updated_as_more_layers(mode: str) -> None:
    model, stack = build(mode)
    model.train()
    stack.param_groups(model)
    if mode == "frozen":  # what the trainer's optimizer setup does with a frozen group
        held = {id(p) for p in model.draft.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in held)
    b = batch()
    ctx = PluginContext(model=model, step=1)
    stack.on_step_start(ctx)
    out = model(**stack.inputs(b, ctx).model_kwargs())
    terms = stack.losses(out, b, ctx)
    base_moe = len(moe_layers(model)) - DEPTH
    assert len(out.aux["moe/logits"]) == base_moe + DEPTH  # the model's MoE layers, then one per depth
    assert {"moe/aux", "draft/mtp_1", "draft/mtp_2"} <= set(terms)
    sum(t.weight * t.value for t in terms.values()).backward()
    mtp_router = model.draft["mtp"].depths[1].block.mlp.router.weight
    assert mtp_router.grad is not None and mtp_router.grad.any()  # the balancing loss reaches it
    stack.after_optimizer_step(ctx)
    steps = [m.bias_steps.clone() for m in moe_layers(model)]
    assert all(s.any() for s in steps[base_moe:])  # the MTP layers' bias moves with their load
    assert all(s.any() for s in steps[:base_moe]) == (mode == "joint")  # a frozen base routes as it did
    loads = stack.metrics(ctx)
    assert {f"moe/load/layer{CFG.num_layers + k}" for k in range(DEPTH)} <= set(loads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, nn.Module, PluginStack]:
    model, stack = build(seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # what training leaves: a selection bias on every MoE layer, MTP blocks included
        for moe in moe_layers(model):
            moe.set_selection_bias(torch.randn(8, generator=gen) * 0.05)
            moe.bias_steps.copy_(torch.randint(-3, 4, (8,), generator=gen))
    model.eval()
    ctx = stack.export(dict(model.state_dict()), CFG, 3)
    out = tmp_path_factory.mktemp("moe-mtp") / "hf"
    write_hf_dir(ctx.state, CFG, out, tokenizer_dir=None, ids={}, plugins=stack, plugin_export=ctx)
    return out, model, stack


def test_mtp_layers_are_written_as_the_models_moe_layers(exported) -> None:
    out, _, _ = exported
    config = json.loads((out / "mtp" / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForCausalLM"] and config["num_nextn_predict_layers"] == DEPTH
    names = set(read_safetensors(out / "mtp"))
    for k in range(DEPTH):
        layer = f"model.layers.{CFG.num_layers + k}."
        assert {layer + n for n in ("eh_proj.weight", "enorm.weight", "shared_head.head.weight", "mlp.gate.weight",
                                    "mlp.gate.e_score_correction_bias", "mlp.experts.7.down_proj.weight",
                                    "mlp.shared_experts.up_proj.weight")} <= names
    assert not any(f"layers.{CFG.num_layers}" in n for n in read_safetensors(out))  # the plain export: base only


def test_transformers_mtp_model_drafts_our_logits(exported) -> None:
    from transformers import Glm4MoeForCausalLM

    out, model, _ = exported
    # The released class lists layer 92 (GLM-4.5's depth) as its MTP layer; ours is 3 deep.
    check_transformers_mtp(model, Glm4MoeForCausalLM, out / "mtp", [CFG.num_layers + k for k in range(DEPTH)])


def test_mtp_export_reloads_into_our_decoder_exactly(exported) -> None:
    out, model, stack = exported
    head = load_heads(out / "mtp", "mtp", model, from_hf=_adapters(stack, CFG).from_hf)
    original = model.draft["mtp"]
    want, got = original.state_dict(), head.state_dict()
    assert set(got) == set(want)
    for name, tensor in got.items():
        if name.endswith(("bias_base", "bias_steps")):
            continue  # the bias comes back folded into its base (steps 0): compared as the selection bias below
        assert torch.equal(tensor, want[name]), name
    for a, b in zip(moe_layers(head), moe_layers(original)):
        assert torch.equal(a.selection_bias(), b.selection_bias())
    prompt = torch.randint(0, CFG.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    expected = SpeculativeDecoder(model, original.drafter(model), original.positions).generate(prompt, 20)
    reloaded = SpeculativeDecoder(model, head.drafter(model), head.positions).generate(prompt, 20)
    assert torch.equal(reloaded[0], expected[0]) and reloaded[1] == expected[1]
    assert torch.equal(expected[0], greedy_generate(model, prompt, 20))
