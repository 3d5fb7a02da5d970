"""Model construction: parameter count, deterministic init, tying, dtype, and input errors."""

from __future__ import annotations

import math

import pytest
import torch

from slimtrain.core.documents import Documents
from slimtrain.modules.transformer import ModelConfig, Transformer, TransformerOutput


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(tie_embeddings=True), dict(num_kv_heads=None), dict(num_kv_heads=1, head_dim=24, hidden_size=60)],
    ids=["gqa", "tied", "mha", "head_dim-override"],
)
def test_num_params_counts_the_real_parameters(make_config, overrides) -> None:
    cfg = make_config(**overrides)
    assert cfg.num_params() == _param_count(Transformer(cfg))


def test_flops_per_token_counts_the_head_once_and_not_the_embedding_lookup(make_config) -> None:
    untied, tied = make_config(), make_config(tie_embeddings=True)
    # Same matmuls either way: tying changes the parameter count, not the work per token.
    assert untied.flops_per_token(64) == tied.flops_per_token(64)


def test_flops_per_token_for_the_1b_benchmark_model_in_both_conventions() -> None:
    cfg = ModelConfig(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                      vocab_size=32000)
    n = cfg.num_params() - 32000 * 2048  # the head's matmul counts, the embedding lookup does not
    full_rows = 12 * 22 * 32 * 64 * 4096  # attention FLOPs per token over whole rows
    assert cfg.flops_per_token(4096) == 6 * n + full_rows / 2
    assert cfg.flops_per_token(4096, causal=False) == 6 * n + full_rows
    assert cfg.flops_per_token(4096, causal=False) / cfg.flops_per_token(4096) == pytest.approx(1.151, abs=1e-3)


def test_same_seed_gives_bitwise_same_weights(make_model) -> None:
    a, b, c = make_model(seed=7), make_model(seed=7), make_model(seed=8)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_construction_is_deterministic_given_torch_rng(make_config) -> None:
    torch.manual_seed(3)
    a = Transformer(make_config())
    torch.manual_seed(3)
    b = Transformer(make_config())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_init_scales_residual_outputs_and_sets_norms_to_one(make_config) -> None:
    cfg = make_config(hidden_size=128, intermediate_size=256, num_layers=8, init_std=0.05)
    model = Transformer(cfg)
    model.init_weights(0)
    residual = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    layer = model.layers[3]
    assert layer.attn.q_proj.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert layer.attn.o_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.embed.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert all(torch.all(m.weight == 1) for m in (layer.input_norm, layer.post_attn_norm, model.norm))


def test_init_draws_the_same_numbers_in_any_dtype(make_model) -> None:
    fp32 = make_model(seed=5)
    bf16 = Transformer(fp32.cfg).to(torch.bfloat16)
    bf16.init_weights(5)
    for name, p in fp32.state_dict().items():
        assert torch.equal(p.to(torch.bfloat16), bf16.state_dict()[name]), name


def test_tied_head_shares_the_embedding_and_survives_meta_materialisation(make_config) -> None:
    cfg = make_config(tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(0)  # re-ties: to_empty replaced the two parameters separately
    assert model.lm_head.weight is model.embed.weight
    assert not model.embed.weight.is_meta and torch.isfinite(model.embed.weight).all()


def test_submodule_layout_the_plugins_rely_on(make_model) -> None:
    model = make_model()
    names = {n for n, _ in model.named_modules()}
    for proj in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        module = model.get_submodule(f"layers.1.{proj}")
        assert type(module) is torch.nn.Linear and module.bias is None
    assert {"embed", "norm", "lm_head", "layers.0.input_norm", "layers.0.post_attn_norm"} <= names


def test_compute_dtype_follows_the_parameters(make_model) -> None:
    model = make_model().to(torch.bfloat16)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 8))
    out = model(ids)
    assert isinstance(out, TransformerOutput)
    assert out.logits.dtype == torch.bfloat16 and out.logits.shape == (2, 8, model.cfg.vocab_size)
    assert out.hidden_states.dtype == torch.bfloat16 and out.hidden_states.shape == (2, 8, model.cfg.hidden_size)


def test_unresolved_vocab_size_is_named(make_config) -> None:
    with pytest.raises(ValueError, match="model.vocab_size"):
        Transformer(make_config(vocab_size=None))


def test_bad_inputs_are_named(make_model) -> None:
    model = make_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="doc_ids shape"):
        model(torch.zeros(1, 8, dtype=torch.long), doc_ids=torch.zeros(1, 7, dtype=torch.long))
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="doc_ids on meta but the inputs on cpu; move the batch"):
        model(ids, doc_ids=ids.to("meta"))
    packed = Documents.checked_on_host(torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]]))
    stray = Documents(packed.ids, packed.single, (packed.varlen[0].to("meta"), packed.varlen[1]))
    with pytest.raises(ValueError, match="cu_seqlens on meta but the inputs on cpu"):
        model(ids, doc_ids=stray)
