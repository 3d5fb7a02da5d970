"""Initialise our model from a local Hugging Face checkpoint (continued pretraining, `checkpoint.init_from_hf`).

The tensors are mapped by the same adapters an export writes them with (`mapping.py`): the architecture
the recipe's plugins choose, and each plugin's `hf_adapter()` for its own tensors. A directory of the
dense architecture (`LlamaForCausalLM`) may also start a model whose plugins chose another one (an MoE):
what the model still holds loads, and the tensors it lacks (the dense MLPs that became experts) are handed
to the plugins (`WeightInit.source`), which initialise their own from them (upcycling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimtrain.modules.hf_adapters import NameMismatch, get_adapter
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.modules.transformer.sharding import shard_of
from slimtrain.modules.transformer.hf_config import FAMILY_OF_CLASS, SUPPORTED, model_config_from_hf
from slimtrain.trainer.errors import CheckpointError, RecipeError
from slimtrain.trainer.export.mapping import MappingError, ModelAdapters, model_adapters


def read_hf_state(path: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards its index lists; `meta`: their names, shapes and
    dtypes only, on the meta device, from the files' headers (a check before launch reads no weights)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        _refuse_pickle(path)
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r} holds no model.safetensors(.index.json); "
                          "point it at a directory written by save_pretrained or `slimtrain export`")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise RecipeError(f"checkpoint.init_from_hf={str(path)!r}: {name}, which its index lists, is missing; "
                              "copy the whole directory")
        if not meta:
            state.update(load_file(str(path / name)))
            continue
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                sliced = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(sliced.get_dtype(), torch.float32)
                state[key] = torch.empty(sliced.get_shape(), dtype=dtype, device="meta")
    return state


# Weights saved with torch.save (pickle): unpickling can run code the checkpoint carries, so they are never loaded.
_PICKLE_PATTERNS = ("pytorch_model*.bin", "pytorch_model*.bin.index.json", "*.pt", "*.pth", "*.ckpt")


def _refuse_pickle(path: Path) -> None:
    """RecipeError naming the pickle weight files of `path` and how to convert them, when it holds any."""
    found = sorted({p.name for pattern in _PICKLE_PATTERNS for p in path.glob(pattern) if p.is_file()})
    if not found:
        return
    shown = ", ".join(found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "")
    raise RecipeError(
        f"checkpoint.init_from_hf={str(path)!r} holds its weights only as pickle ({shown}), which slimtrain never "
        "loads (unpickling can run code from the checkpoint); convert them to safetensors once, where you trust the "
        "files: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)` writes "
        "model.safetensors (or its shards and model.safetensors.index.json) next to them")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def check_init_from_hf(path: Path, cfg: ModelConfig, plugins: PluginStack) -> None:
    """Before any process starts: the directory fits the recipe's model block `cfg` with the plugins configured
    and applied (config.json, the tensors' names and shapes), as the build's import will find; only the files'
    headers are read. A null vocab_size (the tokenizer's, not known yet) is taken from the directory's."""
    path = Path(path)
    if not path.is_dir():
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r} is not a directory; point it at a directory "
                          "written by save_pretrained or `slimtrain export`")
    hf = _read_config(path)
    read_hf_state(path, meta=True)  # the weight files are there
    if cfg.vocab_size is None:
        if not isinstance(hf.get("vocab_size"), int):
            raise RecipeError(f"checkpoint.init_from_hf={str(path)!r}: its config.json has no vocab_size; set "
                              "model.vocab_size, or use a directory written by save_pretrained or `slimtrain export`")
        cfg = cfg.model_copy(update={"vocab_size": hf["vocab_size"]})
    cfg = plugins.configure(cfg)
    import_hf(plugins.skeleton(cfg), cfg, path, plugins, meta=True)


def check_hf_config(path: Path, cfg: ModelConfig, plugins: PluginStack | None = None) -> None:
    """Refuse a checkpoint whose config.json differs from the recipe's model, naming every mismatch: the
    architecture's adapter checks its own keys; a key a plugin's adapter writes must hold its value."""
    _check_config_with(path, cfg, _adapters(path, plugins, cfg))


def _check_config_with(path: Path, cfg: ModelConfig, adapters: ModelAdapters) -> None:
    hf = _read_config(path)
    wrong = adapters.architecture.check_config(hf, cfg)
    try:
        plugin_keys = adapters.config(cfg)
    except MappingError as exc:
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r}: {exc}") from None
    # A key a plugin writes may be absent (exported without that plugin: it initialises its tensors itself).
    wrong += [f"the recipe's plugins give {key}={value!r} but config.json has {hf[key]!r}"
              for key, value in plugin_keys.items() if key in hf and hf[key] != value]
    if wrong:
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r} does not match the recipe's model: "
                          + "; ".join(wrong) + " — set these model fields (or plugin options) to the checkpoint's "
                          "values")


@torch.no_grad()
def load_hf_into(model: nn.Module, cfg: ModelConfig, path: Path, plugins: PluginStack | None = None,
                 meta: bool = False) -> frozenset[str]:
    """Copy the HF weights into `model` (built with `plugins` applied); returns the names of the tensors it filled.

    Every tensor of the dense model must be in the directory; the plugins' own tensors load when they are
    there (the plugins initialise the others). A tensor of the directory that no adapter claims is refused.
    `meta`: only check names and shapes (see `check_init_from_hf`).
    """
    check_hf_config(path, cfg, plugins)
    adapters = _adapters(path, plugins, cfg)
    try:
        state = adapters.from_hf(read_hf_state(path, meta), cfg)
    except MappingError as exc:
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r}: {exc}") from None
    missing, unexpected = _load(model, {k: _fp32(v) for k, v in state.items()}, path)
    # What only plugins' adapters map is theirs to initialise when absent; whatever the architecture maps must load
    # (also where a plugin moved the dense modules, e.g. into experts).
    required = _architecture_names(model, adapters, cfg, plugins)
    missing = [m for m in missing if m in required and not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r}: missing {missing}, unexpected {unexpected} — "
                          "the directory does not fit the recipe's model with its plugins applied")
    return frozenset(state)


@dataclass(frozen=True)
class HFImport:
    """What `import_hf` did. filled: the model's tensors it loaded (they keep their values); unused: the
    directory's tensors (our names, fp32) that the model lacks, for the plugins (`WeightInit.source`)."""

    filled: frozenset[str]
    unused: dict[str, torch.Tensor] = field(default_factory=dict)




@torch.no_grad()
def import_hf(model: nn.Module, cfg: ModelConfig, path: Path, plugins: PluginStack | None = None,
              meta: bool = False) -> HFImport:
    """Copy the HF weights into `model`, as `load_hf_into`; a directory of the dense architecture into a model
    whose plugins chose another (an MoE) loads every tensor the model still holds and returns the others
    in `unused` (the plugins may take them; the build refuses those none takes). `meta`: see `load_hf_into`."""
    plugins = plugins if plugins is not None else PluginStack()
    if not (_holds_dense(path) and _exports_as(plugins, cfg) != cfg.architecture):
        return HFImport(load_hf_into(model, cfg, path, plugins, meta))
    dense = ModelAdapters(cfg.architecture, get_adapter(cfg.architecture), tuple(plugins.hf_adapters()))
    _check_config_with(path, cfg, dense)
    try:
        state = dense.from_hf(read_hf_state(path, meta), cfg)
    except MappingError as exc:
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r}: {exc}") from None
    held = model.state_dict()
    filled = {k: _fp32(v) for k, v in state.items() if k in held}
    _load(model, filled, path)
    return HFImport(frozenset(filled), {k: _fp32(v) for k, v in state.items() if k not in held})


def _load(model: nn.Module, state: dict[str, torch.Tensor], path: Path):
    """model.load_state_dict(state, strict=False), a tensor of another shape refused naming it (and the field). A
    parameter a tensor-parallel backend sharded takes its slice of the whole tensor (`sharding.Shard`)."""
    params = dict(model.named_parameters())
    state = {name: _slice_for(params.get(name), tensor) for name, tensor in state.items()}
    try:
        return model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        wrong = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        if not wrong:
            raise
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r} holds tensors of other shapes than the recipe's "
                          f"model: {'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''} — its config.json does "
                          "not describe its weights, or the model block differs; use a directory whose weights fit "
                          "the model block") from None


def _slice_for(param: torch.Tensor | None, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (whole) as the slice `param` holds, when `param` is a shard of a tensor of that shape."""
    shard = None if param is None else shard_of(param)
    return shard.take(tensor) if shard is not None and tuple(tensor.shape) == shard.full_shape else tensor


def _holds_dense(path: Path) -> bool:
    """Whether `path`'s config.json names a dense family's class (LlamaForCausalLM, Qwen3ForCausalLM, ...)."""
    if not (Path(path) / "config.json").is_file():
        return False
    return (_read_config(path).get("architectures") or [None])[0] in FAMILY_OF_CLASS


def _exports_as(plugins: PluginStack, cfg: ModelConfig) -> str | None:
    """The architecture the model exports as; None when its plugins' options have none (it cannot export)."""
    try:
        return plugins.hf_architecture(cfg)
    except ValueError:
        return None


def _read_config(path: Path) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r} has no config.json")
    try:
        return json.loads(config_file.read_text())
    except ValueError as exc:
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r}: config.json is not valid JSON ({exc})") from None


def _adapters(path: Path, plugins: PluginStack | None, cfg: ModelConfig) -> ModelAdapters:
    try:
        return model_adapters(plugins, cfg)
    except MappingError as exc:
        raise RecipeError(f"checkpoint.init_from_hf={str(path)!r}: {exc}") from None


def _architecture_names(model: nn.Module, adapters: ModelAdapters, cfg: ModelConfig,
                        plugins: PluginStack | None) -> set[str]:
    """Our names the architecture adapter maps for this model: its state (no plugin adapter's tensors) sent to
    Hugging Face names and back. Tensors it does not map (a plugin's training-only buffers) are left out.

    A backend may have sharded the model (expert parallelism keeps a slice of each layer's experts) while the
    adapter maps whole tensors: a tensor whose shape differs from a fresh meta skeleton's (same plugins) is
    taken at the skeleton's shape, on the meta device (the adapters only slice and stack those)."""
    fresh = PluginStack.from_configs([p.cfg for p in plugins]) if plugins is not None else PluginStack()
    shapes = {n: t.shape for n, t in fresh.skeleton(model.cfg).state_dict().items()}
    whole = {n: t if n not in shapes or t.shape == shapes[n] else torch.empty(shapes[n], dtype=t.dtype, device="meta")
             for n, t in model.state_dict().items()}
    rest = {n: t for n, t in whole.items() if not any(a.owns(n) for _, a in adapters.plugins)}
    try:
        hf = adapters.architecture.to_hf(rest, cfg)
    except NameMismatch as exc:
        rest = {n: t for n, t in rest.items() if n not in set(exc.unexpected)}
        hf = adapters.architecture.to_hf(rest, cfg)
    return set(adapters.architecture.from_hf(hf, cfg))


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Floating tensors in fp32; integer tensors as they are (an MoE's selection bias is fp32 bits in an int32).
    bf16 and fp16 values are exactly representable in fp32: the fp32 masters equal the checkpoint's values."""
    return tensor.float() if tensor.is_floating_point() else tensor


def load_dense_export(export_dir: Path, command: str) -> nn.Module:
    """A dense export (a `LlamaForCausalLM` directory, what `slimtrain export` writes for a dense model) as our
    model, fp32, in eval mode; `command` names the command that needs it, in the refusal of another class."""
    from slimtrain.modules.transformer import Transformer

    config = export_dir / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{export_dir} holds no config.json; point at a directory written by `slimtrain export`")
    hf = json.loads(config.read_text(encoding="utf-8"))
    if (hf.get("architectures") or [None])[0] not in FAMILY_OF_CLASS:
        raise CheckpointError(f"{export_dir} is a {hf.get('architectures')} export; {command} runs dense exports "
                              f"({SUPPORTED})")
    cfg = model_config_from_hf(hf, str(export_dir))
    model = Transformer(cfg)
    import_hf(model, cfg, export_dir)
    return model.eval()
