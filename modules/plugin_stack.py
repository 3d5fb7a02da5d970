"""A recipe's plugins in composition order, with every hook fanned out (the only caller of the hooks).

Nothing here knows a plugin by name. The trainer, the exporter and the recipe validation hold a
`PluginStack` and call it; it calls each plugin's hook in ascending `order`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from slimtrain.modules.plugin import (
    ExportContext, HFAdapter, LossTerm, ModelCounts, ParamGroup, Plugin, PluginConfig, PluginContext, WeightInit,
)
from slimtrain.modules.plugin_registry import build_plugins
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.modules.transformer.io import ModelInputs, TransformerOutput

DRY_RUN_VOCAB = 256  # the tokenizer's size is unknown at validation; no plugin check depends on it


class PluginStack:
    """The plugins of one run, sorted by `order` (ties keep the recipe's order)."""

    def __init__(self, plugins: Iterable[Plugin] = ()) -> None:
        self.plugins: list[Plugin] = list(plugins)

    @classmethod
    def from_configs(cls, configs: list[PluginConfig]) -> "PluginStack":
        """Instantiate the recipe's `plugins:` blocks through the registry."""
        return cls(build_plugins(configs))

    def __iter__(self) -> Iterator[Plugin]:
        return iter(self.plugins)

    def __len__(self) -> int:
        return len(self.plugins)

    def _overriding(self, hook: str) -> list[Plugin]:
        """The plugins that implement `hook` (skipping the base class's no-ops keeps the common path free)."""
        return [p for p in self.plugins if getattr(type(p), hook) is not getattr(Plugin, hook)]

    # -- build -------------------------------------------------------------------------------------

    def configure(self, model_cfg: ModelConfig) -> ModelConfig:
        """The model config after every plugin's `configure`."""
        for plugin in self.plugins:
            model_cfg = plugin.configure(model_cfg)
        return model_cfg

    def apply(self, model: nn.Module) -> None:
        """Every plugin's `apply` (the model may be on the meta device)."""
        for plugin in self.plugins:
            plugin.apply(model)

    @torch.no_grad()
    def init_weights(self, model: nn.Module, seed: int, imported: frozenset[str] = frozenset(),
                     source: Mapping[str, torch.Tensor] | None = None,
                     starting: Callable[[str], torch.Tensor | None] | None = None,
                     token_counts: Callable[[], torch.Tensor] | None = None) -> frozenset[str]:
        """Every plugin's `init_weights`, from one generator seeded by `seed` (reproducible per recipe);
        `imported`: the tensors a checkpoint import filled, which keep their values; `source`: the starting
        checkpoint's tensors the model lacks (`WeightInit.source`); `starting`: what a branch will load into the
        model's own tensors (`WeightInit.starting`); `token_counts`: the corpus's token frequencies. Returns the source names the plugins consumed."""
        source = MappingProxyType(dict(source or {}))  # read-only for the plugins
        consumed: set[str] = set()
        for plugin in self.plugins:
            # A stream of its own per plugin: neither the model's draws nor another plugin's.
            generator = torch.Generator().manual_seed(_derived_seed(seed, plugin.name))
            plugin.init_weights(model, WeightInit(generator=generator, imported=imported, source=source,
                                                  consumed=consumed, starting=starting or (lambda name: None),
                                                  token_counts=_once(token_counts)))
        return frozenset(consumed)

    def skeleton(self, model_cfg: ModelConfig) -> nn.Module:
        """The model with every plugin applied, on the meta device (structure and shapes, no memory)."""
        from slimtrain.modules.transformer import Transformer

        with torch.device("meta"):
            model = Transformer(model_cfg)
        self.apply(model)
        return model

    def model_sources(self) -> list[tuple[str, Path]]:
        """Every plugin's `model_sources`, fields prefixed `plugins.<plugin>.`."""
        return [(f"plugins.{plugin.name}.{field}", path) for plugin in self._overriding("model_sources")
                for field, path in plugin.model_sources()]

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """Every plugin's optimizer groups, checked: unique names, each parameter in one group, of this model."""
        groups = [g for plugin in self.plugins for g in plugin.param_groups(model)]
        owned = {id(p) for p in model.parameters()}
        names, seen = set(), {}
        for group in groups:
            if group.name in names:
                raise ValueError(f"two plugin parameter groups are named {group.name!r}; name each group once")
            names.add(group.name)
            for p in group.params:
                if id(p) not in owned:
                    raise ValueError(f"parameter group {group.name!r} holds a parameter that is not the model's")
                if id(p) in seen:
                    raise ValueError(f"a parameter is in both {seen[id(p)]!r} and {group.name!r}; put it in one group")
                seen[id(p)] = group.name
        frozen = [g for g in groups if g.frozen]
        if frozen and owned <= {id(p) for g in frozen for p in g.params}:
            raise ValueError(f"the frozen parameter groups {[g.name for g in frozen]} hold every parameter of the "
                             "model: nothing would train; leave a group unfrozen (e.g. give the frozen base heads "
                             "to train)")
        return groups

    def batch_transforms(self) -> list[Any]:
        """The data-side transforms every plugin declares, in composition order."""
        return [t for plugin in self.plugins for t in plugin.batch_transforms()]

    # -- each micro-batch ----------------------------------------------------------------------------

    @property
    def needs_logits(self) -> bool:
        """Whether a plugin's losses read the whole logits."""
        return any(p.needs_logits for p in self.plugins)

    def model_inputs(self, inputs: ModelInputs, batch: Any, ctx: PluginContext) -> ModelInputs:
        """The model's inputs after every plugin's `model_inputs`."""
        for plugin in self._overriding("model_inputs"):
            inputs = plugin.model_inputs(inputs, batch, ctx)
        return inputs

    def inputs(self, batch: Any, ctx: PluginContext, with_logits: bool = True) -> ModelInputs:
        """The model inputs of `batch` with every plugin's `model_inputs` applied (what the loss calls the model with)."""
        return self.model_inputs(ModelInputs.of(batch, with_logits), batch, ctx)

    def bind(self, ctx: PluginContext) -> PluginContext:
        """`ctx` with `ctx.inputs` composing these plugins' model inputs (for their own evaluations)."""
        ctx.inputs = lambda batch: self.inputs(batch, ctx)
        return ctx

    def losses(self, outputs: TransformerOutput, batch: Any, ctx: PluginContext) -> dict[str, LossTerm]:
        """Every plugin's loss terms, named `<plugin>/<term>`, once every plugin extended the outputs."""
        for plugin in self._overriding("extend_outputs"):
            plugin.extend_outputs(outputs, batch, ctx)
        return {f"{plugin.name}/{name}": term for plugin in self._overriding("losses")
                for name, term in plugin.losses(outputs, batch, ctx).items()}

    # -- around each step ------------------------------------------------------------------------------

    def on_step_start(self, ctx: PluginContext) -> None:
        for plugin in self.plugins:
            plugin.on_step_start(ctx)

    def after_optimizer_step(self, ctx: PluginContext) -> None:
        for plugin in self.plugins:
            plugin.after_optimizer_step(ctx)

    def metrics(self, ctx: PluginContext) -> dict[str, float | list[float]]:
        """Every plugin's metrics on this rank (the caller averages them over ranks)."""
        values: dict[str, float | list[float]] = {}
        for plugin in self._overriding("metrics"):
            values.update(plugin.metrics(ctx))
        return values

    def plots(self, records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """Every plugin's end-of-run figures."""
        return [path for plugin in self._overriding("plots") for path in plugin.plots(records, out_dir)]

    # -- evaluation, accounting, export -----------------------------------------------------------------

    def evaluate(self, ctx: PluginContext, batches: Callable[[], Iterable[Any]]) -> dict[str, float]:
        """Every plugin's own evaluation, each on a fresh pass of `batches()`, named `<plugin>/<key>`."""
        results: dict[str, float] = {}
        for plugin in self._overriding("evaluate"):
            with torch.no_grad():
                found = plugin.evaluate(ctx, batches())
            results.update({f"{plugin.name}/{k}": float(v) for k, v in found.items()})
        return results

    def counts(self, model_cfg: ModelConfig, seq_len: int, causal: bool = True) -> ModelCounts:
        """Parameters and training FLOPs per token of the model with every plugin applied."""
        n = model_cfg.num_params()
        counts = ModelCounts(total_params=n, active_params=n, flops_per_token=model_cfg.flops_per_token(seq_len, causal))
        for plugin in self.plugins:
            counts = plugin.counts(model_cfg, counts, seq_len, causal)
        return counts

    def hf_architecture(self, model_cfg: ModelConfig, default: str | None = None) -> str:
        """The architecture adapter the model exports as: the one a plugin names, else `default` (None: the dense
        model's family, `model.architecture`). Two plugins naming different architectures cannot compose in one
        export."""
        named = {p.name: arch for p in self.plugins if (arch := p.hf_architecture(model_cfg)) is not None}
        if len(set(named.values())) > 1:
            raise ValueError(f"plugins ask for different Hugging Face architectures ({named}); at most one "
                             "plugin may choose the architecture")
        return next(iter(named.values()), default or model_cfg.architecture)

    def hf_adapters(self) -> list[tuple[str, HFAdapter]]:
        """(plugin name, its own tensor adapter) of the plugins that have one, in composition order."""
        return [(p.name, a) for p in self.plugins if (a := p.hf_adapter()) is not None]

    def export(self, state: dict[str, torch.Tensor], model_cfg: ModelConfig, step: int) -> ExportContext:
        """Let every plugin rewrite a checkpoint's state and add config keys and variants."""
        ctx = ExportContext(state=dict(state), model_cfg=model_cfg, model=self.skeleton(model_cfg), step=step)
        for plugin in self.plugins:
            plugin.export(ctx)
        return ctx


def _once(compute: Callable[[], torch.Tensor] | None) -> Callable[[], torch.Tensor | None]:
    """`compute` called on first use only (counting a corpus's tokens takes a while), None without it."""
    held: list[torch.Tensor] = []

    def value() -> torch.Tensor | None:
        if compute is None:
            return None
        if not held:
            held.append(compute())
        return held[0]

    return value


def _derived_seed(seed: int, name: str) -> int:
    """A seed for `name` from the recipe's: stable across processes and Python versions (no hash())."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def check_plugins(configs: list[PluginConfig], model_cfg: ModelConfig, loss_chunk_tokens: int = 0) -> None:
    """Dry-run configure + apply on a meta model so that bad patterns or shapes fail at validation;
    with `loss_chunk_tokens`, also that every plugin works without whole logits.

    Raises ValueError naming `plugins.<i> (<type>)`, for the recipe loader to report.
    """
    stack = PluginStack.from_configs(configs)
    index = {id(cfg): i for i, cfg in enumerate(configs)}
    if model_cfg.vocab_size is None:
        model_cfg = model_cfg.model_copy(update={"vocab_size": DRY_RUN_VOCAB})
    current = None
    try:
        for current in stack:
            model_cfg = current.configure(model_cfg)
        from slimtrain.modules.transformer import Transformer

        with torch.device("meta"):
            model = Transformer(model_cfg)
        for current in stack:
            current.apply(model)
            if loss_chunk_tokens:
                _check_chunkable(current, model, loss_chunk_tokens)
        current = None
        stack.param_groups(model)
    except ValueError as exc:
        where = f"plugins.{index[id(current.cfg)]} ({current.name})" if current is not None else "plugins"
        raise ValueError(f"{where}: {exc}") from None


def _check_chunkable(plugin: Plugin, model: nn.Module, chunk: int) -> None:
    if plugin.needs_logits:
        raise ValueError(f"its losses read the whole logits, which train.loss_chunk_tokens={chunk} never builds; "
                         "set train.loss_chunk_tokens=0")
    if getattr(model.lm_head, "mixes_tokens", False):  # a head whose output for a token depends on the others
        raise ValueError(f"lm_head now shares one input scale across tokens, so train.loss_chunk_tokens={chunk} "
                         "would give every chunk its own scale; exclude lm_head from the plugin, quantize its "
                         "inputs per token or per group, or set train.loss_chunk_tokens=0")
