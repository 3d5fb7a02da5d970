"""Recipe files: YAML → `extends:` merge → `a.b=c` overrides → validated `Recipe`.

Every failure is a `RecipeError` whose lines read `field.path: got VALUE — what is wrong (fix)`.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from slimtrain.core.registry import did_you_mean
from slimtrain.trainer.recipe.from_checkpoint import model_block_from_checkpoint
from slimtrain.trainer.recipe.schema import Recipe
from slimtrain.trainer.errors import RecipeError

MAX_EXTENDS_DEPTH = 8

# Keys of which a block takes exactly one: setting one (in a child recipe or an override) drops the others
# a parent set, e.g. a tokenizer `path:` replaces an inherited `train:` block.
ONE_OF = {("data", "tokenizer"): ("path", "train")}


class RecipeLoader(yaml.SafeLoader):
    """YAML for recipes: a key twice in one block is an error (YAML would keep the last silently), and
    `5e7` is a number (YAML 1.1 wants `5.0e+7`)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; it may come more than once
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise RecipeError(f"line {key_node.start_mark.line + 1}: a key must be a name, not a {key_node.id}")
            if key in seen:
                raise RecipeError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in the same "
                                  "block; YAML would keep only the last one. Merge them into one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_yaml(text: str) -> Any:
    """`text` parsed with the recipe rules (RecipeLoader)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read `path`, merge what it extends, apply overrides, validate."""
    raw = load_raw(path)
    for item in overrides:
        apply_override(raw, item)
    return validate_recipe(raw, source=str(path))


def load_raw(path: str | Path, _depth: int = 0, _child: Path | None = None) -> dict[str, Any]:
    """The recipe as a plain dict with `extends:` resolved (the child wins, dicts merge deeply)."""
    path = Path(path)
    if not path.is_file():
        if _child is not None:
            raise RecipeError(f"{_child}: extends: {str(path)!r}, which does not exist; give a path relative to "
                              f"{_child.resolve().parent} (or absolute)")
        raise RecipeError(f"recipe file {str(path)!r} does not exist; pass the path of a YAML recipe (see recipes/)")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except RecipeError as exc:
        raise RecipeError(f"{path}, {exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of blocks (run:, model:, data:, ...), got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: must be the path of one recipe file, got {parent!r}")
    if _depth >= MAX_EXTENDS_DEPTH:
        raise RecipeError(f"{path}: `extends:` chain deeper than {MAX_EXTENDS_DEPTH}; is there a cycle?")
    base = load_raw((path.parent / parent).resolve(), _depth + 1, _child=path)
    return merge_recipes(base, data)


def merge_recipes(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`deep_merge` for recipes: a key of a ONE_OF group set by the child drops the group's other keys, and a
    `backend:` block naming another engine than the parent's replaces the parent's block."""
    merged = deep_merge(base, child)
    child_backend, base_backend = child.get("backend"), base.get("backend")
    if isinstance(child_backend, dict) and isinstance(base_backend, dict) and \
            child_backend.get("type", "deepspeed") != base_backend.get("type", "deepspeed"):
        merged["backend"] = dict(child_backend)  # another engine: the parent's engine keys mean nothing to it
    for where, group in ONE_OF.items():
        set_here = _block(child, where)
        if set_here and any(k in set_here for k in group):
            _drop_others(_block(merged, where), group, keep=[k for k in group if k in set_here])
    return merged


def _block(raw: dict[str, Any], where: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = raw
    for part in where:
        node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _drop_others(block: dict[str, Any] | None, group: tuple[str, ...], keep: list[str]) -> None:
    for key in group:
        if block is not None and key not in keep:
            block.pop(key, None)


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
    if parts[0] == "extends":
        raise RecipeError(f"override {item!r}: extends: is read from the recipe file before any override; "
                          "write a recipe that extends the other one instead")
    try:
        value = parse_yaml(text)
    except (yaml.YAMLError, RecipeError) as exc:
        raise RecipeError(f"override {item!r}: value {text!r} is not valid YAML: {exc}") from exc
    for where, group in ONE_OF.items():  # data.tokenizer.path=... (or .train.vocab_size=...) replaces the other
        n = len(where)
        if tuple(parts[:n]) == where and len(parts) > n and parts[n] in group:
            _drop_others(_block(raw, where), group, keep=[parts[n]])
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
    """Validate a merged dict into a Recipe, turning pydantic's report into actionable lines. A recipe that
    continues from a Hugging Face checkpoint takes the model fields it leaves out from the checkpoint's config."""
    raw = model_block_from_checkpoint(raw, source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = [_explain(err, raw) for err in exc.errors()]
        raise RecipeError(f"{source}: invalid recipe\n  " + "\n  ".join(lines)) from None


def _explain(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = _recipe_path(err["loc"], raw)
    where = ".".join(loc) or "<top>"
    if err["type"] == "union_tag_invalid":  # e.g. a source `type:` that names no source kind
        ctx = err.get("ctx", {})
        field = ctx.get("discriminator", "").strip("'")
        choices = re.findall(r"'([^']*)'", ctx.get("expected_tags", ""))
        hint = did_you_mean(str(ctx.get("tag")), choices)
        hint = f" ({hint})" if hint else ""
        return f"{where}.{field}: got {ctx.get('tag')!r} — choose one of {', '.join(map(repr, choices))}{hint}"
    if err["type"] == "extra_forbidden":
        choices = _fields_at(Recipe, loc[:-1], raw)
        fix = did_you_mean(loc[-1], choices) or f"valid keys: {', '.join(sorted(choices))}"
        return f"{where}: unknown key — {fix}"
    if err["type"] == "missing":
        return f"{where}: required but missing — add it to the recipe"
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if isinstance(got, dict) and err["type"] == "value_error":  # a whole-block check names the fields itself
        return f"{where}: {msg}"
    if err["type"] == "literal_error":
        choices = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
        hint = did_you_mean(str(got), choices)
        if hint:
            msg += f" ({hint})"
    if err["type"] == "string_type" and isinstance(got, (bool, int, float)):
        # YAML read the text as a number or a boolean (2024, yes, off): quoting keeps it text.
        msg += f"; YAML read the value as {type(got).__name__}: to mean the text, quote it ({where}: \"...\" " \
               f"in the recipe, '{where}=\"...\"' on the command line)"
    return f"{where}: got {got!r} — {msg}"


def _recipe_path(loc: tuple[Any, ...], raw: dict[str, Any]) -> list[str]:
    """pydantic's error location as the recipe's key path: the union members and discriminator tags it
    inserts (`python-stdlib`, `function-after[...]`) are not keys of the recipe, so they are dropped."""
    out: list[str] = []
    node: Any = raw
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(part, str) and ("[" in part or part.startswith("function-") or
                                        (isinstance(node, dict) and not last and part not in node)):
            continue
        else:
            node = None
        out.append(str(part))
    return out


def _fields_at(model: type[BaseModel], path: list[str], raw: Any) -> list[str]:
    """Field names of the nested model at `path` (best effort, for did-you-mean); a list item of a union
    of models (data sources) is the member its `type:` names."""
    current: Any = model
    for part in path:
        raw = raw[int(part)] if isinstance(raw, list) and part.isdigit() and int(part) < len(raw) else (
            raw.get(part) if isinstance(raw, dict) else None)
        if part.isdigit():
            current = _member(getattr(current, "__args__", (current,))[0], raw)
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = _member(fields[part].annotation, raw)
    fields = getattr(current, "model_fields", None) or {}
    return list(fields)


def _member(annotation: Any, raw: Any) -> Any:
    """The model in `annotation` (a model, Optional/Union of models, list of them) that `raw` is meant as."""
    args = getattr(annotation, "__args__", ()) or ()
    if getattr(annotation, "__origin__", None) is list:
        return annotation
    if hasattr(annotation, "__metadata__"):  # Annotated[Union[...], discriminator]
        return _member(args[0] if args else annotation.__origin__, raw)
    models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    tag = raw.get("type") if isinstance(raw, dict) else None
    for m in models:  # the member whose `type: Literal[...]` admits the item's tag
        if tag is not None and "type" in m.model_fields and tag in typing.get_args(m.model_fields["type"].annotation):
            return m
    return models[0] if models else annotation


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written to the run directory and every checkpoint)."""
    return yaml.safe_dump(recipe.model_dump(mode="json", exclude={"extends"}), sort_keys=False)
