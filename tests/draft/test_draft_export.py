"""Every head kind's serving export: the plain directory holds the base only; each variant reloads into our
speculative decoder and drafts exactly as the heads it came from; the MTP layout loads into transformers' own
MTP model, which computes our logits; the EAGLE-3 files follow the speculators schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, randomise
from mtp_parity import check_transformers_mtp

from slimtrain.modules.draft.config import DraftConfig
from slimtrain.modules.draft.export import load_heads, read_safetensors
from slimtrain.modules.draft.speculate import SpeculativeDecoder
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.trainer.export.hf import write_hf_dir
from slimtrain.trainer.export.importer import import_hf

HEADS = [{"kind": "mtp", "depth": 2}, {"kind": "medusa", "num_heads": 2, "num_layers": 2},
         {"kind": "hydra", "num_heads": 2}, {"kind": "eagle3", "steps": 3, "draft_vocab_size": 40}]
CFG = ModelConfig(**{**TINY, "num_layers": 4})


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Transformer, PluginStack]:
    stack = PluginStack.from_configs([DraftConfig(type="draft", heads=HEADS)])
    model = Transformer(CFG)
    model.init_weights(0)
    stack.apply(model)
    stack.init_weights(model, seed=0, token_counts=lambda: torch.arange(CFG.vocab_size).flip(0))
    heads = randomise(model.draft, 1, std=0.2)
    with torch.no_grad():  # keep the buffers a vocabulary (randomise drew over them)
        eagle = heads["eagle3"]
        eagle.set_vocabulary(torch.arange(CFG.vocab_size).flip(0), model.lm_head.weight)
    model.eval()
    out = tmp_path_factory.mktemp("export") / "hf"
    ctx = stack.export(dict(model.state_dict()), CFG, 0)  # takes the heads out of the plain export
    write_hf_dir(ctx.state, CFG, out, tokenizer_dir=None, ids={}, plugins=stack, plugin_export=ctx)
    return out, model, stack


def _base_from(directory: Path) -> Transformer:
    base = Transformer(CFG)
    import_hf(base, CFG, directory)
    return base.eval()


def test_plain_directory_holds_the_base_only(exported) -> None:
    out, model, _ = exported
    names = set(read_safetensors(out))
    assert not any("draft" in n or "layers.4" in n for n in names)
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"mtp", "eagle3", "medusa", "hydra"}
    for kind in ("mtp", "eagle3", "medusa", "hydra"):
        assert kind in (out / kind / "README.md").read_text()


@pytest.mark.parametrize("kind,widths", [("mtp", None), ("eagle3", None), ("medusa", [2, 2]), ("hydra", None)])
def test_each_variant_reloads_and_decodes_as_trained(exported, kind: str, widths) -> None:
    out, model, _ = exported
    base = _base_from(out)
    head = load_heads(out / kind, kind, base)
    original = model.draft[kind]
    for p, (name, q) in zip(head.state_dict().values(), original.state_dict().items()):
        assert torch.equal(p, q), name
    layers = getattr(head, "hidden_layers", ())
    prompt = torch.randint(0, CFG.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    want = SpeculativeDecoder(model, original.drafter(model), original.positions, widths, layers).generate(prompt, 20)
    got = SpeculativeDecoder(base, head.drafter(base), head.positions, widths, layers).generate(prompt, 20)
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_mtp_layout_loads_into_transformers_mtp_model(exported) -> None:
    """transformers' own MtpModel, loaded from mtp/, drafts with our modules' logits (the Llama class needs the
    MTP layers listed as ignorable, as the real MTP models' classes list theirs)."""
    from transformers import LlamaForCausalLM

    out, model, _ = exported
    config = json.loads((out / "mtp" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 2
    names = set(read_safetensors(out / "mtp"))
    assert {"model.layers.4.eh_proj.weight", "model.layers.5.shared_head.head.weight",
            "model.layers.5.self_attn.q_proj.weight", "model.layers.4.shared_head.norm.weight"} <= names
    check_transformers_mtp(model, LlamaForCausalLM, out / "mtp", [4, 5])


def test_eagle3_files_follow_the_speculators_schema(exported) -> None:
    out, model, _ = exported
    config = json.loads((out / "eagle3" / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["architectures"] == ["Eagle3DraftModel"]
    assert config["norm_before_residual"] is False  # vLLM defaults it to true: always written
    assert config["draft_vocab_size"] == 40 and config["target_hidden_size"] == CFG.hidden_size
    assert config["eagle_aux_hidden_state_layer_ids"] == list(model.draft["eagle3"].aux_layers)
    assert config["transformer_layer_config"]["model_type"] == "llama"
    proposal = config["speculators_config"]["proposal_methods"][0]
    assert proposal["proposal_type"] == "greedy" and proposal["speculative_tokens"] == 3
    state = read_safetensors(out / "eagle3")
    h = CFG.hidden_size
    assert state["d2t"].dtype == torch.int64 and state["d2t"].shape == (40,)
    assert state["t2d"].dtype == torch.bool and int(state["t2d"].sum()) == 40
    assert state["fc.weight"].shape == (h, 3 * h) and state["lm_head.weight"].shape == (40, h)
    assert state["layers.0.self_attn.q_proj.weight"].shape[1] == 2 * h
    assert {"embed_tokens.weight", "layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight",
            "layers.0.post_attention_layernorm.weight", "layers.0.mlp.down_proj.weight", "norm.weight"} <= set(state)
    # target id = draft id + d2t[draft id]; t2d marks the same ids
    targets = torch.arange(40) + state["d2t"]
    assert torch.equal(state["t2d"].nonzero().flatten(), targets)


def test_medusa_legacy_layout(exported) -> None:
    out, _, _ = exported
    config = json.loads((out / "medusa" / "config.json").read_text())
    assert config["model_type"] == "medusa" and config["num_heads"] == 2 and config["medusa_fc_bias"] is True
    assert set(read_safetensors(out / "medusa")) == {f"{a}" for i in range(2) for a in (
        f"lm_heads.{i}.weight", *[f"blocks.{i}.layers.{j}.{p}" for j in range(2) for p in ("weight", "bias")])}


def test_eagle3_loads_into_speculators_when_installed(exported, monkeypatch) -> None:
    """With the `speculators` package importable (it pins older transformers, so CI does not install it; run by
    hand in a side install: docs/draft.md), its Eagle3DraftModel loads eagle3/ and its own first layer computes
    ours."""
    speculators = pytest.importorskip("speculators.models.eagle3")
    out, model, _ = exported
    monkeypatch.chdir(out / "eagle3")  # verifier.name_or_path is ".."
    spec = speculators.Eagle3DraftModel.from_pretrained(".")
    ours = model.draft["eagle3"]
    assert torch.equal(spec.d2t.cpu(), ours.d2t) and torch.equal(spec.t2d.cpu().bool(), ours.t2d)
    assert torch.equal(spec.state_dict()["layers.0.self_attn.q_proj.weight"], ours.layer.self_attn.q_proj.weight)
    from slimtrain.modules.transformer.attention import bind_attention
    from slimtrain.modules.transformer.rope import rope_cos_sin

    s = 6
    emb, hid = torch.randn(1, s, CFG.hidden_size), torch.randn(1, s, CFG.hidden_size)
    pos = torch.arange(s)[None]
    spec.layers[0].self_attn.config._attn_implementation = "eager"
    with torch.no_grad():
        got = spec.layers[0](torch.cat([emb, hid], -1), attention_mask=torch.full((s, s), float("-inf")).triu(1)[None, None],
                             position_ids=pos, position_embeddings=spec.rotary_emb(torch.cat([emb, hid], -1), pos))
        got = got[0] if isinstance(got, tuple) else got
        cos, sin = rope_cos_sin(pos, CFG.dim_per_head, CFG.rope_theta, torch.float32)
        want = ours.layer(emb, hid, cos, sin, bind_attention("eager", None, s, torch.device("cpu"), torch.float32))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
