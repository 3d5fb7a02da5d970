"""The plugin protocol (DESIGN.md, seam 4): how a compression method joins a run without editing the core.

A plugin is a config class (a pydantic model with `type: Literal["name"]`) and a `Plugin` subclass,
registered together under that name (`slimtrain.modules.plugin_registry.register_plugin`, or the
entry-point group `slimtrain.plugins` for a third-party package). Every hook is optional; the base
class implements each as a no-op. docs/plugins.md says when the trainer calls each one.

Build (every rank, and on the meta device when a recipe is validated or a checkpoint exported):

    configure(model_cfg)        -> ModelConfig   before the model is built
    apply(model)                                 swap or add modules (the model may be on the meta device)
    init_weights(model, init)                    after the weights exist: initialise what `apply` added
    param_groups(model)         -> [ParamGroup]  own learning-rate scale, weight decay, freezing, engine flags
    batch_transforms()          -> [BatchTransform]  extra per-row batch fields, built by the data path

Each micro-batch (train and eval), inside the loss:

    model_inputs(inputs, batch, ctx) -> ModelInputs   what the model is called with
    losses(outputs, batch, ctx)      -> {name: LossTerm}

Around each optimizer step: on_step_start(ctx), after_optimizer_step(ctx), metrics(ctx); at the end, plots.
At each evaluation: the loss terms on held-out data, then evaluate(ctx, batches) -> {name: float}.
Accounting: counts(model_cfg, counts, seq_len, causal) -> ModelCounts (FLOPs, active parameters).
Export and import: hf_architecture(model_cfg), hf_adapter(), export(ctx: ExportContext).

Plugins compose in ascending `order`, whatever order the recipe lists them in:

    moe = 10   (replaces MLPs by experts)       qat = 20          (quantizes every Linear, experts included)
    draft = 30 (adds heads on hidden states)    compressor = 40   (adds an encoder in front)

Plugin state that must survive a resume lives in the model (parameters and buffers, saved by the
backend) or is derived from the step number in `on_step_start`; plugins keep no other state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from slimtrain.modules.context import Communicator, LocalCommunicator
from slimtrain.modules.transformer.io import ModelInputs, TransformerOutput

if TYPE_CHECKING:
    from slimtrain.core.transforms import BatchTransform
    from slimtrain.modules.transformer.config import ModelConfig

StateDict = dict[str, torch.Tensor]


class PluginConfig(BaseModel):
    """Base of every plugin's recipe block; subclasses add `type: Literal["name"]` and their fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    type: str = Field(description="Plugin name: a built-in (qat) or one installed through the `slimtrain.plugins` "
                      "entry-point group. Each plugin's own keys are in its docs (docs/qat.md).")


class LossTerm(NamedTuple):
    """A named extra loss: the loop backpropagates `weight * value` and logs `value` (unweighted).

    `value` is a mean over this micro-batch (like a per-token average); the backend then averages it
    over micro-batches and ranks, exactly as it does the language-modelling loss.
    """

    value: torch.Tensor
    weight: float = 1.0


@dataclass
class PluginContext:
    """What every per-step hook gets: the run around the plugin, without global distributed state.

    model: the model with every plugin applied (unwrapped from the engine).
    step: the 1-based optimizer step about to run (on_step_start, the loss) or just run
        (after_optimizer_step, metrics); after a resume, the checkpoint's step.
    device: where the model's parameters and the batches live.
    comm: reduces tensors over the ranks of a named process group (`comm.all_reduce(t, group="data")`).
    groups: the backend's named process groups ("data"; "expert", "sequence" where the engine has them);
        hand them to `comm` by name, never to torch.distributed directly.
    training: False during an evaluation.
    inputs: the composed model inputs of a batch (below).
    """

    model: nn.Module
    step: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    comm: Communicator = field(default_factory=LocalCommunicator)
    groups: Mapping[str, Any] = field(default_factory=dict)
    training: bool = True
    inputs: Callable[[Any], ModelInputs] = ModelInputs.of
    """What the model is called with for a batch, through every plugin's `model_inputs` as in the loss: a
    plugin's own evaluation calls `ctx.model(**ctx.inputs(batch).model_kwargs())`."""


@dataclass
class WeightInit:
    """What `Plugin.init_weights` needs: a seeded generator, the tensors a checkpoint import filled
    (`checkpoint.init_from_hf`; our names), which keep their imported values, and the starting checkpoint's
    tensors this model does not hold (`source`), which a plugin may initialise its own from.

    generator: this plugin's own stream, seeded from the recipe.
    imported: names of the model's tensors an import filled; leave them as they are.
    source: tensors of the checkpoint the run starts from (`checkpoint.branch_from`'s parameters, or the
        tensors of `checkpoint.init_from_hf` mapped to our names) that this model lacks: fp32, full size, on
        the CPU, read-only (e.g. the dense MLP of a layer the MoE plugin turned into experts). A plugin that
        initialises from one calls `consume(name)`; the build refuses a source tensor no plugin consumed,
        and a branch drops the consumed ones (with their optimizer state) instead of refusing them.
    consumed: the source names consumed so far (shared by every plugin of one build).
    starting(name): the value a `checkpoint.branch_from` will load into the model's own tensor `name` after
        this initialisation (full, fp32, on the CPU), or None when the run does not branch: then the model's
        tensor already holds its starting value (drawn, or imported by `init_from_hf`). A plugin whose new
        tensors start from the model's (draft heads copying the output head) reads it, so that a branch
        starts them from the checkpoint's weights and not from the draw the checkpoint replaces.
    token_counts(): how often each token id occurs in the training corpus, int64 [vocab] (computed on the first
        call), or None outside a training run (a tool building the model to load a checkpoint into it).
    """

    generator: torch.Generator
    imported: frozenset[str] = frozenset()
    source: Mapping[str, torch.Tensor] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)
    starting: Callable[[str], "torch.Tensor | None"] = lambda name: None
    token_counts: Callable[[], "torch.Tensor | None"] = lambda: None

    def consume(self, *names: str) -> None:
        """Record that this plugin's initialisation used the `source` tensors `names` (so the run may drop them)."""
        unknown = [n for n in names if n not in self.source]
        if unknown:
            raise KeyError(f"consume({', '.join(map(repr, unknown))}): not a source tensor; the source holds "
                           f"{sorted(self.source)[:5]}")
        self.consumed.update(names)


@dataclass
class ParamGroup:
    """Parameters a plugin puts in an optimizer group of their own.

    name: shown in logs and errors; unique per run (prefix it with the plugin's name).
    params: the parameters (each in at most one plugin group).
    lr_scale: multiplies the recipe's learning rate (and so follows its schedule).
    weight_decay: None applies the recipe's rule (matrices decay, vectors and embeddings do not);
        a number applies to every parameter of the group.
    frozen: requires_grad is switched off: never updated, never decayed, no optimizer state.
    engine: extra keys for the engine's optimizer group (e.g. DeepSpeed's `{"moe": True}` for experts).
    """

    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay: float | None = None
    frozen: bool = False
    engine: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelCounts:
    """What a model costs, for MFU, tokens/s per active parameter, the memory estimate and the model card.

    total_params: parameters stored (memory, checkpoint size; a tied embedding counted once).
    active_params: parameters one token passes through (an MoE's routed experts count top-k of them).
    flops_per_token: training FLOPs of one token (forward and backward).
    """

    total_params: int
    active_params: int
    flops_per_token: float


@dataclass(frozen=True)
class MetricNames:
    """What a plugin's hooks name their values (`Plugin.metric_names`), as fnmatch patterns. metrics.jsonl holds a
    loss term as `<plugin>/<term>` at each step and `eval/<plugin>/<term>` at each evaluation, a `metrics` value
    under its own name, an `evaluate` result as `eval/<plugin>/<key>` (slimtrain.trainer.reproduce.metric_names).

    losses: the keys `losses` returns. metrics: the keys `metrics` returns. evaluate: the keys `evaluate` returns.
    """

    losses: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    evaluate: tuple[str, ...] = ()


@dataclass(frozen=True)
class HFAdapter:
    """How a plugin's own tensors enter and leave a Hugging Face directory: `slimtrain export`, its
    `--verify`, and `checkpoint.init_from_hf` all go through it.

    owns(name): whether our tensor `name` is this plugin's (the architecture's adapter maps the rest).
    to_hf(state, cfg): its tensors (our names) -> the names they take in the HF directory.
    from_hf(hf_state, cfg): the HF tensors it recognises -> our names (it ignores the others); the
        inverse of `to_hf`.
    config(cfg): keys it adds to config.json (e.g. where its heads sit).
    """

    owns: Callable[[str], bool]
    to_hf: Callable[[StateDict, "ModelConfig"], StateDict]
    from_hf: Callable[[StateDict, "ModelConfig"], StateDict]
    config: Callable[["ModelConfig"], dict[str, Any]] = lambda cfg: {}


@dataclass
class ExportVariant:
    """An extra Hugging Face directory `OUT/<name>/` that a plugin asks the exporter to write.

    transform(hf_state, hf_to_ours) returns the tensors to save (HF names); `hf_to_ours` maps every HF
    tensor name of the plain export to our parameter name. config(hf_to_ours) returns the keys merged
    into its config.json (e.g. `quantization_config`), or with `standalone` the whole config.json: a
    directory that is not the model but something an engine loads beside it (draft heads, a speculator).

    appended_layers: decoder layers the variant adds after the model's (our names, `layers.{num_layers + k}.*`,
    each shaped as a layer of the model): the exporter names them with the model's own mapping, as layers of a
    model that many layers deeper (an MoE block's experts, bias and all), and hands them to `transform` inside
    `hf_state` (e.g. DeepSeek-V3's MTP layers, `model.layers.{num_hidden_layers + k}.*`).
    """

    name: str
    transform: Callable[[StateDict, dict[str, str]], StateDict]
    config: Callable[[dict[str, str]], dict[str, Any]] = lambda hf_to_ours: {}
    readme: str = ""
    standalone: bool = False
    appended_layers: StateDict = field(default_factory=dict)


@dataclass
class ExportContext:
    """What `Plugin.export` may change. The exporter writes the plain directory from `state` (our
    names, fp32) and `config`, then every variant.

    model: the model skeleton on the meta device, with every plugin's `apply` done (module types
    and shapes, no data): tells a plugin which of the state's tensors belong to its modules.
    step: the checkpoint's training step (hooks that depend on it, e.g. "quantization started", agree).
    config: keys merged into the plain directory's config.json. notes: lines for the console and card.
    """

    state: StateDict
    model_cfg: "ModelConfig"
    model: nn.Module
    step: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    variants: list[ExportVariant] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Plugin:
    """Base class of a plugin: every hook is a no-op until overridden. One instance per rank."""

    name: ClassVar[str] = ""
    order: ClassVar[int] = 50
    needs_logits: ClassVar[bool] = False
    """True when `losses` reads `outputs.logits`: such a plugin cannot run with `train.loss_chunk_tokens`,
    which never builds the whole [tokens, vocab] logits (`outputs.logits` is None there)."""

    def __init__(self, cfg: PluginConfig) -> None:
        self.cfg = cfg

    # -- build ---------------------------------------------------------------------------------

    def configure(self, model_cfg: "ModelConfig") -> "ModelConfig":
        """Change the model config before the model is built (default: unchanged)."""
        return model_cfg

    def apply(self, model: nn.Module) -> None:
        """Swap or add modules of the built model (it may live on the meta device: a dry run)."""

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        """Initialise the parameters and buffers `apply` added, once the model's own weights are initialised
        and imported (a model built on the meta device holds no values before). Draw from `init.generator`
        (seeded from the recipe); leave the tensors named in `init.imported` as they are. Tensors of the
        starting checkpoint that the model lacks are in `init.source`: `init.consume(name)` each one used."""

    def model_sources(self) -> list[tuple[str, Path]]:
        """(recipe field, directory) of every model the plugin reads weights from at build, beside the run's own
        (a second decoder): the trainer refuses one whose tokenizer is not the run's data's, before the build."""
        return []

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """Optimizer groups of this plugin's parameters (default: none; they join the recipe's groups)."""
        return []

    def batch_transforms(self) -> list["BatchTransform"]:
        """Data-side transforms that add per-row batch fields (see slimtrain.core.transforms)."""
        return []

    # -- each micro-batch ------------------------------------------------------------------------

    def model_inputs(self, inputs: ModelInputs, batch: Any, ctx: PluginContext) -> ModelInputs:
        """What the model is called with for `batch` (default: unchanged). E.g. encoder outputs spliced
        in place of context tokens, hidden states of chosen layers requested, labels re-targeted."""
        return inputs

    def extend_outputs(self, outputs: TransformerOutput, batch: Any, ctx: PluginContext) -> None:
        """Run what the plugin adds to the forward (draft heads with decoder blocks of their own) before any
        plugin's `losses` reads `outputs`. A block that reports aux (an MoE layer's routing) appends it to
        `outputs.aux`'s lists after the model's layers, so that the plugin owning that sub-layer (balancing
        losses, load statistics) sees it as one more layer. Called in plugin order, on every micro-batch whose
        losses are computed; the plugin keeps what it computed for its own `losses`."""

    def losses(self, outputs: TransformerOutput, batch: Any, ctx: PluginContext) -> dict[str, LossTerm]:
        """Extra loss terms for one micro-batch (`outputs` is the model's output, `batch` the Batch).
        `outputs.hidden_states` is always there; `outputs.logits` only when `needs_logits` is set."""
        return {}

    # -- around each step --------------------------------------------------------------------------

    def on_step_start(self, ctx: PluginContext) -> None:
        """Called before optimizer step `ctx.step` (1-based) runs, on every rank; also after a resume."""

    def after_optimizer_step(self, ctx: PluginContext) -> None:
        """Called after optimizer step `ctx.step` was taken (or skipped), on every rank."""

    def metrics(self, ctx: PluginContext) -> dict[str, float | list[float]]:
        """Named values to log after a step; every rank must return the same keys and vector lengths (they
        are averaged). A list is a vector (e.g. one value per expert): it goes to metrics.jsonl, where
        `plots` reads it back, and wandb shows it as a histogram."""
        return {}

    def metric_names(self) -> "MetricNames | None":
        """The names this plugin's hooks log, as fnmatch patterns (`*` for a layer index or a draft offset), so that
        a recipe's `expect:` targets are checked before a run. None (the default): undeclared, and targets are
        checked against a run's metrics.jsonl instead."""
        return None

    # -- evaluation, accounting, export ------------------------------------------------------------

    def evaluate(self, ctx: PluginContext, batches: Iterable[Any]) -> dict[str, float]:
        """An evaluation of the plugin's own on held-out batches (the model is in eval mode, gradients
        off). Reduce over ranks with `ctx.comm`; every rank returns the same keys."""
        return {}

    def plots(self, records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """End-of-run figures (PNG files written into `out_dir`, the run directory) drawn from the run's
        metric records, those of earlier jobs of a resumed run included; called on the main rank after
        loss_curve.png. Returns the files written."""
        return []

    def counts(self, model_cfg: "ModelConfig", counts: ModelCounts, seq_len: int, causal: bool) -> ModelCounts:
        """The model's cost with this plugin applied (default: unchanged)."""
        return counts

    def hf_architecture(self, model_cfg: "ModelConfig") -> str | None:
        """The registered architecture adapter (`slimtrain.modules.hf_adapters`) the model with this plugin
        exports as, e.g. an MoE layout; None leaves the choice to the others (default: the dense llama)."""
        return None

    def hf_adapter(self) -> HFAdapter | None:
        """How this plugin's own tensors map into the Hugging Face directory (default: it adds none)."""
        return None

    def export(self, ctx: ExportContext) -> None:
        """Contribute to the Hugging Face export: rewrite `ctx.state`, add config keys and serving
        variants (default: nothing)."""
