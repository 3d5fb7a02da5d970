"""Our decoder against transformers' LlamaForCausalLM on tiny random configs (fp32, eager on the HF side)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slimtrain.core.registry import UnknownNameError  # noqa: E402
from slimtrain.modules.transformer import Transformer  # noqa: E402
from slimtrain.modules.transformer.generate import greedy_generate  # noqa: E402
from slimtrain.modules.hf_adapters import NameMismatch, get_adapter  # noqa: E402
from slimtrain.modules.transformer.hf_llama import from_hf, hf_config, to_hf  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "gqa-untied": dict(vocab_size=123, num_kv_heads=2),
    "mha-tied": dict(vocab_size=250, num_kv_heads=None, tie_embeddings=True, rope_theta=500000.0),
    "mqa-head_dim-override": dict(vocab_size=97, num_kv_heads=1, head_dim=32, rope_theta=1000.0, norm_eps=1e-6),
}


def _hf_twin(model: Transformer) -> Any:
    """A LlamaForCausalLM (eager attention, fp32) holding our model's weights."""
    config = hf_config(model.cfg, bos_id=1, eos_id=2)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    missing, unexpected = hf.load_state_dict(to_hf(model.state_dict(), model.cfg), strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    return hf.eval()


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_match_transformers(make_model, overrides: dict[str, Any]) -> None:
    model = make_model(**overrides)
    hf = _hf_twin(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_logits_match_transformers_with_position_ids(make_model, overrides: dict[str, Any]) -> None:
    model = make_model(**overrides)
    hf = _hf_twin(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    # Row 0 continues at an offset; row 1 uses non-contiguous positions.
    position_ids = torch.stack([torch.arange(16) + 40, torch.arange(16) * 3])
    with torch.no_grad():
        ours = model(ids, position_ids=position_ids).logits
        theirs = hf(ids, position_ids=position_ids).logits
        default = model(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    assert (ours - default).abs().max() > 1e-3  # the positions were really used


@pytest.mark.parametrize("overrides", list(CONFIGS.values())[:2], ids=list(CONFIGS)[:2])
def test_greedy_generation_matches_transformers(make_model, overrides: dict[str, Any]) -> None:
    # A larger init std makes the random model's logits peaked, so argmax has no near-ties.
    model = make_model(seed=3, init_std=0.5, **overrides)
    hf = _hf_twin(model)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    ours = greedy_generate(model, prompt, max_new_tokens=32)
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.shape == (1, 38)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("tied", [False, True])
def test_from_hf_inverts_to_hf_exactly(make_model, tied: bool) -> None:
    model = make_model(tie_embeddings=tied)
    state = model.state_dict()
    hf_state = to_hf(state, model.cfg)
    assert ("lm_head.weight" in hf_state) is not tied
    back = from_hf(hf_state, model.cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_from_hf_accepts_the_tied_head_of_a_live_hf_model(make_model) -> None:
    model = make_model(tie_embeddings=True)
    hf_state = _hf_twin(model).state_dict()  # lists lm_head.weight although it is tied
    back = from_hf(hf_state, model.cfg)
    assert torch.equal(back["lm_head.weight"], model.state_dict()["embed.weight"])


def test_save_pretrained_roundtrip(make_model, tmp_path) -> None:
    model = make_model(tie_embeddings=True)
    _hf_twin(model).save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    ids = torch.randint(0, model.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (model(ids).logits - loaded(ids).logits).abs().max() <= 1e-4
    back = from_hf(loaded.state_dict(), model.cfg)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_hf_config_fields(make_model) -> None:
    model = make_model(**CONFIGS["mqa-head_dim-override"], max_seq_len=96)
    config = hf_config(model.cfg, bos_id=5, eos_id=6, pad_id=7, dtype=torch.bfloat16)
    assert (config.num_key_value_heads, config.head_dim, config.max_position_embeddings) == (1, 32, 96)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (5, 6, 7)
    assert config.rms_norm_eps == 1e-6 and config.tie_word_embeddings is False
    theta = config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters") else config.rope_theta
    assert theta == 1000.0
    assert "bfloat16" in str(getattr(config, "dtype", None) or config.torch_dtype)


def test_to_hf_rejects_unknown_and_missing_names(make_model) -> None:
    model = make_model()
    state = dict(model.state_dict())
    state["layers.0.mlp.router.weight"] = torch.zeros(1)
    with pytest.raises(NameMismatch, match="router") as caught:
        to_hf(state, model.cfg)
    assert caught.value.unexpected == ["layers.0.mlp.router.weight"] and caught.value.missing == []
    del state["layers.0.mlp.router.weight"], state["norm.weight"]
    with pytest.raises(NameMismatch, match="norm.weight") as caught:
        to_hf(state, model.cfg)
    assert caught.value.missing == ["norm.weight"]


def test_to_hf_rejects_untied_copies_when_tied(make_model) -> None:
    model = make_model(tie_embeddings=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] += 1
    with pytest.raises(ValueError, match="tie_weights"):
        to_hf(state, model.cfg)


def test_adapter_registry() -> None:
    adapter = get_adapter("llama")
    assert adapter.hf_architecture == "LlamaForCausalLM" and adapter.to_hf is to_hf
    with pytest.raises(UnknownNameError, match="did you mean 'llama'"):
        get_adapter("lama")


def test_the_llama_adapter_registers_without_importing_transformers() -> None:
    # A plugin module registers its architecture at import; importing the registry must stay cheap.
    import subprocess
    import sys

    code = ("import sys; from slimtrain.modules.hf_adapters import ADAPTERS; "
            "print('llama' in ADAPTERS, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_bf16_logits_match_transformers_within_rounding(make_model) -> None:
    # Same op order as HF (RMSNorm statistics in fp32, cast before the scale; RoPE angles in fp32),
    # so bf16 results differ only by rounding inside matmuls: about one bf16 ulp of the logits.
    model = make_model(attention="eager")
    hf = _hf_twin(model).to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours, theirs = model(ids).logits.float(), hf(ids).logits.float()
    assert (ours - theirs).abs().max() <= 1e-2 * max(1.0, theirs.abs().max().item())
