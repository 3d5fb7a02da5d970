"""Our state dict <-> the tensors of a Hugging Face directory, through every adapter of one model.

The architecture adapter the plugins choose (`PluginStack.hf_architecture`, default "llama") maps the
model's own tensors; each plugin's `HFAdapter` maps the tensors it `owns`. Export, its `--verify` and
`checkpoint.init_from_hf` all map here, so a tensor leaves and comes back under the same names.
A tensor no adapter claims, or one two adapters claim, is a `MappingError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimtrain.core.registry import UnknownNameError
from slimtrain.modules.hf_adapters import Adapter, NameMismatch, StateDict, get_adapter
from slimtrain.modules.plugin import HFAdapter
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer.config import ModelConfig

FIX_EXPORT = ("give the plugin that adds them an hf_adapter() that owns them (docs/export.md), or remove them "
              "from the state in its export hook")
FIX_IMPORT = ("add the plugin that wrote them to the recipe's plugins, or remove them from the directory")


class MappingError(ValueError):
    """A tensor no adapter claims, or one claimed twice; the message names it and the fix."""


@dataclass(frozen=True)
class ModelAdapters:
    """The adapters of one model: its architecture's (chosen by the plugins) and the plugins' own.

    name: the registered architecture name; plugins: (plugin name, its HFAdapter) in composition order.
    """

    name: str
    architecture: Adapter
    plugins: tuple[tuple[str, HFAdapter], ...] = ()

    def config(self, cfg: ModelConfig) -> dict[str, Any]:
        """The keys the plugins' adapters add to config.json; two plugins setting one key differently is an error."""
        keys: dict[str, Any] = {}
        source: dict[str, str] = {}
        for plugin, adapter in self.plugins:
            for key, value in adapter.config(cfg).items():
                if key in keys and keys[key] != value:
                    raise MappingError(f"config.json key {key!r} is set to {keys[key]!r} by plugin {source[key]!r} and "
                                       f"to {value!r} by plugin {plugin!r}; let one plugin's hf_adapter() own it")
                keys[key], source[key] = value, plugin
        return keys

    def to_hf(self, state: StateDict, cfg: ModelConfig) -> StateDict:
        """Our tensors -> HF names: each plugin's owned tensors by its adapter, the rest by the architecture."""
        parts: dict[str, StateDict] = {}
        rest: StateDict = {}
        for name, tensor in state.items():
            owners = [plugin for plugin, adapter in self.plugins if adapter.owns(name)]
            if len(owners) > 1:
                raise MappingError(f"tensor {name!r} is owned by the hf_adapter() of plugins {owners}; exactly one "
                                   "plugin may own a tensor")
            (parts.setdefault(owners[0], {}) if owners else rest)[name] = tensor
        try:
            hf = dict(self.architecture.to_hf(rest, cfg))
        except NameMismatch as exc:
            raise MappingError(self._unclaimed(exc, "export")) from None
        written = dict.fromkeys(hf, f"the {self.name!r} architecture")
        for plugin, adapter in self.plugins:
            if plugin not in parts:
                continue
            mapped = adapter.to_hf(parts[plugin], cfg)
            dropped = sorted(set(parts[plugin]) - set(adapter.from_hf(mapped, cfg)))
            if dropped:
                raise MappingError(f"plugin {plugin!r} owns {dropped} but its hf_adapter() does not write them "
                                   "(to_hf) or read them back (from_hf); map every tensor that owns() claims")
            _claim(written, mapped, f"plugin {plugin!r}")
            hf.update(mapped)
        return hf

    def from_hf(self, hf_state: StateDict, cfg: ModelConfig) -> StateDict:
        """HF tensors -> our names: each plugin's adapter takes what it recognises, the architecture the rest."""
        claimed: dict[str, str] = {}
        state: StateDict = {}
        filled: dict[str, str] = {}
        for plugin, adapter in self.plugins:
            part = adapter.from_hf(hf_state, cfg)
            if not part:
                continue  # its tensors are not in the directory: the plugin initialises them itself
            foreign = sorted(n for n in part if not adapter.owns(n))
            if foreign:
                raise MappingError(f"plugin {plugin!r}'s hf_adapter() reads {foreign}, which its owns() denies; "
                                   "from_hf must return only tensors the plugin owns")
            _claim(claimed, {k: None for k in adapter.to_hf(part, cfg) if k in hf_state}, f"plugin {plugin!r}")
            _claim(filled, part, f"plugin {plugin!r}")
            state.update(part)
        rest = {k: v for k, v in hf_state.items() if k not in claimed}
        try:
            ours = self.architecture.from_hf(rest, cfg)
        except NameMismatch as exc:
            taken = sorted(set(exc.missing) & set(claimed))
            if taken:
                raise MappingError(f"tensors {taken} are claimed twice: by the {self.name!r} architecture and by "
                                   f"{sorted({claimed[k] for k in taken})}; a plugin may not read the "
                                   "architecture's tensors") from None
            raise MappingError(self._unclaimed(exc, "import")) from None
        _claim(filled, ours, f"the {self.name!r} architecture")
        state.update(ours)
        return state

    def _unclaimed(self, exc: NameMismatch, direction: str) -> str:
        """What the architecture refused: tensors that no adapter claims (and those it misses)."""
        plugins = [p for p, _ in self.plugins] or "none"
        if not exc.unexpected:
            return f"{exc} (architecture {self.name!r})"
        where = "the state holds" if direction == "export" else "the directory holds"
        fix = FIX_EXPORT if direction == "export" else FIX_IMPORT
        missing = f"; it also lacks {exc.missing}" if exc.missing else ""
        return (f"{where} tensors that no adapter claims: {exc.unexpected} — not the {self.name!r} architecture's, "
                f"and no plugin's hf_adapter() owns them (plugins with one: {plugins}){missing}; {fix}")


def _claim(taken: dict[str, str], names: dict[str, Any], who: str) -> None:
    """Record that `who` claims `names`, refusing a name that someone else already claimed."""
    twice = sorted(n for n in names if n in taken)
    if twice:
        raise MappingError(f"tensors {twice} are claimed twice: by {taken[twice[0]]} and by {who}; each tensor "
                           "belongs to one adapter")
    taken.update(dict.fromkeys(names, who))


def model_adapters(plugins: PluginStack | None, cfg: ModelConfig) -> ModelAdapters:
    """The adapters of the model with `plugins` applied: the architecture they choose and their own."""
    plugins = plugins if plugins is not None else PluginStack()
    try:
        name = plugins.hf_architecture(cfg)
    except ValueError as exc:
        raise MappingError(str(exc)) from None
    try:
        architecture = get_adapter(name)
    except UnknownNameError as exc:
        raise MappingError(f"architecture {name!r} has no adapter: {exc}; register one with "
                           "slimtrain.modules.hf_adapters.register_adapter") from None
    return ModelAdapters(name, architecture, tuple(plugins.hf_adapters()))
