"""The recipe reference, generated from the field descriptions of the schema (docs/recipe.md)."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from slimtrain.trainer.backends import BACKENDS
from slimtrain.trainer.recipe.schema import Recipe


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "required" if field.default_factory is None else "(block)"
    value = field.default
    return "null" if value is None else f"`{value}`"


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += _submodels(arg)
    return out


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        subs = _submodels(field.annotation)
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        if len(subs) == 1:
            rows.append(f"| `{path}` | (block) | {desc} |")
            rows += _rows(subs[0], path + ".")
        else:
            rows.append(f"| `{path}` | {_default(field)} | {desc} |")
    return rows


def recipe_reference() -> str:
    """Markdown table of every recipe key below the top-level blocks, except `data` (docs/data.md)."""
    lines = ["# Recipe reference", "",
             "Generated from the schema by `slimtrain validate --reference`; every key, its default and meaning.",
             "The `data:` block is described in [data.md](data.md), the `model:` block in [model.md](model.md).", "",
             "| key | default | meaning |", "|---|---|---|"]
    for name, field in Recipe.model_fields.items():
        if name in ("data", "extends"):
            continue
        lines.append(f"| **`{name}`** | | {field.description} |")
        if name == "backend":  # chosen by `type:` from the engine registry: every engine's keys
            for engine in BACKENDS.names():
                lines += _rows(BACKENDS.get(engine).config, f"{name}.")
            continue
        subs = _submodels(field.annotation)
        lines += _rows(subs[0], name + ".") if subs else []
    return "\n".join(lines) + "\n"
