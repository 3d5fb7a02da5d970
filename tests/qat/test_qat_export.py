"""QAT export: packed compressed-tensors weights dequantize to the trained fake-quantized weights bit for bit,
and transformers' logits on the exported checkpoints match our QAT model's (what you train is what you serve)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimtrain.modules.qat.export import dequantize_packed, scheme
from slimtrain.trainer.export.hf import write_hf_dir
from slimtrain.modules.plugin_stack import PluginStack
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


def _export(block: dict, out: Path):
    model, plugin = qat_model(block)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ctx = PluginStack.from_configs([plugin.cfg]).export(state, TINY, step=3)
    write_hf_dir(ctx.state, TINY, out, tokenizer_dir=None, ids=IDS, plugin_export=ctx)
    return model, plugin, ctx


@pytest.mark.parametrize("case", list(CASES))
def test_packed_dequantizes_to_the_trained_weights_bit_for_bit(case: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    block, fmt = CASES[case]
    model, plugin, ctx = _export(block, tmp_path / "hf")
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
    from transformers import AutoModelForCausalLM

    model, _, _ = _export(CASES[case][0], tmp_path / "hf")
    ids = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
        for variant in PARITY[case]:
            hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf" / variant, dtype=torch.float32,
                                                      attn_implementation="eager").eval()
            diff = float((hf(input_ids=ids).logits - ours).abs().max())
            assert diff <= 1e-4, (variant, diff)


@pytest.mark.parametrize("init", ["absmax", "mean"])
def test_export_before_fake_quant_started_uses_the_first_quantized_steps(init: str, tmp_path: Path) -> None:
    """An LSQ checkpoint taken before its start step has uncalibrated steps: the export calibrates them by
    the recipe's lsq_init, exactly as the first quantized forward would have."""
    block = {"weights": {"format": "int", "bits": 4, "group_size": 32}, "estimator": "lsq", "lsq_init": init,
             "start_step": 100}
    model, plugin, ctx = _export(block, tmp_path / "hf")
    plugin.set_step(101)  # fake-quant starts: the first forward calibrates from these weights
    for name, layer in plugin.layers.items():
        assert torch.equal(ctx.state[f"{name}.weight"], layer.quantized_weight().detach().float()), name
