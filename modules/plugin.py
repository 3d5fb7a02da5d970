"""The plugin protocol (DESIGN.md, seam 4): how a compression method joins a run without editing the loop.

A plugin is a config class (a pydantic model with `type: Literal["name"]`) and a `Plugin` subclass,
registered together under that name (`slimtrain.modules.plugins.register_plugin`, or the entry-point
group `slimtrain.plugins` for a third-party package). Every hook is optional; the base class
implements each as a no-op. The trainer calls them in this order:

    configure(model_cfg)       before the model is built: may return a changed ModelConfig
    apply(model)               after the dense model is built and initialised, before the optimizer:
                               swap or add modules (parameters added here are trained and checkpointed)
    on_step_start(step)        before each optimizer step (1-based step about to run; also after a resume)
    losses(outputs, batch)     each micro-batch: named LossTerms the loop adds (weight x value) and logs
    after_optimizer_step(step) after each optimizer step
    metrics()                  after each step: named floats, averaged over ranks and logged
    export(ctx)                `slimtrain export`: rewrite the state dict, add config.json keys, add
                               extra output directories (e.g. a packed low-bit checkpoint)

Plugins compose in ascending `order`, whatever order the recipe lists them in: a plugin that changes
the model's structure must run before one that wraps its layers. The numbers in use:

    moe = 10   (replaces MLPs by experts)       qat = 20          (quantizes every Linear, experts included)
    draft = 30 (adds heads on the final hidden) compressor = 40   (adds an encoder in front)

Plugin state that must survive a resume lives in the model (parameters and buffers, saved by the
backend) or is derived from the step number in `on_step_start`; plugins keep no other state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

if TYPE_CHECKING:
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
class ExportVariant:
    """An extra Hugging Face directory `OUT/<name>/` that a plugin asks the exporter to write.

    transform(hf_state, hf_to_ours) returns the tensors to save (HF names); `hf_to_ours` maps every HF
    tensor name of the plain export to our parameter name. config(hf_to_ours) returns the keys merged
    into its config.json (e.g. `quantization_config`).
    """

    name: str
    transform: Callable[[StateDict, dict[str, str]], StateDict]
    config: Callable[[dict[str, str]], dict[str, Any]] = lambda hf_to_ours: {}
    readme: str = ""


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

    def configure(self, model_cfg: "ModelConfig") -> "ModelConfig":
        """Change the model config before the model is built (default: unchanged)."""
        return model_cfg

    def apply(self, model: nn.Module) -> None:
        """Swap or add modules of the built model (it may live on the meta device: a dry run)."""

    def on_step_start(self, step: int) -> None:
        """Called before optimizer step `step` (1-based) runs, on every rank."""

    def losses(self, outputs: Any, batch: Any) -> dict[str, LossTerm]:
        """Extra loss terms for one micro-batch (`outputs` is the model's output, `batch` the Batch).
        `outputs.hidden_states` is always there; `outputs.logits` only when `needs_logits` is set."""
        return {}

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step `step` was taken (or skipped), on every rank."""

    def metrics(self) -> dict[str, float]:
        """Named values to log after a step; every rank must return the same keys (they are averaged)."""
        return {}

    def export(self, ctx: ExportContext) -> None:
        """Contribute to the Hugging Face export (default: nothing)."""
