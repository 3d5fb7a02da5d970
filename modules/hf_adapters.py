"""Registry of architecture adapters: how our state dict and config map onto a Hugging Face model class.

An architecture (the dense Llama, an MoE layout, ...) registers one `Adapter` under a name; export,
its `--verify` and `checkpoint.init_from_hf` look it up by the name the plugins choose
(`Plugin.hf_architecture`, default "llama") and never need to know the architecture itself. A plugin's
own tensors (a draft head, an encoder) go through its `HFAdapter` (`slimtrain.modules.plugin`) instead.

It lives in `modules/` so that a plugin can register the architecture it exports as. The built-in
adapters register themselves when this module is imported; `transformers` is imported only when an
adapter builds a config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from slimtrain.core.registry import Registry
from slimtrain.modules.transformer.config import ModelConfig

if TYPE_CHECKING:  # transformers is slow to import; adapters import it only when building a config
    from transformers import PretrainedConfig

StateDict = dict[str, torch.Tensor]


class NameMismatch(KeyError):
    """An architecture adapter was given tensors it does not map, or lacks some it needs.

    missing: names the architecture needs and did not get; unexpected: names it does not have. The
    exporter and the importer report these as the tensors no adapter claims.
    """

    def __init__(self, message: str, missing: Iterable[str] = (), unexpected: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)

    def __str__(self) -> str:  # KeyError's own str() quotes the message like a key
        return str(self.args[0])


@dataclass(frozen=True)
class Adapter:
    """One architecture's mapping to and from its Hugging Face model class.

    hf_architecture: the transformers class name written into config.json ("LlamaForCausalLM").
    to_hf(state, cfg): our parameter names -> HF names (tensors are not copied); raises NameMismatch
        naming every tensor it does not map and every one it misses.
    from_hf(hf_state, cfg): the inverse, with the same NameMismatch; from_hf(to_hf(s), cfg) == s exactly.
    hf_config(cfg, *, bos_id, eos_id, pad_id=None, dtype=torch.float32): the transformers config object.
    keeps_fp32(hf_name): whether that tensor is written in fp32 whatever the export dtype (a buffer the HF
        class keeps in fp32, e.g. an MoE's selection bias).
    check_config(hf_config_dict, cfg): one line per value of a config.json (as a dict) that our model with
        `cfg` does not compute, each naming our field and the HF key; [] when it describes our model.
    """

    hf_architecture: str
    to_hf: Callable[[StateDict, ModelConfig], StateDict]
    from_hf: Callable[[StateDict, ModelConfig], StateDict]
    hf_config: Callable[..., "PretrainedConfig"]
    check_config: Callable[[dict[str, Any], ModelConfig], list[str]] = lambda hf, cfg: []
    keeps_fp32: Callable[[str], bool] = lambda hf_name: False


ADAPTERS: Registry[Adapter] = Registry("architecture adapter")


def register_adapter(name: str, adapter: Adapter) -> Adapter:
    """Register `adapter` under `name`; a name is registered once (a second one is a ValueError)."""
    return ADAPTERS.register(name)(adapter)


def get_adapter(name: str) -> Adapter:
    """The adapter registered under `name`, or an UnknownNameError listing the registered names."""
    return ADAPTERS.get(name)


# The built-in architectures, registered on import (each imports this module for `Adapter`).
from slimtrain.modules.transformer import hf_llama  # noqa: E402,F401
