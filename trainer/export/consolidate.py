"""One full fp32 state dict from a checkpoint, whatever the ZeRO stage and world size that wrote it."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimtrain.modules.plugin import ExportContext
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.trainer.lifecycle.checkpoint import STATE, find_resumable, verify_checkpoint
from slimtrain.trainer.recipe.schema import Recipe
from slimtrain.trainer.errors import CheckpointError
from slimtrain.trainer.recipe.loading import validate_recipe

from slimtrain.trainer.backends.deepspeed import DS_TAG


@dataclass
class LoadedCheckpoint:
    """What export and its verification need from a checkpoint directory, read (and its recipe validated) once.

    trained_state: the consolidated fp32 state as the run trained it, the plugins' own tensors included
        (what `--verify` loads into the model with every plugin applied).
    state_dict: the weights to serve: `trained_state` after the recipe's plugins' export hooks (e.g.
        fake-quantized weights, tensors only training needs removed); `plugin_export` holds what else
        the hooks asked for (config keys, serving variants).
    plugins: the recipe's plugins, whose adapters map the state into the Hugging Face directory.
    """

    path: Path
    recipe: Recipe
    model_cfg: ModelConfig
    trainer_state: dict[str, Any]
    trained_state: dict[str, torch.Tensor]
    plugins: PluginStack
    plugin_export: ExportContext

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.plugin_export.state

    @property
    def step(self) -> int:
        """The optimizer steps the checkpoint has taken."""
        return int(self.trainer_state.get("step", 0))

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"


def resolve_checkpoint(path: Path) -> Path:
    """A step directory, or a run/checkpoints directory (its newest complete checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass a step directory "
                              "(runs/NAME/checkpoints/step_00000100) or a run directory")
    if (path / "manifest.json").is_file() or (path / STATE).is_file() or (path / DS_TAG).is_dir():
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is incomplete: {problem}; export an older step instead")
        return path
    for root in (path / "checkpoints", path):
        found = find_resumable(root) if root.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint under {path}; did the run save one (checkpoint.every)?")


def load_checkpoint_for_export(path: Path) -> LoadedCheckpoint:
    """Read the recipe, the resolved model config and the consolidated fp32 weights, then run the plugins'
    export hooks: everything an export and its `--verify` need, each read once."""
    path = resolve_checkpoint(path)
    recipe, model_cfg, state = checkpoint_recipe(path)
    from slimtrain.trainer.backends import BACKENDS

    read_weights = BACKENDS.get(recipe.backend.type).read_weights
    if read_weights is None:
        raise CheckpointError(f"{path}: backend {recipe.backend.type!r} cannot read its checkpoints offline; export "
                              "from a run of a backend that can")
    weights = read_weights(path, recipe, model_cfg)
    plugins = PluginStack.from_configs(recipe.plugins)
    ctx = plugins.export(weights, model_cfg, int(state.get("step", 0)))
    return LoadedCheckpoint(path, recipe, model_cfg, state, weights, plugins, ctx)


def checkpoint_recipe(path: Path) -> tuple[Recipe, ModelConfig, dict[str, Any]]:
    """The recipe a checkpoint was saved under, its resolved model config and its trainer state."""
    import yaml

    state = json.loads((path / STATE).read_text())
    recipe = validate_recipe(yaml.safe_load((path / "recipe.yaml").read_text()), source=str(path / "recipe.yaml"))
    return recipe, ModelConfig.model_validate(state["model_config"]), state


def zero0_fp32_masters(path: Path, saved: dict, recipe: Recipe | None = None,
                       model_cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """ZeRO-0 in bf16/fp16: the module holds the rounded weights; the fp32 masters are in the optimizer
    state, group by group in the order our param_groups gave them. {} when there are none (fp32).
    `recipe` and `model_cfg`: the checkpoint's, when the caller has read them already."""
    masters = (saved.get("optimizer") or {}).get("fp32_groups")
    if not masters:
        return {}
    from slimtrain.trainer.optim import freeze, param_groups

    if recipe is None or model_cfg is None:
        recipe, model_cfg, _ = checkpoint_recipe(path)
    plugins = PluginStack.from_configs(recipe.plugins)
    skeleton = plugins.skeleton(model_cfg)
    aliases: dict[int, list[str]] = {}  # a tied weight has two names
    for n, p in skeleton.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    plugin_groups = plugins.param_groups(skeleton)
    freeze(plugin_groups)  # as the run's optimizer saw the model
    groups = [g["params"] for g in param_groups(skeleton, 0.0, plugin_groups)]
    if [len(g) for g in groups] != [len(g) for g in masters]:
        raise CheckpointError(f"{path}: the optimizer's fp32 master groups ({[len(g) for g in masters]} tensors) do "
                              f"not match the model's parameter groups ({[len(g) for g in groups]})")
    out: dict[str, torch.Tensor] = {}
    for params, fp32 in zip(groups, masters):
        for p, w in zip(params, fp32):
            if tuple(w.shape) != tuple(p.shape):
                raise CheckpointError(f"{path}: fp32 master of {aliases[id(p)][0]} has shape {tuple(w.shape)}, "
                                      f"the model's is {tuple(p.shape)}")
            out.update({n: w.float() for n in aliases[id(p)]})
    return out


def consolidate(path: Path, zero_stage: int, recipe: Recipe | None = None,
                model_cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights: the fp32 masters of a bf16/fp16 run. ZeRO 1-3: DeepSpeed's own merge of the
    fp32 master partitions; ZeRO-0: the module's weights, or the optimizer's fp32 copies of them; an
    expert-parallel run (ZeRO-1/2): every expert rank's partitions joined into whole expert tensors.
    `recipe` and `model_cfg`: the checkpoint's, when the caller has read them (else read here if needed)."""
    if zero_stage in (1, 2):
        from slimtrain.trainer.backends.deepspeed_experts import saved_expert_parallel_size

        ep = (getattr(recipe.backend, "expert_parallel_size", 1) if recipe is not None
              else saved_expert_parallel_size(path))
        if ep > 1:
            return _consolidate_expert_parallel(path, ep, recipe, model_cfg)
    if zero_stage == 0:
        files = sorted((path / DS_TAG).glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{path / DS_TAG} holds no mp_rank_*_model_states.pt; the checkpoint is damaged")
        saved = torch.load(files[0], map_location="cpu", weights_only=False)
        return {k: _fp32(v) for k, v in saved["module"].items()} | zero0_fp32_masters(path, saved, recipe, model_cfg)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file it reads
        merged = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
    return {k: _fp32(v) for k, v in merged.items()}


def _consolidate_expert_parallel(path: Path, ep: int, recipe: Recipe | None,
                                 model_cfg: ModelConfig | None) -> dict[str, torch.Tensor]:
    """DeepSpeed's merge would join each expert tensor over all ranks (and the model-states file holds expert
    rank 0's experts only): the expert tensors of the recipe's model are joined per expert rank instead."""
    from slimtrain.modules.expert_parallel import expert_parameter_counts
    from slimtrain.trainer.backends.deepspeed_experts import consolidated_state

    if recipe is None or model_cfg is None:
        recipe, model_cfg, _ = checkpoint_recipe(path)
    counts = expert_parameter_counts(PluginStack.from_configs(recipe.plugins).skeleton(model_cfg))
    return consolidated_state(path / DS_TAG, counts, ep)


def _fp32(tensor: torch.Tensor) -> torch.Tensor:
    """Floating tensors in fp32; integer buffers as they are (a cast would round an int32 that holds fp32 bits,
    e.g. an imported selection bias of experts, and counters past 2^24)."""
    return tensor.float() if tensor.is_floating_point() else tensor
