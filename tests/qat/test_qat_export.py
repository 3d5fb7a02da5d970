"""QAT export: packed compressed-tensors weights dequantize to the trained fake-quantized weights bit for bit,
and transformers' logits on the exported checkpoints match our QAT model's (what you train is what you serve).

The logits are checked as `slimtrain export --verify` checks them: our model rebuilt with the plugin applied from
the trained state (raw weights and LSQ steps, before the export hook), fake-quant switched on by the step hook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.qat.export import dequantize_packed, scheme
from slimtrain.trainer.export.hf import write_hf_dir
from slimtrain.trainer.export.verify import TOLERANCE, compare_logits, logits_diff, trained_model
from qat_helpers import TINY, qat_model

IDS = {"bos_id": None, "eos_id": 0, "pad_id": 1}
CASES = {
    "int4-g32": ({"weights": {"format": "int", "bits": 4, "group_size": 32}}, "pack-quantized"),
    "int4-g64-lsq": ({"weights": {"format": "int", "bits": 4, "group_size": 64}, "estimator": "lsq", "lsq_lr_scale": 3.0},
                     "pack-quantized"),
    "int3-asym-channel": ({"weights": {"format": "int", "bits": 3, "symmetric": False, "granularity": "channel"}},
                          "pack-quantized"),
    "int8-tensor": ({"weights": {"format": "int", "bits": 8, "granularity": "tensor"}}, "pack-quantized"),
    "ternary": ({"weights": {"format": "ternary"}}, "pack-quantized"),
    "fp8-block": ({"weights": {"format": "fp8_e4m3", "granularity": "block", "group_size": 32}}, "float-quantized"),
    "mxfp8": ({"weights": {"format": "mxfp8"}}, "mxfp8-quantized"),
    "mxfp4": ({"weights": {"format": "mxfp4"}}, "mxfp4-pack-quantized"),
    "nvfp4": ({"weights": {"format": "nvfp4"}}, "nvfp4-pack-quantized"),
}


STEP = 3  # qat_model trains 3 steps: the checkpoint's step


def _export(block: dict, out: Path, dtype: torch.dtype = torch.float32):
    """(model, plugin, ctx, trained state): the trained QAT model and what the export made of it in `out`."""
    model, plugin = qat_model(block, steps=STEP)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plugins = PluginStack.from_configs([plugin.cfg])
    ctx = plugins.export(state, TINY, step=STEP)
    write_hf_dir(ctx.state, TINY, out, tokenizer_dir=None, ids=IDS, dtype=dtype, plugins=plugins, plugin_export=ctx)
    return model, plugin, ctx, state


@pytest.mark.parametrize("case", list(CASES))
def test_packed_dequantizes_to_the_trained_weights_bit_for_bit(case: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    block, fmt = CASES[case]
    model, plugin, ctx, _ = _export(block, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "packed" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == fmt
    assert config["ignore"] == ["lm_head"]
    packed = load_file(tmp_path / "hf" / "packed" / "model.safetensors")
    sch = scheme(plugin.cfg, ["Linear"])
    for name, layer in plugin.layers.items():
        hf = "model." + name.replace("attn", "self_attn").replace("input_norm", "input_layernorm")
        layer_state = {k.removeprefix(hf + "."): v for k, v in packed.items() if k.startswith(hf + ".")}
        assert "weight" not in layer_state and "weight_packed" in layer_state or fmt.endswith("-quantized")
        trained = layer.quantized_weight().detach().float()  # what the forward multiplies by
        assert torch.equal(dequantize_packed(layer_state, sch), trained), name
        assert torch.equal(ctx.state[f"{name}.weight"], trained), name


# Which exports transformers loads on CPU for each case: the dequantized one always; the packed one where its
# loader decodes the format exactly in fp32 (FP4 decodes to bf16; packed asymmetric zero points are refused
# by its shape check), so those packed checkpoints are checked bit for bit above instead.
PARITY = {"int4-g32": ("", "packed"), "int4-g64-lsq": ("", "packed"), "int8-tensor": ("", "packed"),
          "ternary": ("", "packed"), "int3-asym-channel": ("",), "mxfp4": ("",), "nvfp4": ("",), "fp8-block": ("",)}


@pytest.mark.parametrize("case", list(PARITY))
def test_transformers_logits_match_the_qat_model(case: str, tmp_path: Path) -> None:
    model, plugin, _, state = _export(CASES[case][0], tmp_path / "hf")
    # --verify's reference: rebuilt from the trained state with fresh plugin instances, at the checkpoint's step
    rebuilt = trained_model(state, TINY, plugins=PluginStack.from_configs([plugin.cfg]), step=STEP)
    ids = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, model(ids).logits)  # it is the model that was trained
    for variant in PARITY[case]:
        diff = logits_diff(rebuilt, tmp_path / "hf" / variant, seq_len=24)
        assert diff <= TOLERANCE, (variant, diff)


# Exports in bf16 that --verify still holds to the fp32 tolerance: the MX formats' dequantized weights (an E8M0
# power of two times an FP8/FP4 element) are exact in bf16. Integer grids with fp32 scales are not (see below).
@pytest.mark.parametrize("case", ["mxfp4", "mxfp8"])
def test_a_bf16_export_of_an_mx_format_verifies(case: str, tmp_path: Path) -> None:
    _, plugin, ctx, state = _export(CASES[case][0], tmp_path / "hf", dtype=torch.bfloat16)
    unchanged = {n for n, t in state.items() if ctx.state.get(n) is t}  # as verify_export rounds
    diff = compare_logits(tmp_path / "hf", state, TINY, plugins=PluginStack.from_configs([plugin.cfg]), step=STEP,
                          dtype=torch.bfloat16, rounded=unchanged)
    assert diff <= TOLERANCE


def test_verify_tells_when_the_export_cannot_compute_the_trained_model(tmp_path: Path) -> None:
    """Activation quantization has no place in the dequantized checkpoint (transformers runs its Linears on the
    unquantized inputs), and an int4 grid's fp32 scales do not survive a bf16 export: --verify reports both."""
    block = {"weights": {"format": "int", "bits": 4, "group_size": 32},
             "activations": {"format": "int", "bits": 8, "granularity": "token"}}
    _, plugin, _, state = _export(block, tmp_path / "w4a8")
    assert compare_logits(tmp_path / "w4a8", state, TINY, plugins=PluginStack.from_configs([plugin.cfg]),
                          step=STEP) > TOLERANCE
    _, plugin, ctx, state = _export(CASES["int4-g32"][0], tmp_path / "bf16", dtype=torch.bfloat16)
    unchanged = {n for n, t in state.items() if ctx.state.get(n) is t}
    assert compare_logits(tmp_path / "bf16", state, TINY, plugins=PluginStack.from_configs([plugin.cfg]), step=STEP,
                          dtype=torch.bfloat16, rounded=unchanged) > TOLERANCE


@pytest.mark.parametrize("init", ["absmax", "mean"])
def test_export_before_fake_quant_started_uses_the_first_quantized_steps(init: str, tmp_path: Path) -> None:
    """An LSQ checkpoint taken before its start step has uncalibrated steps: the export calibrates them by
    the recipe's lsq_init, exactly as the first quantized forward would have."""
    block = {"weights": {"format": "int", "bits": 4, "group_size": 32}, "estimator": "lsq", "lsq_init": init,
             "start_step": 100}
    model, plugin, ctx, _ = _export(block, tmp_path / "hf")
    plugin.set_step(101)  # fake-quant starts: the first forward calibrates from these weights
    for name, layer in plugin.layers.items():
        assert torch.equal(ctx.state[f"{name}.weight"], layer.quantized_weight().detach().float()), name
