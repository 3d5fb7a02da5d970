"""Recipe files: YAML → `extends:` merge → `a.b=c` overrides → validated `Recipe`.

Every failure is a `RecipeError` whose lines read `field.path: got VALUE — what is wrong (fix)`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from slimtrain.trainer.config import Recipe
from slimtrain.trainer.errors import RecipeError

MAX_EXTENDS_DEPTH = 8


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read `path`, merge what it extends, apply overrides, validate."""
    raw = load_raw(path)
    for item in overrides:
        apply_override(raw, item)
    return validate_recipe(raw, source=str(path))


def load_raw(path: str | Path, _depth: int = 0) -> dict[str, Any]:
    """The recipe as a plain dict with `extends:` resolved (the child wins, dicts merge deeply)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist; pass the path of a YAML recipe (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of blocks (run:, model:, data:, ...), got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if _depth >= MAX_EXTENDS_DEPTH:
        raise RecipeError(f"{path}: `extends:` chain deeper than {MAX_EXTENDS_DEPTH}; is there a cycle?")
    base = load_raw((path.parent / parent).resolve(), _depth + 1)
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`; nested dicts merge, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 3, true, [1,2] work).
    A number segment indexes a list, e.g. `plugins.0.start_step=100`."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} is not of the form key.sub=value (e.g. train.steps=20)")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {item!r}: value {text!r} is not valid YAML: {exc}") from exc
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, item, ".".join(parts[:i]))
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"override {item!r}: {parts[i - 1]!r} holds a value, not a block of keys")
        if last:
            node[part] = value
        elif part not in node and _is_index(parts[i + 1]):
            where = ".".join(parts[:i + 1])
            raise RecipeError(f"override {item!r}: {where} is not set in the recipe, so there is no item "
                              f"{parts[i + 1]} to change; set the whole list, e.g. {where}=[...]")
        else:
            node = node.setdefault(part, {})


def _is_index(part: str) -> bool:
    return part.isascii() and part.isdigit()


def _list_index(node: list, part: str, item: str, where: str) -> int:
    if not node:
        raise RecipeError(f"override {item!r}: {where} is an empty list; set it whole, e.g. {where}=[...]")
    if not _is_index(part) or int(part) >= len(node):
        raise RecipeError(f"override {item!r}: {where} is a list of {len(node)} items; "
                          f"index it with 0..{len(node) - 1} (got {part!r})")
    return int(part)


def validate_recipe(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a merged dict into a Recipe, turning pydantic's report into actionable lines."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [_explain(err, raw) for err in exc.errors()]
        raise RecipeError(f"{source}: invalid recipe\n  " + "\n  ".join(lines)) from None


def _explain(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"] if not _is_union_tag(p)]
    where = ".".join(loc) or "<top>"
    if err["type"] == "extra_forbidden":
        choices = _fields_at(Recipe, loc[:-1])
        hint = difflib.get_close_matches(loc[-1], choices, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else f"valid keys: {', '.join(sorted(choices))}"
        return f"{where}: unknown key — {fix}"
    if err["type"] == "missing":
        return f"{where}: required but missing — add it to the recipe"
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(got, dict):  # a whole-block check: its message names the fields itself
        return f"{where}: {msg}"
    if err["type"] == "literal_error":
        choices = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
        close = difflib.get_close_matches(str(got), choices, n=1)
        if close:
            msg += f" (did you mean {close[0]!r}?)"
    return f"{where}: got {got!r} — {msg}"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts discriminator tags / union member names into `loc`; they are not recipe keys.
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    """Field names of the nested model at `path` (best effort, for did-you-mean)."""
    current: Any = model
    for part in path:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = fields[part].annotation
        for arg in getattr(current, "__args__", ()) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                current = arg
    fields = getattr(current, "model_fields", None) or {}
    return list(fields)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written to the run directory and every checkpoint)."""
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude={"extends"}), sort_keys=False)
