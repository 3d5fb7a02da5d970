"""The plugin registry: name -> (config class, plugin class), built-ins plus the `slimtrain.plugins` entry points.

A third-party package registers a plugin in its pyproject.toml:

    [project.entry-points."slimtrain.plugins"]
    myplugin = "mypkg.plugin:ENTRY"      # ENTRY = (MyConfig, MyPlugin)

Entry points are read the first time a name is looked up that no built-in has, so a recipe without
third-party plugins never imports them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from slimtrain.core.registry import Registry, UnknownNameError, did_you_mean
from slimtrain.modules.plugin import Plugin, PluginConfig

ENTRY_POINT_GROUP = "slimtrain.plugins"
PLUGINS: Registry[tuple[type[PluginConfig], type[Plugin]]] = Registry("plugin")

# Built-in plugins, imported on first lookup (each module registers itself on import).
_BUILTIN_MODULES = ("slimtrain.modules.qat.plugin", "slimtrain.modules.moe.plugin", "slimtrain.modules.draft.plugin",
                    "slimtrain.modules.compressor.plugin")
_loaded = {"builtins": False, "entry_points": False}


def register_plugin(name: str, config_cls: type[PluginConfig]):
    """Class decorator: register a Plugin subclass and its config class under `name`."""
    _check_config_class(name, config_cls)

    def deco(plugin_cls: type[Plugin]) -> type[Plugin]:
        plugin_cls.name = name
        PLUGINS.register(name)((config_cls, plugin_cls))
        return plugin_cls

    return deco


def _check_config_class(name: str, config_cls: type[PluginConfig]) -> None:
    field = config_cls.model_fields.get("type")
    choices = getattr(field.annotation, "__args__", ()) if field else ()
    if tuple(choices) != (name,):
        raise TypeError(f"{config_cls.__name__}.type must be declared `type: Literal[{name!r}]` to register it as {name!r}")


def _load_builtins() -> None:
    if not _loaded["builtins"]:
        _loaded["builtins"] = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def load_entry_points() -> None:
    """Register every `slimtrain.plugins` entry point (idempotent)."""
    if _loaded["entry_points"]:
        return
    _loaded["entry_points"] = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in PLUGINS:
            continue
        config_cls, plugin_cls = ep.load()
        register_plugin(ep.name, config_cls)(plugin_cls)


def lookup(name: str) -> tuple[type[PluginConfig], type[Plugin]]:
    """(config class, plugin class) registered under `name`; built-ins first, then entry points."""
    _load_builtins()
    if name not in PLUGINS:
        load_entry_points()
    return PLUGINS.get(name)


def plugin_names() -> list[str]:
    """Every plugin name available here (built-ins and installed entry points)."""
    _load_builtins()
    load_entry_points()
    return PLUGINS.names()


def validate_plugin_config(value: Any) -> PluginConfig:
    """A recipe's `plugins:` item -> its registered config class (chosen by `type:`).

    Unknown keys are reported with the nearest valid key, since the recipe loader's own did-you-mean
    cannot see inside a registry-chosen class.
    """
    if isinstance(value, PluginConfig):
        return value
    if not isinstance(value, dict) or "type" not in value:
        raise ValueError(f"a plugin is a mapping with a `type:` key (one of {plugin_names()}); got {value!r}")
    try:
        config_cls, _ = lookup(str(value["type"]))
    except UnknownNameError as exc:
        raise ValueError(str(exc)) from None
    check_unknown_keys(config_cls, value, "")
    return config_cls.model_validate(value)


def check_unknown_keys(model: type[BaseModel], value: dict, prefix: str) -> None:
    """Refuse keys of `value` that `model` (a registry-chosen config class) lacks, naming the nearest valid key:
    the recipe loader's own did-you-mean cannot see inside a class chosen by a registry."""
    fields = model.model_fields
    for key, sub in value.items():
        if key not in fields:
            fix = did_you_mean(str(key), fields) or f"valid keys: {', '.join(sorted(fields))}"
            raise ValueError(f"unknown key {prefix}{key} — {fix}")
        nested = _model_for(fields[key].annotation, sub) if isinstance(sub, dict) else None
        if nested is not None:
            check_unknown_keys(nested, sub, f"{prefix}{key}.")


def _model_for(annotation: Any, value: dict) -> type[BaseModel] | None:
    """The model `value` is validated as: the annotation's one model, or, in a tagged union of models, the member
    whose Literal tag (e.g. `source: separate`) the value names (None without one: pydantic's error says which)."""
    models = _models_of(annotation)
    if len(models) <= 1:
        return models[0] if models else None
    for model in models:
        for name, field in model.model_fields.items():
            if get_origin(field.annotation) is Literal and value.get(name) in get_args(field.annotation):
                return model
    return None


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) or () for m in _models_of(arg)]


def build_plugins(configs: list[PluginConfig]) -> list[Plugin]:
    """Plugin instances in composition order (ascending `order`; ties keep the recipe's order)."""
    plugins = [lookup(cfg.type)[1](cfg) for cfg in configs]
    names = [p.name for p in plugins]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"plugins: {twice} listed more than once; list each plugin once")
    return sorted(plugins, key=lambda p: p.order)
