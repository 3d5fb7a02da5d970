"""The `model:` block of a recipe that continues from a Hugging Face checkpoint (`checkpoint.init_from_hf`).

The checkpoint's config.json says what the model computes (family, sizes, RoPE and its scaling, biases, q/k norms,
sliding windows); the recipe may leave those out and gets them from there. What the recipe does set must agree,
or the recipe is refused naming the field, both values and the file: a model block that silently differed would
load the weights into a model that computes something else. How to train (`attention`, `init_std`) stays the
recipe's. A directory this process cannot see (a path only the compute nodes mount) is left to the import's own
check where it is visible.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.modules.transformer.hf_config import COMPUTED, FAMILY_OF_CLASS, differences, model_fields_from_hf
from slimtrain.trainer.errors import RecipeError


def model_block_from_checkpoint(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`raw` (a merged recipe dict) with its model block completed from `checkpoint.init_from_hf`'s config.json
    when that names a dense family (Llama, Mistral, Qwen2, Qwen3); unchanged otherwise. A RecipeError names every
    field the recipe sets otherwise than the checkpoint."""
    path = (raw.get("checkpoint") or {}).get("init_from_hf")
    hf = _readable_config(path)
    if hf is None or (hf.get("architectures") or [None])[0] not in FAMILY_OF_CLASS:
        return raw
    where = f"checkpoint.init_from_hf={path!r}"
    try:
        theirs = model_fields_from_hf(hf, f"{where}: config.json")
    except (ValueError, KeyError) as exc:
        raise RecipeError(f"{source}: {exc}") from None
    block = dict(raw.get("model") or {})
    if block.get("vocab_size", 0) is None:  # null means "the tokenizer's": with a checkpoint, its rows
        del block["vocab_size"]
    _check_agreement(block, theirs, f"{source}: {where}")
    return {**raw, "model": {**_plain(theirs), **block}}


def _readable_config(path: object) -> dict[str, Any] | None:
    """The checkpoint's config.json as a dict, or None when there is none to read here."""
    if not isinstance(path, str):
        return None
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        return None  # the import's own check reports an unreadable file, naming it
    return loaded if isinstance(loaded, dict) else None


def _check_agreement(block: dict[str, Any], theirs: dict[str, Any], where: str) -> None:
    """Refuse the computed fields `block` sets otherwise than the checkpoint (`theirs`)."""
    given = {k: v for k, v in block.items() if k in COMPUTED}
    if not given:
        return
    try:
        ours = ModelConfig(**{**_plain(theirs), **given})
    except ValidationError:
        return  # the recipe's own validation reports the block, field by field
    wrong = differences(theirs, ours)
    if wrong:
        raise RecipeError(f"{where}: the recipe's model block disagrees with the checkpoint: " + "; ".join(wrong)
                          + " — remove these fields from the model block (the checkpoint's are taken) or point "
                          "init_from_hf at a checkpoint that has them")


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields as a recipe would write them (the RoPE scaling as a mapping)."""
    scaling = fields.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        fields = {**fields, "rope_scaling": scaling.model_dump(exclude_none=True)}
    return fields
