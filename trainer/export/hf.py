"""Write a Hugging Face checkpoint directory from a slimtrain checkpoint (or a live state dict).

The architecture is the one the model with its plugins applied exports as (`PluginStack.hf_architecture`);
each plugin's own tensors go through its `hf_adapter()` (see `mapping.py`, docs/export.md).
Everything is written into `OUT.partial/` and renamed at the end: a failed export leaves no
half-written OUT, and an existing OUT is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import bisect
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from slimtrain.modules.plugin import ExportContext
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.trainer.errors import CheckpointError
from slimtrain.trainer.export.consolidate import LoadedCheckpoint, load_checkpoint_for_export
from slimtrain.trainer.export.mapping import MappingError, ModelAdapters, model_adapters
from slimtrain.trainer.export.model_card import model_card

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_SHARD_SIZE = "5GB"


def check_export_args(out_dir: Path, dtype: str = "fp32", overwrite: bool = False) -> None:
    """Refuse an unknown dtype or a non-empty OUT without `overwrite`, before the checkpoint is read."""
    _check_out_dir(Path(out_dir), overwrite)
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")


def check_exportable(model_cfg: ModelConfig, plugins: PluginStack) -> str | None:
    """Before a run launches: `slimtrain export` will be able to write this model (the recipe's model block, before
    the plugins configure it). A model the architecture its plugins choose cannot describe is refused
    (RecipeError): that would be learnt only after the whole run. Returns why the model will not be exportable
    when its plugins' options have no Hugging Face architecture at all (a recipe's choice: the run trains, export
    refuses, naming the option), else None."""
    from slimtrain.modules.plugin_stack import DRY_RUN_VOCAB
    from slimtrain.trainer.errors import RecipeError

    cfg = model_cfg if model_cfg.vocab_size is not None else model_cfg.model_copy(update={"vocab_size": DRY_RUN_VOCAB})
    cfg = plugins.configure(cfg)
    try:
        adapters = model_adapters(plugins, cfg)
    except MappingError as exc:
        return str(exc)
    try:
        adapters.config(cfg)
        adapters.architecture.hf_config(cfg, bos_id=None, eos_id=None)
    except Exception as exc:  # transformers' config validation raises its own error types
        shown = ", ".join(f"model.{k}={getattr(model_cfg, k)}" for k in _GEOMETRY)
        hint = (" (transformers wants model.num_heads to divide model.hidden_size, even with model.head_dim set)"
                if cfg.hidden_size % cfg.num_heads else "")
        why = " ".join(str(exc).split())
        raise RecipeError(f"the recipe's model could not be exported: {adapters.architecture.hf_architecture}, the "
                          f"Hugging Face class `slimtrain export` writes for it, refuses it ({why}). The model block "
                          f"has {shown}: change it until that class accepts it{hint}") from None
    return None


_GEOMETRY = ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "num_layers")


def export_checkpoint(ckpt_path: Path, out_dir: Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """`slimtrain export`: read the checkpoint once, then write config/weights/tokenizer/generation config/card."""
    check_export_args(out_dir, dtype, overwrite)
    return write_export(load_checkpoint_for_export(Path(ckpt_path)), out_dir, dtype, overwrite)


def write_export(ckpt: LoadedCheckpoint, out_dir: Path, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """The HF directory of an already loaded checkpoint (what its plugins' export hooks made of it)."""
    check_export_args(out_dir, dtype, overwrite)
    adapters = _adapters(ckpt.plugins, ckpt.model_cfg)
    card = model_card(ckpt, adapters.architecture.hf_architecture)
    return write_hf_dir(ckpt.state_dict, ckpt.model_cfg, out_dir, tokenizer_dir=ckpt.tokenizer_dir,
                        ids=ckpt.trainer_state.get("tokenizer", {}), dtype=DTYPES[dtype], plugins=ckpt.plugins,
                        overwrite=overwrite, card=card, plugin_export=ckpt.plugin_export)


def write_hf_dir(state: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: Path, *, tokenizer_dir: Path | None,
                 ids: dict, dtype: torch.dtype = torch.float32, plugins: PluginStack | None = None,
                 overwrite: bool = False, card: str | None = None,
                 plugin_export: ExportContext | None = None) -> Path:
    """Write a complete HF directory from our state dict (used by export and by the parity tests).

    `plugins` (default: none, the dense model) choose the architecture and map their own tensors; their
    adapters' config keys go into config.json. With `plugin_export` (what the plugins' export hooks made
    of the state), its config keys go into config.json too and each of its variants becomes a
    sub-directory `OUT/<variant>/`.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    adapters = _adapters(plugins, model_cfg)
    try:
        mapped = adapters.to_hf(state, model_cfg)
        adapter_keys = adapters.config(model_cfg)
    except MappingError as exc:
        raise CheckpointError(f"cannot export: {exc}") from None
    hf_to_ours = _hf_to_ours(state, mapped)
    # clone: DeepSpeed's consolidation returns views into one flat buffer, which safetensors refuses.
    keep = adapters.architecture.keeps_fp32
    hf_state = {k: v.detach().to(torch.float32 if keep(k) else dtype).clone() for k, v in mapped.items()}
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    extra = plugin_export or ExportContext(state={}, model_cfg=model_cfg, model=torch.nn.Module())
    notes = "".join(f"\n- {line}" for line in extra.notes)
    try:
        def config():
            return adapters.architecture.hf_config(model_cfg, bos_id=ids.get("bos_id"), eos_id=ids.get("eos_id"),
                                                   pad_id=ids.get("pad_id"), dtype=dtype)

        _write_dir(tmp, hf_state, config(), {**adapter_keys, **extra.config}, ids, tokenizer_dir,
                   (card or "") + notes)
        for variant in extra.variants:  # a variant holds the plugins' tensors too: their keys describe them
            keys = variant.config(hf_to_ours)
            appended = _appended_layers(variant.appended_layers, state, model_cfg, adapters, set(mapped), dtype)
            _write_dir(tmp / variant.name, variant.transform({**hf_state, **appended}, hf_to_ours),
                       keys if variant.standalone else config(), {} if variant.standalone else {**adapter_keys, **keys},
                       ids, tokenizer_dir, f"{card or ''}{notes}\n\n{variant.readme}\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _adapters(plugins: PluginStack | None, model_cfg: ModelConfig) -> ModelAdapters:
    try:
        return model_adapters(plugins, model_cfg)
    except MappingError as exc:
        raise CheckpointError(f"cannot export: {exc}") from None


def _appended_layers(layers: dict[str, torch.Tensor], state: dict[str, torch.Tensor], model_cfg: ModelConfig,
                     adapters: ModelAdapters, plain: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A variant's extra decoder layers (`ExportVariant.appended_layers`) under HF names: mapped as the layers of a
    model that much deeper, with the model's own mapping, in the export's dtype."""
    if not layers:
        return {}
    depth = 1 + max(int(name.split(".")[1]) for name in layers)
    deeper = model_cfg.model_copy(update={"num_layers": depth})
    try:
        mapped = adapters.to_hf({**state, **layers}, deeper)
    except MappingError as exc:
        raise CheckpointError(f"cannot export the appended layers {sorted(layers)[:3]}...: {exc}") from None
    keep = adapters.architecture.keeps_fp32
    return {k: v.detach().to(torch.float32 if keep(k) else dtype).clone() for k, v in mapped.items() if k not in plain}


def _hf_to_ours(state: dict[str, torch.Tensor], mapped: dict[str, torch.Tensor]) -> dict[str, str]:
    """HF name -> our name, from the adapters' output, which shares our tensors: one of ours itself (tied
    weights: the first name), or a view into one of ours (an expert's slice of a stacked weight: that tensor's
    name). Tensors an adapter made anew (zero biases, a computed bias) have no name of ours."""
    ours_by_id: dict[int, str] = {}
    by_span: dict[tuple[int, int, int], str] = {}
    for name, tensor in state.items():
        ours_by_id.setdefault(id(tensor), name)
        if (span := _span(tensor)) is not None:
            by_span.setdefault(span, name)
    # Per storage, our tensors' byte ranges by first byte: DeepSpeed's consolidation can put every tensor in one
    # flat buffer, so the storage alone does not say whose slice a view is.
    ranges: dict[int, list[tuple[int, int, str]]] = {}
    for (storage, start, end), name in sorted(by_span.items()):
        ranges.setdefault(storage, []).append((start, end, name))
    out: dict[str, str] = {}
    for hf, tensor in mapped.items():
        if id(tensor) in ours_by_id:
            out[hf] = ours_by_id[id(tensor)]
        elif (span := _span(tensor)) is not None and (owner := _owner(ranges.get(span[0], []), span)) is not None:
            out[hf] = owner
    return out


def _owner(ranges: list[tuple[int, int, str]], span: tuple[int, int, int]) -> str | None:
    """The name of the range (sorted by first byte) that holds `span`'s bytes, the nearest one first."""
    first = bisect.bisect_right(ranges, (span[1], float("inf"), ""))  # past every range starting at or before it
    return next((ranges[j][2] for j in range(first - 1, -1, -1) if ranges[j][1] >= span[2]), None)


def _span(tensor: torch.Tensor) -> tuple[int, int, int] | None:
    """(storage address, first byte, end byte) of the memory a tensor reads; None when it reads none."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    return tensor.untyped_storage().data_ptr(), start, start + (last + 1) * tensor.element_size()


def _write_dir(path: Path, hf_state: dict[str, torch.Tensor], config: Any, config_extra: dict[str, Any], ids: dict,
               tokenizer_dir: Path | None, card: str) -> None:
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(hf_state, path, max_shard_size=MAX_SHARD_SIZE, safe_serialization=True)
    if isinstance(config, dict):  # a standalone variant's own config.json (ExportVariant.standalone)
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    else:
        for key, value in config_extra.items():
            setattr(config, key, value)
        config.save_pretrained(path)
        GenerationConfig(bos_token_id=ids.get("bos_id"), eos_token_id=ids.get("eos_id"),
                         pad_token_id=ids.get("pad_id")).save_pretrained(path)
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), path)
    if card.strip():
        (path / "README.md").write_text(card, encoding="utf-8")


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"output directory {out_dir} exists and is not empty; pass --overwrite to replace it "
                              "or choose another directory")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Tokenizer files through transformers, so that AutoTokenizer loads them from `dst`."""
    from transformers import AutoTokenizer

    if not src.is_dir():
        raise CheckpointError(f"tokenizer directory {src} is missing from the checkpoint; it cannot be exported")
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))


def read_hf_config(path: Path) -> dict:
    """config.json of an HF directory as a dict."""
    return json.loads((Path(path) / "config.json").read_text())
