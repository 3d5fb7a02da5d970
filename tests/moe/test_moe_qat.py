"""MoE composed with QAT: the stacked expert weights are fake-quantized exactly as one QATLinear per expert would
quantize its weight (forward and gradients), only from QAT's start step, in a model built with both plugins
(routers and shared-expert gates left in high precision), with LSQ state that reloads exactly; shapes that do
not tile and activation quantization are refused by name; the transform follows a share of the experts when
they are sharded (expert parallelism; a transform with state that cannot is refused); and the packed export holds
every expert's packed tensors, which dequantize to the trained weights bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from slimtrain.modules.context import LocalCommunicator
from slimtrain.modules.moe.experts import GroupedExperts, expert_loop
from slimtrain.modules.moe.layer import MoELayer
from slimtrain.modules.moe.router import Routing, route_softmax
from slimtrain.modules.plugin import PluginContext
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.qat.config import QATConfig
from slimtrain.modules.qat.export import dequantize_packed, scheme, slice_qparams
from slimtrain.modules.qat.linear import QATLinear
from slimtrain.modules.qat.reference import QParams
from slimtrain.modules.qat.stacked import StackedWeightQAT
from slimtrain.modules.quantizable import QuantizableWeights
from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.trainer.backends.build import ModelInit, build_model

E, H, I, T = 4, 32, 64, 24  # experts, hidden, expert width, tokens
# Every weight format and granularity QAT offers, each checked against QATLinear on every expert.
SPECS = {
    "int4-g16": {"weights": {"format": "int", "bits": 4, "group_size": 16}},
    "int4-g16-lsq": {"weights": {"format": "int", "bits": 4, "group_size": 16}, "estimator": "lsq",
                     "lsq_lr_scale": 3.0},
    "int8-tensor-lsq": {"weights": {"format": "int", "bits": 8, "granularity": "tensor"}, "estimator": "lsq"},
    "int3-asym-channel-clipped": {"weights": {"format": "int", "bits": 3, "symmetric": False,
                                              "granularity": "channel"}, "estimator": "clipped_ste"},
    "ternary": {"weights": {"format": "ternary"}},
    "fp8-block16": {"weights": {"format": "fp8_e4m3", "granularity": "block", "group_size": 16}},
    "mxfp4": {"weights": {"format": "mxfp4"}},
    "nvfp4": {"weights": {"format": "nvfp4"}},
}


def qat_cfg(block: dict) -> QATConfig:
    return validate_plugin_config({"type": "qat", "kernels": "torch", **block})


def experts_with_routing(seed: int = 0) -> tuple[GroupedExperts, torch.Tensor, Routing]:
    g = torch.Generator().manual_seed(seed)
    experts = GroupedExperts(E, H, I, impl="loop")
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(experts.gate_up.shape, generator=g) * 0.1)
        experts.down.copy_(torch.randn(experts.down.shape, generator=g) * 0.1)
    x = torch.randn(T, H, generator=g)
    return experts, x, route_softmax(torch.randn(T, E, generator=g), 2)


def per_expert_linears(weight: torch.Tensor, cfg: QATConfig) -> list[QATLinear]:
    """One QATLinear per expert, holding a copy of its slice: the reference quantizer."""
    out = []
    for e in range(weight.shape[0]):
        base = nn.Linear(weight.shape[2], weight.shape[1], bias=False)
        base.weight = nn.Parameter(weight[e].detach().clone())
        layer = QATLinear(base, cfg)
        layer.active = True
        out.append(layer)
    return out


@pytest.mark.parametrize("case", list(SPECS))
def test_quantized_experts_equal_the_loop_over_per_expert_qat_linears(case: str) -> None:
    cfg = qat_cfg(SPECS[case])
    experts, x, routing = experts_with_routing()
    transform = StackedWeightQAT(experts.matmul_weights(), cfg)
    experts.set_weight_transform(transform)
    transform.active = True
    ref = {name: per_expert_linears(w, cfg) for name, w in experts.matmul_weights().items()}
    ref_w = {name: torch.stack([layer.quantized_weight() for layer in layers]) for name, layers in ref.items()}
    for name in ref_w:  # the weights the products use: bit for bit
        assert torch.equal(experts.transformed_weight(name), ref_w[name]), name

    out = experts(x, routing)
    want = expert_loop(x, routing, ref_w["gate_up"], ref_w["down"])
    assert torch.equal(out, want)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    want.backward(grad)
    for name, layers in ref.items():  # the straight-through (or clipped, or LSQ) gradient reaches the stack
        param = experts.matmul_weights()[name]
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.equal(param.grad, torch.stack([layer.weight.grad for layer in layers])), name
        if cfg.estimator == "lsq":  # and the learned steps get each expert's own step gradient
            gain = getattr(transform, f"{name}_step_gain").grad
            assert torch.equal(gain, torch.cat([layer.weight_step_gain.grad for layer in layers])), name


def test_grouped_computation_uses_the_quantized_weights() -> None:
    """Whatever computation `auto` picks here (torch's grouped GEMM where it runs), it multiplies by the
    fake-quantized weights: it agrees with the loop over them."""
    cfg = qat_cfg(SPECS["int4-g16"])
    experts, x, routing = experts_with_routing()
    experts.impl = "auto"
    transform = StackedWeightQAT(experts.matmul_weights(), cfg)
    experts.set_weight_transform(transform)
    transform.active = True
    want = expert_loop(x, routing, experts.transformed_weight("gate_up"), experts.transformed_weight("down"))
    torch.testing.assert_close(experts(x, routing), want, rtol=1e-5, atol=1e-6)
    plain = expert_loop(x, routing, experts.gate_up, experts.down)
    assert not torch.allclose(want, plain, atol=1e-6)  # the quantization shows


def test_the_seam_is_declared_and_removable() -> None:
    experts, x, routing = experts_with_routing()
    assert isinstance(experts, QuantizableWeights) and not isinstance(nn.Linear(2, 2), QuantizableWeights)
    before = experts(x, routing)
    experts.set_weight_transform(lambda name, w: w * 0 if name == "down" else w)
    assert not experts(x, routing).any()
    transform = StackedWeightQAT(experts.matmul_weights(), qat_cfg({"estimator": "lsq", "weights": {"group_size": 16}}))
    experts.set_weight_transform(transform)  # a module: its state is the model's
    assert "weight_transform.gate_up_step_gain" in dict(experts.named_parameters())
    experts.set_weight_transform(None)
    assert not [n for n, _ in experts.named_parameters() if "weight_transform" in n]
    assert torch.equal(experts(x, routing), before)


# -- the model built with both plugins ------------------------------------------------------------------------

MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, max_seq_len=32,
                    num_layers=2, attention="eager")
MOE = {"type": "moe", "num_experts": 4, "top_k": 2, "num_shared_experts": 1, "shared_expert_gate": True,
       "expert_intermediate_size": 32}
LSQ = {"type": "qat", "weights": {"bits": 4, "group_size": 16}, "estimator": "lsq", "start_step": 2}


def stack_of(*blocks: dict) -> PluginStack:
    return PluginStack.from_configs([validate_plugin_config(b) for b in blocks])


def build(stack: PluginStack, seed: int = 0) -> nn.Module:
    return build_model(MODEL, stack, ModelInit(seed=seed), torch.device("cpu"))


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoELayer)]


def train(model: nn.Module, stack: PluginStack, steps: range, seed: int = 0) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g, losses = torch.Generator().manual_seed(seed), []
    for step in steps:
        stack.on_step_start(PluginContext(model=model, step=step))
        ids = torch.randint(0, MODEL.vocab_size, (2, 16), generator=g)
        logits = model(ids[:, :-1]).logits
        loss = nn.functional.cross_entropy(logits.reshape(-1, MODEL.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_a_model_with_moe_and_qat_quantizes_its_experts_not_its_routers() -> None:
    stack = stack_of(MOE, LSQ)
    model = build(stack)
    qat = stack.plugins[-1]
    assert sorted(qat.stacked) == ["layers.0.mlp.experts", "layers.1.mlp.experts"]
    for moe in moe_layers(model):
        assert isinstance(moe.experts.weight_transform, StackedWeightQAT)
        assert type(moe.router) is nn.Linear and type(moe.shared.gate) is nn.Linear  # default exclude
        assert all(isinstance(getattr(moe.shared, p), QATLinear) for p in ("gate_proj", "up_proj", "down_proj"))
        assert moe.experts.weight_transform.gate_up_step_base.shape == (4, 64, 2)  # [E, 2I, H / 16]
        assert moe.experts.weight_transform.gate_up_step_gain.dim() == 1  # no weight decay, like QATLinear's
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        qat.set_step(2)  # before the start step: the experts compute with their weights as they are
        for moe in moe_layers(model):
            assert moe.experts.transformed_weight("gate_up") is moe.experts.gate_up
        before = model(ids).logits
        for moe in moe_layers(model):
            moe.experts.weight_transform.active = True
        assert not torch.equal(model(ids).logits, before)


def test_experts_are_exact_before_the_start_step_and_lsq_state_reloads_exactly() -> None:
    """A run's experts are untouched by QAT until its start step (the same losses as MoE alone), and a model
    rebuilt from the state dict (a resume) computes what the trained one computes, without recalibrating."""
    ste = {**LSQ, "estimator": "ste"}  # no state of its own: the build draws the same weights as MoE alone
    plain_stack, qat_stack = stack_of(MOE), stack_of(MOE, ste)
    plain, model = build(plain_stack), build(qat_stack)
    assert train(model, qat_stack, range(1, 3)) == train(plain, plain_stack, range(1, 3))
    assert train(model, qat_stack, range(3, 4)) != train(plain, plain_stack, range(3, 4))  # fake-quant on

    model = build(qat_stack := stack_of(MOE, LSQ))
    train(model, qat_stack, range(1, 6))  # fake-quant from step 3: steps calibrated once, then learned
    transform = moe_layers(model)[0].experts.weight_transform
    assert bool(transform.gate_up_step_calibrated) and not transform.calibrate_pending
    assert not torch.equal(transform.gate_up_step_gain, torch.ones_like(transform.gate_up_step_gain))

    resumed_stack = stack_of(MOE, LSQ)
    resumed = build(resumed_stack, seed=1)
    resumed.load_state_dict(model.state_dict())
    resumed_stack.plugins[-1].set_step(6)
    assert not moe_layers(resumed)[0].experts.weight_transform.calibrate_pending  # the flag came back
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(resumed(ids).logits, model(ids).logits)


def test_untileable_blocks_and_expert_activations_are_refused_by_name() -> None:
    fp8 = {"type": "qat", "weights": {"format": "fp8_e4m3", "granularity": "block", "group_size": 32},
           "include": ["layers.*.mlp.experts"]}
    with pytest.raises(ValueError, match=r"block 32x32 does not tile each matrix \[out, in\] of "
                                         r"'layers.0.mlp.experts.down' \(32x48\)"):
        build(stack_of({**MOE, "expert_intermediate_size": 48}, fp8))
    group = {"type": "qat", "weights": {"group_size": 64}, "include": ["*.experts"]}
    with pytest.raises(ValueError, match=r"group_size=64 does not divide the 32 input features of each matrix "
                                         r"\[out, in\] of 'layers.0.mlp.experts.gate_up'"):
        build(stack_of(MOE, group))
    w4a8 = {"type": "qat", "weights": {"group_size": 16}, "activations": {"format": "int", "bits": 8,
                                                                           "granularity": "token"}}
    with pytest.raises(ValueError, match=r"activations .*'layers.0.mlp.experts'.*set activations: null.*"
                                         r"'\*.experts'"):
        build(stack_of(MOE, w4a8))
    excluded = build(stack_of(MOE, {**w4a8, "exclude": ["lm_head", "*.router", "*.shared.gate", "*.experts"]}))
    assert getattr(moe_layers(excluded)[0].experts, "weight_transform", None) is None


def test_include_patterns_select_experts_and_refuse_high_precision_linears() -> None:
    from slimtrain.modules.quantizable import high_precision_reason, keep_high_precision

    stack = stack_of(MOE, {"type": "qat", "weights": {"group_size": 16}, "include": ["layers.1.mlp.experts"]})
    build(stack)
    assert list(stack.plugins[-1].stacked) == ["layers.1.mlp.experts"] and not stack.plugins[-1].layers

    model = build(stack_of(MOE))  # the MoE layer marks its router: read in fp32, never called as a Linear
    qat = stack_of({"type": "qat", "include": ["layers.0.mlp.router"]}).plugins[0]
    with pytest.raises(ValueError, match="include\\[0\\]='layers.0.mlp.router' matches only modules that stay in "
                                         "high precision.*computed in fp32"):
        qat.apply(model)
    qat = stack_of({"type": "qat", "weights": {"group_size": 16}, "exclude": ["lm_head"]}).plugins[0]
    qat.apply(model)  # a pattern that selects everything skips the marked routers
    assert all(type(layer.mlp.router) is nn.Linear for layer in model.layers)
    plain = nn.Linear(4, 4)
    keep_high_precision(plain, "a reason")
    assert high_precision_reason(plain) == "a reason"


def test_qparams_of_a_row_block_must_align_with_the_tiles() -> None:
    spec = qat_cfg(SPECS["fp8-block16"]).weights
    qp = QParams(torch.arange(4.0).reshape(2, 2))  # a 32x32 matrix in 16x16 tiles
    assert torch.equal(slice_qparams(qp, spec, 16, 16, 32, "w").scale, qp.scale[1:])
    with pytest.raises(ValueError, match="w holds rows 8:16 .* 16x16 blocks.*group_size to a divisor of 8"):
        slice_qparams(qp, spec, 8, 8, 32, "w")


# -- expert parallelism: the transform follows the experts' share (2 gloo ranks: tests/moe/test_moe_parallel.py) ---


def _shard(model: nn.Module, rank: int, size: int) -> None:
    for layer in moe_layers(model):
        layer.shard_experts(LocalCommunicator(), "expert", rank, size)


def test_sharding_the_experts_carries_the_qat_transform_over() -> None:
    """The new, smaller experts module carries the same transform (the plugin's map still names it), told which
    experts it now sees; its LSQ state stays whole. A plain function transform moves as it is."""
    stack = stack_of(MOE, LSQ)
    with torch.device("meta"):
        model = Transformer(MODEL)
    stack.apply(model)
    before = [layer.experts.weight_transform for layer in moe_layers(model)]
    _shard(model, 1, 2)
    qat = stack.plugins[-1]
    for i, layer in enumerate(moe_layers(model)):
        transform = layer.experts.weight_transform
        assert transform is before[i] is qat.stacked[f"layers.{i}.mlp.experts"]
        assert layer.experts.gate_up.shape[0] == 2 and transform.part == slice(2, 4)
        assert transform.gate_up_step_base.shape == (4, 64, 2)  # whole: every expert's steps

    plain = MoELayer(validate_plugin_config(MOE), 32, 32)
    double = lambda name, w: 2 * w  # noqa: E731 (stateless: acts on whatever experts it is given)
    plain.experts.set_weight_transform(double)
    plain.shard_experts(LocalCommunicator(), "expert", 0, 2)
    assert plain.experts.weight_transform is double


def test_a_transform_with_state_that_cannot_shard_is_refused_naming_the_fix() -> None:
    class Masks(nn.Module):  # per-expert state, no shard(): it would not match a share of the experts
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mask", torch.ones(4, 1, 1))

        def forward(self, name: str, w: torch.Tensor) -> torch.Tensor:
            return w * self.mask

    layer = MoELayer(validate_plugin_config(MOE), 32, 32)
    layer.experts.set_weight_transform(Masks())
    with pytest.raises(ValueError, match=r"weight transform Masks .* implements no shard\(part, gather\).*"
                                         r"backend.expert_parallel_size=1"):
        layer.shard_experts(LocalCommunicator(), "expert", 0, 2)
    assert layer.expert_comm is None and layer.experts.gate_up.shape[0] == 4  # left as it was


def test_lsq_steps_of_a_share_cannot_be_gathered_by_a_single_process_communicator() -> None:
    """A build that simulates rank 1 of 2 with a single-process communicator cannot set the other rank's steps:
    it says so, instead of leaving half of them unset."""
    with pytest.raises(RuntimeError, match=r"gathering 2 experts' rows from each of the 1 ranks of group "
                                           r"'expert' gives 2, the layer has 4"):
        build_model(MODEL, stack_of(MOE, LSQ), ModelInit(seed=0), torch.device("cpu"),
                    lambda model: _shard(model, 1, 2))
    ste = build_model(MODEL, stack_of(MOE, {**LSQ, "estimator": "ste"}), ModelInit(seed=0), torch.device("cpu"),
                      lambda model: _shard(model, 1, 2))  # no state per expert: nothing to gather
    assert moe_layers(ste)[0].experts.gate_up.shape[0] == 2


# -- export --------------------------------------------------------------------------------------------------

MIXTRAL = {"type": "moe", "num_experts": 4, "top_k": 2, "expert_intermediate_size": 32}


def export(stack_blocks: tuple[dict, ...], model: nn.Module, out: Path, step: int) -> Path:
    """What `slimtrain export` writes for a live model: the plugins' export hooks, then the HF directory."""
    from slimtrain.trainer.export.hf import write_hf_dir

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plugins = stack_of(*stack_blocks)
    ctx = plugins.export(state, MODEL, step=step)
    return write_hf_dir(ctx.state, MODEL, out, tokenizer_dir=None, ids={"bos_id": None, "eos_id": None, "pad_id": None},
                        plugins=plugins, plugin_export=ctx)


@pytest.mark.parametrize("qat", [LSQ, {"type": "qat", "weights": {"format": "nvfp4"}}], ids=["int4-lsq", "nvfp4"])
def test_packed_export_holds_every_experts_packed_tensors(qat: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    stack = stack_of(MIXTRAL, qat)
    model = build(stack).eval()
    train(model, stack, range(1, 5))
    export((MIXTRAL, qat), model, tmp_path, step=4)

    packed = load_file(tmp_path / "packed" / "model.safetensors")
    config = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"]
    sch = scheme(stack.plugins[-1].cfg, ["Linear"])
    with torch.no_grad():
        for i, moe in enumerate(moe_layers(model)):
            trained = {n: moe.experts.transformed_weight(n).float() for n in ("gate_up", "down")}
            for e in range(4):
                prefix = f"model.layers.{i}.block_sparse_moe.experts.{e}"
                for proj, want in (("w1", trained["gate_up"][e, :32]), ("w3", trained["gate_up"][e, 32:]),
                                   ("w2", trained["down"][e])):
                    layer = {k.removeprefix(f"{prefix}.{proj}."): v for k, v in packed.items()
                             if k.startswith(f"{prefix}.{proj}.")}
                    assert "weight_packed" in layer and "weight" not in layer, (prefix, proj)
                    assert torch.equal(dequantize_packed(layer, sch), want), (prefix, proj)
            assert torch.equal(packed[f"model.layers.{i}.block_sparse_moe.gate.weight"], moe.router.weight)

        # transformers (with compressed-tensors) decodes packed int4 exactly in fp32 (FP4: to bf16, checked above)
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
        for variant in ("", "packed") if qat["weights"].get("format", "int") == "int" else ("",):
            theirs = AutoModelForCausalLM.from_pretrained(tmp_path / variant, dtype=torch.float32,
                                                          attn_implementation="eager")
            assert float((theirs.eval()(input_ids=ids).logits - model(ids).logits).abs().max()) <= 1e-4, variant


def test_experts_kept_in_high_precision_are_ignored_by_name_in_the_packed_config(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    qat = {"type": "qat", "weights": {"group_size": 16}, "exclude": ["lm_head", "*.router", "layers.1.mlp.experts"]}
    model = build(stack_of(MIXTRAL, qat)).eval()
    export((MIXTRAL, qat), model, tmp_path, step=1)
    ignore = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]["ignore"]
    experts = [f"model.layers.1.block_sparse_moe.experts.{e}.{p}" for e in range(4) for p in ("w1", "w2", "w3")]
    assert sorted(ignore) == sorted(["lm_head", "model.layers.0.block_sparse_moe.gate",
                                     "model.layers.1.block_sparse_moe.gate", *experts])
    packed = load_file(tmp_path / "packed" / "model.safetensors")
    assert torch.equal(packed[experts[0] + ".weight"], model.layers[1].mlp.experts.gate_up[0, :32])
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight_packed" in packed


# One interpreter process (TRITON_INTERPRET must be set before triton is imported): the stacked weights through
# the Triton kernels equal them through the PyTorch reference, forward and clipped-STE backward, bit for bit.
KERNEL_CHECK = r'''
import torch
from slimtrain.modules.moe.experts import GroupedExperts
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.qat.stacked import StackedWeightQAT
bad = []
for weights in [{"bits": 4, "group_size": 16}, {"format": "mxfp4"}, {"format": "nvfp4"}, {"format": "ternary"}]:
    outs = []
    for kernels in ("triton", "torch"):
        experts = GroupedExperts(4, 32, 64)
        torch.nn.init.normal_(experts.gate_up, generator=torch.Generator().manual_seed(0))
        cfg = validate_plugin_config({"type": "qat", "weights": weights, "estimator": "clipped_ste", "kernels": kernels})
        transform = StackedWeightQAT(experts.matmul_weights(), cfg)
        transform.active = True
        y = transform("gate_up", experts.gate_up * 3)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), experts.gate_up.grad))
    if not (torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])):
        bad.append(weights)
print("BAD", bad)
'''


def test_stacked_weights_through_the_triton_kernels_equal_the_reference() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BAD []" in proc.stdout, proc.stdout
