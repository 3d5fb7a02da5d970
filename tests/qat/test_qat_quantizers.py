"""Quantizer numerics against their specifications, gradient estimators, layer selection and bad input."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from slimtrain.modules.plugin_registry import build_plugins, validate_plugin_config
from slimtrain.modules.qat.config import QATConfig, QuantSpec
from slimtrain.modules.qat.estimators import fake_quant_lsq, fake_quant_ste, lsq_grad_scale, lsq_init_step
from slimtrain.modules.qat.formats import round_fp4_e2m1
from slimtrain.modules.qat.reference import compute_qparams, fake_quant_reference
from slimtrain.modules.transformer import Transformer
from qat_helpers import TINY


def spec(**kw) -> QuantSpec:
    return QuantSpec(**kw).check_role("weights", 4)


def test_fp4_e2m1_grid_and_ties_to_even() -> None:
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert torch.equal(round_fp4_e2m1(grid), grid) and torch.equal(round_fp4_e2m1(-grid), -grid)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert torch.equal(round_fp4_e2m1(ties), torch.tensor([0, 1, 1, 2, 2, 4, 4.0]))


def test_int_group_symmetric_and_asymmetric_grids() -> None:
    w = torch.randn(4, 64)
    y, _, qp = fake_quant_reference(w, spec(format="int", bits=4, group_size=32))
    assert qp.scale.shape == (4, 2)
    codes = y.unflatten(-1, (2, 32)) / qp.scale.unsqueeze(-1)
    assert torch.allclose(codes, codes.round(), atol=1e-5) and codes.abs().max() <= 7 + 1e-5
    assert torch.allclose(y.unflatten(-1, (2, 32)).abs().amax(-1), w.unflatten(-1, (2, 32)).abs().amax(-1))
    y, _, qp = fake_quant_reference(w, spec(format="int", bits=3, symmetric=False, granularity="channel"))
    levels = (y / qp.scale + qp.zero_point).round()
    assert levels.min() >= -4 and levels.max() <= 3 and all(len(r.unique()) <= 8 for r in y)


def test_mx_scale_is_a_power_of_two_per_ocp_block() -> None:
    w = torch.randn(8, 64) * 3
    for fmt, emax in (("mxfp4", 2), ("mxfp8", 8)):
        qp = compute_qparams(w, spec(format=fmt))
        amax = w.unflatten(-1, (2, 32)).abs().amax(-1)
        assert torch.equal(qp.scale, 2.0 ** (torch.floor(torch.log2(amax)) - emax))


def test_nvfp4_two_level_scales() -> None:
    w = torch.randn(8, 64)
    qp = compute_qparams(w, spec(format="nvfp4"))
    assert qp.scale.dtype == torch.float8_e4m3fn and qp.scale.shape == (8, 4)
    assert torch.allclose(qp.global_scale, 448 * 6 / w.abs().max())
    y, _, _ = fake_quant_reference(w, spec(format="nvfp4"))
    assert (y - w).abs().max() < 0.2 * w.abs().max()


def test_ternary_matches_bitnet_b158() -> None:
    w = torch.randn(16, 64)
    y, _, qp = fake_quant_reference(w, spec(format="ternary"))
    s = w.abs().mean()
    assert torch.allclose(y, (w / s).round().clamp(-1, 1) * s)
    assert set((y / qp.scale).round().unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_bitnet_activations_are_8_bit_per_token_absmax() -> None:
    x = torch.randn(3, 5, 64)
    act = QuantSpec(format="int", bits=8, granularity="token").check_role("activations", 8)
    y, _, _ = fake_quant_reference(x, act)
    s = 127 / x.abs().amax(-1, keepdim=True)
    assert torch.allclose(y, (x * s).round().clamp(-128, 127) / s, atol=1e-6)


def test_ste_passes_gradients_and_clipped_ste_drops_clamped_ones() -> None:
    x = torch.tensor([[0.1, -0.2, 100.0] + [0.05] * 29], requires_grad=True)
    mx = spec(format="mxfp4")  # the block's scale is 2**(6-2): 100/16 = 6.25 rounds to 6, still on the grid
    fake_quant_ste(x, mx).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    x.grad = None
    fp8 = spec(format="fp8_e4m3")
    w = torch.tensor([1.0, 2.0, -3.0], requires_grad=True)
    fake_quant_ste(w, fp8, clipped=True).sum().backward()
    assert torch.equal(w.grad, torch.ones(3))  # absmax scaling clips nothing


def test_lsq_gradient_follows_the_paper() -> None:
    s4 = spec(format="int", bits=4, granularity="tensor")
    w = torch.tensor([[0.3, -1.2, 5.0, 0.01]], requires_grad=True)
    step = torch.tensor([0.25], requires_grad=True)
    fake_quant_lsq(w, s4, step).sum().backward()
    v = w.detach() / 0.25
    inside = (v >= -8) & (v <= 7)
    assert torch.equal(w.grad, inside.float())  # STE inside the range, zero where clamped
    expected = torch.where(inside, v.round() - v, v.clamp(-8, 7)).sum() * lsq_grad_scale(s4, 4)
    assert torch.allclose(step.grad, expected.reshape(1))
    assert lsq_grad_scale(s4, 4) == pytest.approx(1 / math.sqrt(4 * 7))


def test_lsq_starts_from_the_round_to_nearest_grid() -> None:
    """Calibrated by absmax (the default), the first quantized forward of an LSQ layer equals round-to-nearest
    PTQ bit for bit, so QAT starts at the PTQ model; the paper's mean init is about twice as coarse at int4."""
    torch.manual_seed(0)
    model = Transformer(TINY)
    ids = torch.arange(16)[None]
    rtn, lsq, mean = (build_plugins([validate_plugin_config({"type": "qat", "start_step": 0, **kw})])[0] for kw in (
        {}, {"estimator": "lsq"}, {"estimator": "lsq", "lsq_init": "mean"}))
    logits = []
    for plugin in (rtn, lsq, mean):
        m = Transformer(TINY)
        m.load_state_dict(model.state_dict())
        plugin.apply(m)
        plugin.set_step(1)
        logits.append(m(ids).logits)
        layer = next(iter(plugin.layers.values()))
        if plugin is not rtn:
            assert bool(layer.weight_step_calibrated)
    assert torch.equal(logits[0], logits[1]) and not torch.equal(logits[0], logits[2])
    w = model.layers[0].mlp.up_proj.weight
    ratio = (lsq_init_step(w, spec(), "mean") / lsq_init_step(w, spec(), "absmax")).median()
    assert 1.5 < float(ratio) < 2.5


def test_lsq_lr_scale_moves_the_learned_steps_that_many_times_as_far() -> None:
    """Adam's first update is lr x sign(gradient) whatever the gradient's size, so a gain seen through
    lsq_lr_scale=10 moves the step ten times as far as the plain gain; 1 is the plain gain itself."""
    ids = torch.arange(16)[None]
    moved = {}
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        model = Transformer(TINY)
        [plugin] = build_plugins([validate_plugin_config({"type": "qat", "estimator": "lsq", "start_step": 0,
                                                          "lsq_lr_scale": scale})])
        plugin.apply(model)
        plugin.set_step(1)
        opt = torch.optim.Adam([p for n, p in model.named_parameters() if n.endswith("weight_step_gain")], lr=1e-3,
                               eps=1e-30)  # no eps: the first update is exactly lr x sign(gradient)
        layer = model.layers[0].mlp.up_proj
        torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:]).backward()
        before = layer.lsq_step().detach().clone()  # calibrated in the forward above
        opt.step()
        moved[scale] = (layer.lsq_step().detach() - before) / before
        if scale == 1.0:
            assert torch.equal(layer.lsq_step(), layer.weight_step_base * layer.weight_step_gain.view_as(before))
    assert (moved[1.0].abs() > 0.99e-3).float().mean() > 0.9  # gains with a gradient moved by lr
    assert torch.allclose(moved[10.0], 10 * moved[1.0], rtol=1e-3, atol=1e-6)


def test_default_selection_keeps_embedding_and_head_in_high_precision() -> None:
    [plugin] = build_plugins([validate_plugin_config({"type": "qat"})])
    model = Transformer(TINY)
    plugin.apply(model)
    assert sorted(plugin.layers) == sorted(n for n, m in model.named_modules()
                                            if isinstance(m, torch.nn.Linear) and n != "lm_head")
    assert type(model.lm_head) is torch.nn.Linear and type(model.embed) is torch.nn.Embedding


def test_fake_quant_starts_after_start_step() -> None:
    [plugin] = build_plugins([validate_plugin_config({"type": "qat", "start_step": 2})])
    torch.manual_seed(0)
    model = Transformer(TINY)
    dense = model(torch.arange(8)[None]).logits
    plugin.apply(model)
    for step, changed in ((1, False), (2, False), (3, True)):
        plugin.set_step(step)
        assert (not torch.equal(model(torch.arange(8)[None]).logits, dense)) == changed, step


@pytest.mark.parametrize("block, message", [
    ({"weights": {"format": "int", "bits": 9}}, "bits=9 is not supported for format 'int'; use 2 to 8"),
    ({"weights": {"format": "mxfp4", "group_size": 16}}, "format 'mxfp4' uses blocks of 32"),
    ({"weights": {"format": "nvfp4", "granularity": "tensor"}}, "granularity 'tensor' is not supported"),
    ({"weights": {"format": "fp8_e4m3", "symmetric": False}}, "symmetric=false is only supported for format 'int'"),
    ({"weights": {"format": "int", "granularity": "channel", "group_size": 32}}, "needs granularity group or block"),
    ({"activations": {"format": "int", "granularity": "channel"}}, "activations.granularity 'channel'"),
    ({"weights": {"format": "mxfp4"}, "estimator": "lsq"}, "estimator 'lsq' learns the step"),
])
def test_unsupported_combinations_fail_at_validation(block: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        QATConfig(type="qat", **block)


@pytest.mark.parametrize("block, message", [
    ({"weights": {"group_size": 128}}, "weights.group_size=128 does not divide the 64 input features of "
                                       "'layers.0.attn.q_proj'; use one of [16, 32, 64]"),
    ({"include": ["layers.*.mlp.gate"]}, "include[0]='layers.*.mlp.gate' matches no Linear layer"),
    ({"exclude": ["head"]}, "exclude[0]='head' matches no module"),
    ({"include": ["lm_head"]}, "leaves no Linear layer to quantize"),
])
def test_bad_layers_fail_before_training(block: dict, message: str) -> None:
    [plugin] = build_plugins([validate_plugin_config({"type": "qat", **block})])
    with torch.device("meta"):
        model = Transformer(TINY)
    with pytest.raises(ValueError, match=re.escape(message)):
        plugin.apply(model)


def test_tied_head_cannot_be_quantized() -> None:
    [plugin] = build_plugins([validate_plugin_config({"type": "qat", "exclude": []})])
    with pytest.raises(ValueError, match="shares its weight with the embedding"):
        plugin.apply(Transformer(TINY.model_copy(update={"tie_embeddings": True})))


def test_docs_describe_every_qat_key() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "qat.md").read_text()
    for name in [*QATConfig.model_fields, *QuantSpec.model_fields]:
        if name == "type":
            continue
        assert f"`{name}`" in doc, name
