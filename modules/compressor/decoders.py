"""The extra decoders of a multi-decoder compressor (`decoders:`): loaded frozen from local Hugging Face directories
of a dense family slimtrain imports (Llama, Mistral, Qwen2, Qwen3: biases, q/k norms, RoPE scaling and sliding
windows as their config.json says), one drawn per step, and the loss of the drawn one.

They live beside the model, not in it: frozen and read from their directories at every build, they are neither
the engine's to shard nor the checkpoint's to save (a resume reads them again; `model_sources` checks their
tokenizer against the data's before the build).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtrain.core.sentinels import IGNORE_INDEX
from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.modules.transformer.hf_config import SUPPORTED
from slimtrain.modules.transformer.hf_llama import model_config_from_hf, read_dense_dir
from slimtrain.modules.transformer.io import ModelInputs

from .compressor import MAIN
from .recipe import ExtraDecoder


def extra_config(decoder: ExtraDecoder, field: str) -> ModelConfig:
    """The extra decoder's architecture, from its config.json (no weights read); a class slimtrain does not import
    is refused, naming `field` and the classes it imports."""
    path = Path(decoder.path) / "config.json"
    if not path.is_file():
        raise ValueError(f"{field}={decoder.path!r} holds no config.json: give a local Hugging Face directory of "
                         f"one of {SUPPORTED} (e.g. `slimtrain export` of a run)")
    return model_config_from_hf(json.loads(path.read_text(encoding="utf-8")), f"{field}={decoder.path!r}")


def load_extra(decoder: ExtraDecoder, like: torch.Tensor) -> Transformer:
    """The extra decoder as our frozen model, in `like`'s dtype and on its device."""
    cfg, state = read_dense_dir(decoder.path)
    model = Transformer(cfg.model_copy(update={"attention": "auto"}))
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.to(device=like.device, dtype=like.dtype).eval()


def drawn_decoder(names: list[str], step: int) -> str:
    """The decoder step `step` trains through, drawn uniformly among `names` ("main" first): a function of the
    step alone, so every rank draws the same one and a resumed run the same sequence."""
    return names[random.Random(f"compressor-decoder-{step}").randrange(len(names))]


def decoder_loss(decoder: nn.Module, inputs: ModelInputs, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `decoder` over the label tokens of one micro-batch (its loss term's value)."""
    logits = decoder(**inputs.model_kwargs()).logits
    mask = labels != IGNORE_INDEX
    return F.cross_entropy(logits[mask].float(), labels[mask])


class ExtraDecoders:
    """The configured extra decoders, loaded on first use in the model's compute dtype and device."""

    def __init__(self, decoders: list[ExtraDecoder]) -> None:
        self.configs = {d.name: d for d in decoders}
        self.models: dict[str, Transformer] = {}

    @property
    def names(self) -> list[str]:
        return [MAIN, *self.configs]

    def get(self, name: str, model: nn.Module) -> Any:
        if name not in self.models:
            self.models[name] = load_extra(self.configs[name], model.embed.weight)
        return self.models[name]
