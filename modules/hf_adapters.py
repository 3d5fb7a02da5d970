"""Registry of architecture adapters: how our state dict and config map onto a Hugging Face model.

An architecture (dense Llama, an MoE layout, ...) registers one `Adapter` under a name; the export
code looks it up by that name and never needs to know the architecture itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from slimtrain.core.registry import Registry
from slimtrain.modules.transformer.config import ModelConfig

if TYPE_CHECKING:  # transformers is slow to import; adapters import it only when building a config
    from transformers import PretrainedConfig

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Adapter:
    """One architecture's mapping to and from its Hugging Face model class.

    hf_architecture: the transformers class name written into config.json ("LlamaForCausalLM").
    to_hf(state, cfg): our parameter names -> HF names (tensors are not copied).
    from_hf(hf_state, cfg): the inverse; from_hf(to_hf(s), cfg) == s exactly.
    hf_config(cfg, *, bos_id, eos_id, pad_id=None, **kw): the transformers config object.
    """

    hf_architecture: str
    to_hf: Callable[[StateDict, ModelConfig], StateDict]
    from_hf: Callable[[StateDict, ModelConfig], StateDict]
    hf_config: Callable[..., "PretrainedConfig"]


ADAPTERS: Registry[Adapter] = Registry("export adapter")


def register_adapter(name: str, adapter: Adapter) -> Adapter:
    """Register `adapter` under `name`; a name is registered once (a second one is a ValueError)."""
    return ADAPTERS.register(name)(adapter)


def get_adapter(name: str) -> Adapter:
    """The adapter registered under `name`, or an UnknownNameError listing the registered names."""
    return ADAPTERS.get(name)


