"""QAT, draft heads and the compressor on an imported model of every dense family.

Each family is a tiny random model made and saved by transformers, with what sets it apart made to matter: Llama
with Llama 3.1 RoPE scaling and attention and MLP biases, Mistral with a sliding window shorter than the rows, Qwen2
with q/k/v biases, Qwen3 with q/k norms and its last layer sliding (biases drawn away from zero, norm weights away
from one). Each is imported as a run imports it (`read_dense_dir` for the config, `checkpoint.init_from_hf`'s import
in the build), trains two optimizer steps through the plugin stack, and is exported: the plain directory keeps the
family's class and transformers computes our logits from it (fp32, 1e-4), and so do the plugins' variants that are
transformers classes (QAT's packed weights, the MTP layout); the other variants reload into our modules.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from slimtrain.core.sentinels import IGNORE_INDEX
from slimtrain.data.batch import Batch
from slimtrain.modules.compressor import CompressorModelConfig, ContextCompressor, Spans
from slimtrain.modules.compressor.decoders import drawn_decoder, load_extra
from slimtrain.modules.compressor.export import load_compressor
from slimtrain.modules.compressor.recipe import ExtraDecoder
from slimtrain.modules.draft.export import eagle3_rope, load_heads
from slimtrain.modules.hf_adapters import get_adapter
from slimtrain.modules.plugin import ExportContext, PluginConfig, PluginContext
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.modules.transformer.hf_llama import read_dense_dir
from slimtrain.modules.transformer.layers import RMSNorm
from slimtrain.trainer.backends.build import ModelInit, build_model
from slimtrain.trainer.export.hf import write_hf_dir
from slimtrain.trainer.export.verify import TOLERANCE, compare_logits, logits_diff, trained_model
from slimtrain.trainer.loss.lm import lm_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "draft"))
from mtp_parity import check_transformers_mtp  # noqa: E402  (tests/draft's transformers MtpModel check)

VOCAB, ROW, STEP = 97, 48, 2
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)
# family -> (class, config class, what sets it apart)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {
        "attention_bias": True, "mlp_bias": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"use_sliding_window": True, "sliding_window": 8,
                                                  "max_window_layers": 2}),
}
NEXT = dict(zip(FAMILIES, [*list(FAMILIES)[1:], list(FAMILIES)[0]]))  # another family: a compressor's extra decoder


def _save_family(family: str, directory: Path) -> Path:
    import transformers

    _, config_class, options = FAMILIES[family]
    config = getattr(transformers, config_class)(**SHAPE, **options)
    torch.manual_seed(0)
    model = getattr(transformers, FAMILIES[family][0])(config)
    with torch.no_grad():  # biases and norm weights that change the outputs when a module forgets them
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Callable[[str], Path]:
    """family -> its saved transformers directory (made once per module, on first use)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = _save_family(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


def build(directory: Path, blocks: list[dict]) -> tuple[list[PluginConfig], PluginStack, ModelConfig, Transformer]:
    """The imported model with the plugins of `blocks` applied, as a run builds it from checkpoint.init_from_hf."""
    cfg, _ = read_dense_dir(directory)
    configs = [validate_plugin_config(b) for b in blocks]
    stack = PluginStack.from_configs(configs)
    cfg = stack.configure(cfg.model_copy(update={"attention": "eager"}))
    model = build_model(cfg, stack, ModelInit(seed=0, init_from_hf=directory), torch.device("cpu"))
    return configs, stack, cfg, model


def batch(stack: PluginStack, seed: int) -> Batch:
    """Two rows of random tokens (two documents in the first), with the plugins' batch fields."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, ROW), generator=g)
    docs = torch.tensor([[0] * 30 + [1] * (ROW - 30), [0] * ROW])
    labels = torch.where(docs[:, 1:] == docs[:, :-1], ids[:, 1:], IGNORE_INDEX)
    labels = torch.cat([labels, torch.full((2, 1), IGNORE_INDEX)], 1)
    pos = torch.stack([torch.cat([torch.arange(30), torch.arange(ROW - 30)]), torch.arange(ROW)])
    fields = {"input_ids": ids, "labels": labels, "doc_ids": docs, "position_ids": pos}
    for transform in stack.batch_transforms():
        fields = {**fields, **transform(fields, [seed, seed + 1])}
    extras = {k: v for k, v in fields.items() if k not in ("input_ids", "labels", "doc_ids", "position_ids")}
    return Batch(ids, fields["labels"], pos, docs, extras=extras)


def train(stack: PluginStack, model: Transformer, steps: list[int]) -> None:
    """AdamW steps through the plugin stack (the LM loss and every plugin's terms); frozen groups stay frozen."""
    frozen = {id(p) for g in stack.param_groups(model) if g.frozen for p in g.params}
    opt = torch.optim.AdamW([p for p in model.parameters() if id(p) not in frozen], lr=1e-2)
    for step in steps:
        ctx = stack.bind(PluginContext(model=model, step=step))
        stack.on_step_start(ctx)
        b = batch(stack, step)
        loss, _, terms = lm_loss(model, b, label_norm=float((b.labels != IGNORE_INDEX).sum()), plugins=stack, ctx=ctx)
        assert torch.isfinite(loss) and all(torch.isfinite(t) for t in terms.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        stack.after_optimizer_step(ctx)
    model.eval()


def export(configs: list[PluginConfig], cfg: ModelConfig, model: Transformer,
           out: Path) -> tuple[dict[str, torch.Tensor], ExportContext]:
    """(the trained state, what the export hooks made of it), written to `out` as `slimtrain export` writes it."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fresh = PluginStack.from_configs(configs)  # a plugin keeps the modules it applied: new instances export
    ctx = fresh.export(state, cfg, STEP)
    write_hf_dir(ctx.state, cfg, out, tokenizer_dir=None, ids={}, plugins=fresh, plugin_export=ctx)
    return state, ctx


def check_plain(family: str, out: Path, state: dict[str, torch.Tensor], cfg: ModelConfig,
                configs: list[PluginConfig]) -> None:
    """The plain directory is the family's class and transformers computes the trained model's logits from it."""
    assert json.loads((out / "config.json").read_text())["architectures"] == [FAMILIES[family][0]]
    diff = compare_logits(out, state, cfg, plugins=PluginStack.from_configs(configs), step=STEP, seq_len=24)
    assert diff <= TOLERANCE, diff


# -- qat ------------------------------------------------------------------------------------------------------

QAT = {"type": "qat", "weights": {"format": "int", "bits": 4, "group_size": 32}}


@pytest.mark.parametrize("family", FAMILIES)
def test_qat_keeps_biases_and_norms_and_exports_the_family(family: str, source, tmp_path: Path) -> None:
    cfg, _ = read_dense_dir(source(family))
    dense = Transformer(cfg)
    biases = {n for n, _ in dense.named_parameters() if n.endswith(".bias")}
    assert bool(biases) == (family in ("llama", "qwen2"))  # the families' biases, which QAT must keep
    configs, stack, cfg, model = build(source(family), [QAT])
    qat = next(iter(stack))
    params = dict(model.named_parameters())
    assert biases <= set(params) and {f"{n}.bias" for n, m in qat.layers.items() if m.bias is not None} == biases
    assert not any("norm" in n for n in qat.layers)  # q/k norms (and every RMSNorm) stay as they are
    if family == "qwen3":
        assert type(model.layers[0].attn.q_norm) is RMSNorm and type(model.layers[0].attn.k_norm) is RMSNorm
    before = {n: params[n].detach().clone() for n in biases}
    train(stack, model, [1, STEP])
    assert all(not torch.equal(params[n], before[n]) for n in biases)  # they train, in high precision
    state, _ = export(configs, cfg, model, tmp_path / "hf")
    check_plain(family, tmp_path / "hf", state, cfg, configs)
    packed = tmp_path / "hf" / "packed"
    config = json.loads((packed / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family][0]] and config["quantization_config"]["ignore"] == ["lm_head"]
    rebuilt = trained_model(state, cfg, plugins=PluginStack.from_configs(configs), step=STEP)
    assert logits_diff(rebuilt, packed, seq_len=24) <= TOLERANCE  # biases beside the packed weights


# -- draft heads ------------------------------------------------------------------------------------------------

HEADS = [{"kind": "mtp", "depth": 1}, {"kind": "medusa", "num_heads": 2}, {"kind": "hydra", "num_heads": 2},
         {"kind": "eagle3", "steps": 2, "draft_vocab_size": 64}]


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_heads_train_and_export_with_the_family(family: str, source, tmp_path: Path) -> None:
    import transformers

    configs, stack, cfg, model = build(source(family), [{"type": "draft", "heads": HEADS}])
    mtp_block = model.draft["mtp"].depths[0].block
    assert {n for n, _ in mtp_block.named_parameters()} == {n for n, _ in model.layers[0].named_parameters()}
    train(stack, model, [1, STEP])
    out = tmp_path / "hf"
    state, ctx = export(configs, cfg, model, out)
    check_plain(family, out, state, cfg, configs)
    cls = FAMILIES[family][0]
    # mtp/: the family's class with the MTP layer appended; transformers' MtpModel computes our MTP logits
    mtp = json.loads((out / "mtp" / "config.json").read_text())
    assert mtp["architectures"] == [cls] and mtp["num_nextn_predict_layers"] == 1
    assert mtp.get("mtp_layer_types") == (["full_attention"] if family in ("qwen2", "qwen3") else None)
    assert any("flash-attention would slide" in n for n in ctx.notes) == (family == "mistral")
    check_transformers_mtp(model, getattr(transformers, cls), out / "mtp", [cfg.num_layers])
    # eagle3/: the verifier is the family's class; the layer's RoPE is the base's (Llama 3.1 scaling included)
    eagle = json.loads((out / "eagle3" / "config.json").read_text())
    assert eagle["speculators_config"]["verifier"]["architectures"] == [cls]
    layer = eagle["transformer_layer_config"]
    assert {k: layer[k] for k in ("rope_theta", "rope_scaling")} == eagle3_rope(cfg)
    assert (layer["rope_scaling"] or {}).get("rope_type") == ("llama3" if family == "llama" else None)
    # every variant reloads onto the base imported from the plain export (MTP blocks by either mapping)
    base_cfg, base_state = read_dense_dir(out)
    base = Transformer(base_cfg.model_copy(update={"attention": "eager"}))
    base.load_state_dict(base_state)
    for kind, from_hf in [("mtp", None), ("mtp", get_adapter(family).from_hf), ("medusa", None), ("hydra", None),
                          ("eagle3", None)]:
        loaded = load_heads(out / kind, kind, base, from_hf).state_dict()
        trained = model.draft[kind].state_dict()
        assert loaded.keys() == trained.keys()
        assert all(torch.equal(loaded[n], trained[n]) for n in trained), kind


# -- compressor -------------------------------------------------------------------------------------------------


def _compressor_block(other: Path) -> dict:
    return {"type": "compressor", "encoder": {"source": "truncate", "layers": 2}, "pooling_factor": 3,
            "context_tokens": 12, "continuation_tokens": 12, "decoder": "joint",
            "decoders": [{"name": "other", "path": str(other)}]}


@pytest.mark.parametrize("family", FAMILIES)
def test_compressor_trains_and_exports_with_the_family(family: str, source, tmp_path: Path) -> None:
    import transformers

    other = source(NEXT[family])
    configs, stack, cfg, model = build(source(family), [_compressor_block(other)])
    plugin = next(iter(stack))
    names = plugin.extra.names
    steps = sorted(next(s for s in range(1, 100) if drawn_decoder(names, s) == n) for n in names)
    train(stack, model, steps)  # one step through the run's own decoder, one through the other family's
    # the extra decoder of another family computes what transformers computes from its directory
    extra = load_extra(ExtraDecoder(name="other", path=str(other)), model.embed.weight)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert float((extra(ids).logits - theirs(input_ids=ids).logits).abs().max()) <= TOLERANCE
    state, _ = export(configs, cfg, model, tmp_path / "hf")
    check_plain(family, tmp_path / "hf", state, cfg, configs)
    saved = json.loads((tmp_path / "hf" / "compressor" / "config.json").read_text())["encoder_model"]
    assert saved["architecture"] == family and saved["sliding_window"] is None
    loaded = load_compressor(tmp_path / "hf" / "compressor")
    spans = Spans.from_lists([ids[0, :12].tolist(), ids[0, 3:8].tolist()])
    for decoder in names:
        with torch.no_grad():
            want = model.compressor.compress(spans, "cont", decoder).vectors
            assert torch.equal(loaded.compress(spans, "cont", decoder).vectors, want), decoder


@pytest.mark.parametrize("family", FAMILIES)
def test_the_encoder_runs_the_family_bidirectionally(family: str, source) -> None:
    """The truncated encoder's token states are transformers' hidden states after its layers under a mask that
    shows every token the whole span (no window either); pooling factor 1 gives them again through the pooled-query
    layer, whose q comes from q_proj directly (its bias, then the q/k norms)."""
    import transformers

    cfg, state = read_dense_dir(source(family))
    decoder = Transformer(cfg)
    decoder.load_state_dict(state)
    model_cfg = CompressorModelConfig(encoder={"source": "truncate", "layers": 2}, pooling_factor=1, final_norm=False)
    encoder = ContextCompressor.from_decoder(model_cfg, decoder.eval(), seed=0).encoder.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(source(family), dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(7))
    spans = Spans.from_lists([ids[0].tolist()])
    with torch.no_grad():
        tokens = encoder.encode_tokens(spans)
        bidirectional = torch.zeros(1, 1, 20, 20)  # additive: nothing masked
        hidden = hf(input_ids=ids, attention_mask=bidirectional, output_hidden_states=True).hidden_states[2]
        torch.testing.assert_close(tokens, hidden, atol=1e-5, rtol=0)
        torch.testing.assert_close(encoder(spans).states, tokens, atol=1e-5, rtol=0)
