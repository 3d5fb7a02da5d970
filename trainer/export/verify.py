"""`--verify`: load an exported directory with `transformers` and compare its logits with the trained model's.

The reference is the model as the run trained it: every plugin applied, the checkpoint's trained state
(before the plugins' export hooks rewrote it) loaded, and the plugins' step hook run with the
checkpoint's step, so that what they switch on by step (fake quantization) computes as in training.
Both sides compute in fp32 on the CPU with eager attention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection

import torch
from torch import nn

from slimtrain.modules.plugin import PluginContext
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.trainer.errors import CheckpointError
from slimtrain.trainer.export.consolidate import LoadedCheckpoint
from slimtrain.trainer.export.hf import DTYPES

TOLERANCE = 1e-4


@torch.no_grad()
def trained_model(state: dict[str, torch.Tensor], cfg: ModelConfig, *, plugins: PluginStack | None = None,
                  step: int = 0, dtype: torch.dtype = torch.float32,
                  rounded: Collection[str] | None = None) -> nn.Module:
    """Our model with every plugin applied (CPU, fp32, eager attention), `state` loaded, at training step `step`.

    `plugins` must be instances of their own (a plugin keeps the modules it applied to). `dtype`: what the
    export stored; the tensors named in `rounded` (default: all) are rounded the same way first, so that
    a bf16 or fp16 export is held to the fp32 tolerance (a wrong name or layout still shows). Pass the
    names the export stored unchanged: a tensor an export hook rewrote is served rounded after the rewrite.
    """
    from slimtrain.trainer.backends.build import ModelInit, build_model

    plugins = plugins if plugins is not None else PluginStack()
    cfg = cfg.model_copy(update={"attention": "eager"})
    # Built as a run builds it, so every tensor holds a value before the load (a plugin's unsaved buffers
    # included) and a tied head is tied.
    model = build_model(cfg, plugins, ModelInit(seed=0), torch.device("cpu"))
    weights = {k: _as_stored(v, dtype if rounded is None or k in rounded else torch.float32) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"the trained state does not fit the model with the recipe's plugins applied: "
                              f"missing {missing[:8]}, unexpected {unexpected[:8]}; was the checkpoint saved with "
                              "other plugins?")
    plugins.on_step_start(PluginContext(model=model, step=step, training=False))
    return model.eval()


def _as_stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype).float() if tensor.is_floating_point() else tensor


@torch.no_grad()
def logits_diff(model: nn.Module, hf_dir: Path, seq_len: int = 32, batch: int = 2, seed: int = 0) -> float:
    """Max |logit difference| between `model` and transformers' fp32 eager load of `hf_dir` on random tokens."""
    from transformers import AutoModelForCausalLM

    cfg: ModelConfig = model.cfg
    theirs = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    theirs.eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, min(seq_len, cfg.max_seq_len)), generator=g)
    return float((model(ids).logits - theirs(input_ids=ids).logits).abs().max())


def compare_logits(out_dir: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, *,
                   plugins: PluginStack | None = None, step: int = 0, dtype: torch.dtype = torch.float32,
                   rounded: Collection[str] | None = None, seq_len: int = 32, batch: int = 2, seed: int = 0) -> float:
    """Max |logit difference| between the trained model (`trained_model`) and the HF load of `out_dir`."""
    model = trained_model(state, cfg, plugins=plugins, step=step, dtype=dtype, rounded=rounded)
    return logits_diff(model, out_dir, seq_len=seq_len, batch=batch, seed=seed)


def verify_export(out_dir: Path, ckpt: LoadedCheckpoint, dtype: str = "fp32") -> float:
    """`slimtrain export --verify`: the exported directory against the checkpoint it came from (read once)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    served = ckpt.state_dict
    unchanged = {name for name, tensor in ckpt.trained_state.items() if served.get(name) is tensor}
    plugins = PluginStack.from_configs(ckpt.recipe.plugins)  # instances of their own: a model of their own
    return compare_logits(out_dir, ckpt.trained_state, ckpt.model_cfg, plugins=plugins, step=ckpt.step,
                          dtype=DTYPES[dtype], rounded=unchanged)


def generate_text(out_dir: Path, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy completion of `prompt` by `transformers` from the exported directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
