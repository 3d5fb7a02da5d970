"""Imports of the families a new user continues from (Llama 3.x / SmolLM, Mistral, Qwen2, Qwen3): random tiny configs
made with transformers itself, saved with save_pretrained, read by our importer; our forward equals transformers'
logits and greedy tokens, a few steps at lr 0 export back to the same logits, and what we do not compute is refused
naming the key and the value."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slimtrain.modules.transformer import Transformer  # noqa: E402
from slimtrain.modules.transformer.config import ModelConfig  # noqa: E402
from slimtrain.modules.transformer.generate import cached_greedy_generate  # noqa: E402
from slimtrain.modules.transformer.hf_config import hf_config, model_config_from_hf  # noqa: E402
from slimtrain.modules.transformer.hf_llama import read_dense_dir, to_hf  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# (class prefix, config keys): odd vocabularies, GQA ratios, tied/untied, RoPE scalings, windows shorter than the rows.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-tied": ("Llama", dict(vocab_size=131, rope_parameters=LLAMA3, tie_word_embeddings=True)),
    "llama-bias-mqa": ("Llama", dict(vocab_size=97, attention_bias=True, mlp_bias=True, num_key_value_heads=1)),
    "llama-linear": ("Llama", dict(vocab_size=100, rope_parameters={"rope_type": "linear", "rope_theta": 1e4,
                                                                     "factor": 2.0})),
    "llama-yarn": ("Llama", dict(vocab_size=103, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                                   "original_max_position_embeddings": 16})),
    "llama-dynamic": ("Llama", dict(vocab_size=90, max_position_embeddings=48,
                                    rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})),
    "smollm-mha": ("Llama", dict(vocab_size=77, num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral-window": ("Mistral", dict(vocab_size=113, sliding_window=7)),
    "mistral-no-window": ("Mistral", dict(vocab_size=64, sliding_window=None, num_key_value_heads=1)),
    "qwen2-biases-tied": ("Qwen2", dict(vocab_size=128, tie_word_embeddings=True)),
    "qwen2-window": ("Qwen2", dict(vocab_size=99, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen3-head-dim": ("Qwen3", dict(vocab_size=96, head_dim=32, tie_word_embeddings=True)),
    "qwen3-bias-window": ("Qwen3", dict(vocab_size=101, attention_bias=True, use_sliding_window=True, sliding_window=6,
                                        max_window_layers=2)),
}


def _hf_model(prefix: str, keys: dict[str, Any], seed: int = 0) -> Any:
    """A random transformers model of the family; biases and norm scales drawn too, so that each one matters."""
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(**{**BASE, **keys})
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
            elif "norm" in name:
                param.normal_(1.0, 0.2)
    return model


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def imported(request, tmp_path_factory) -> tuple[Any, Transformer, Path]:
    """(transformers model, our model imported from its save_pretrained directory, the directory)."""
    prefix, keys = CASES[request.param]
    hf = _hf_model(prefix, keys)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(str(path))
    cfg, state = read_dense_dir(path)
    ours = Transformer(cfg.model_copy(update={"attention": "eager"})).eval()
    ours.load_state_dict(state)
    return hf, ours, path


def test_logits_and_greedy_tokens_match_transformers(imported) -> None:
    hf, ours, _ = imported
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() <= 1e-4
    prompt = ids[:1, :8]
    theirs = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    assert torch.equal(cached_greedy_generate(ours, prompt, 32), theirs)


def test_sdpa_equals_eager_on_every_option(imported) -> None:
    _, ours, _ = imported
    sdpa = Transformer(ours.cfg.model_copy(update={"attention": "sdpa"})).eval()
    sdpa.load_state_dict(ours.state_dict())
    doc_ids = torch.tensor([[0] * 13 + [1] * 20 + [2] * 7, [0] * 40])  # packed: windows meet document bounds
    positions = torch.cat([torch.arange(13), torch.arange(20), torch.arange(7)]).expand(2, 40).clone()
    positions[1] = torch.arange(40)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ours(ids, position_ids=positions, doc_ids=doc_ids).logits
        assert (sdpa(ids, position_ids=positions, doc_ids=doc_ids).logits - ref).abs().max() <= 1e-5


def test_steps_at_lr_0_export_the_same_logits(imported, tmp_path: Path) -> None:
    hf, ours, path = imported
    model = Transformer(ours.cfg.model_copy(update={"attention": "sdpa"})).train()
    model.load_state_dict(ours.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    config = hf_config(model.cfg, bos_id=None, eos_id=None)
    assert config.architectures == json.loads((path / "config.json").read_text())["architectures"]
    back = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = back.load_state_dict(to_hf(model.state_dict(), model.cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    back.tie_weights()
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max() <= 1e-5


def test_written_config_reads_back_to_the_same_model(imported) -> None:
    _, ours, _ = imported
    written = hf_config(ours.cfg, bos_id=1, eos_id=2).to_dict()
    again = model_config_from_hf(written)
    assert again.model_dump(exclude={"attention"}) == ours.cfg.model_dump(exclude={"attention"})


def _config(prefix: str = "Llama", **keys: Any) -> dict[str, Any]:
    hf = getattr(transformers, f"{prefix}Config")(**{**BASE, "vocab_size": 64, **keys})
    return {**hf.to_dict(), "architectures": [f"{prefix}ForCausalLM"]}


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "holds a ['GPT2LMHeadModel'] model; slimtrain imports LlamaForCausalLM, "
                                             "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters.rope_type='longrope'"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
])
def test_what_the_decoder_does_not_compute_is_refused_naming_it(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=r".*".join(map(__import__("re").escape, message.split("*")))):
        model_config_from_hf({**_config(), **change})


@pytest.mark.parametrize("fields, message", [
    (dict(architecture="llama", qk_norm=True), "model.qk_norm=True but llama's class has no q/k norms"),
    (dict(architecture="qwen3"), "model.qk_norm=False but qwen3's class always has q/k norms"),
    (dict(architecture="qwen2", qkv_bias=False), "Qwen2's class has q/k/v biases and none on o"),
    (dict(architecture="llama", sliding_window=8), "LlamaForCausalLM has no sliding window"),
    (dict(architecture="qwen2", qkv_bias=True, sliding_window=8, sliding_window_layers=[0]),
     "give a run of layers that ends at 3"),
    (dict(architecture="mistral", qkv_bias=True), "Mistral's class has no attention biases"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "needs original_max_seq_len"),
])
def test_family_options_a_class_cannot_compute_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        ModelConfig(vocab_size=64, **fields)


def test_dynamic_scaling_grows_past_the_context_like_transformers() -> None:
    hf = _hf_model("Llama", CASES["llama-dynamic"][1])
    cfg = model_config_from_hf({**hf.config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    ours = Transformer(cfg.model_copy(update={"attention": "eager"})).eval()
    ours.load_state_dict({k: v for k, v in _ours_state(hf, cfg).items()})
    ids = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))
    far = torch.arange(20)[None] + 60  # positions past max_position_embeddings=48: the base grows
    with torch.no_grad():
        assert (hf(ids, position_ids=far).logits - ours(ids, position_ids=far).logits).abs().max() <= 1e-4


def _ours_state(hf: Any, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from slimtrain.modules.transformer.hf_llama import from_hf

    return from_hf(hf.state_dict(), cfg)


def test_flex_honours_the_window_like_eager() -> None:
    pytest.importorskip("torch.nn.attention.flex_attention")
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                      architecture="qwen2", qkv_bias=True, sliding_window=5, sliding_window_layers=[1],
                      attention="eager", max_seq_len=64)
    eager = Transformer(cfg).eval()
    flex = Transformer(cfg.model_copy(update={"attention": "sdpa"})).eval()
    flex.load_state_dict(eager.state_dict())
    flex.cfg = flex.cfg.model_copy(update={"attention": "flex"})  # built where check_backend passes
    doc_ids = torch.tensor([[0] * 9 + [1] * 23, [0] * 32])
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = eager(ids, doc_ids=doc_ids).logits
        assert (flex(ids, doc_ids=doc_ids).logits - ref).abs().max() <= 1e-5
        assert (flex(ids).logits - eager(ids).logits).abs().max() <= 1e-5  # plain rows: the window's block mask


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "varlen", "flash"])
def test_cuda_backends_honour_the_window_or_refuse(backend: str) -> None:
    cfg = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, architecture="mistral", sliding_window=9, attention="eager", max_seq_len=128)
    eager = Transformer(cfg).cuda().to(torch.bfloat16).eval()
    other = Transformer(cfg.model_copy(update={"attention": "sdpa"})).cuda().to(torch.bfloat16).eval()
    other.load_state_dict(eager.state_dict())
    other.cfg = other.cfg.model_copy(update={"attention": backend})
    doc_ids = torch.tensor([[0] * 40 + [1] * 88, [0] * 128], device="cuda")
    ids = torch.randint(0, 64, (2, 128), device="cuda")
    try:
        with torch.no_grad():
            out = other(ids, doc_ids=doc_ids).logits
    except RuntimeError as exc:
        assert "cannot compute model.sliding_window" in str(exc) or "needs" in str(exc) or "install" in str(exc)
        return
    with torch.no_grad():
        ref = eager(ids, doc_ids=doc_ids).logits
    assert (out.float() - ref.float()).abs().max() <= 5e-2
