"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from slimtrain.modules.plugin import ParamGroup
from slimtrain.trainer.recipe.schema import OptimConfig, ScheduleConfig


ENGINE_GROUP_ATTR = "_slimtrain_engine_group"


def set_engine_group(params: Sequence[nn.Parameter], keys: dict) -> None:
    """Ask for `params` to sit in optimizer groups of their own that carry `keys` (a backend, before the
    optimizer is built: e.g. DeepSpeed's `{"moe": True, "name": <expert group>}` for expert-parallel weights).
    `param_groups` splits every group that holds some of them, keeping its learning rate and weight decay."""
    for p in params:
        setattr(p, ENGINE_GROUP_ATTR, dict(keys))


def param_groups(model: nn.Module, weight_decay: float, plugin_groups: Sequence[ParamGroup] = (),
                 lr: float | None = None) -> list[dict]:
    """The optimizer's groups: matrices decay; norms, biases and embeddings do not. A plugin's groups
    (`Plugin.param_groups`) come after, each with its learning-rate scale, weight decay and engine keys;
    a frozen group's parameters are left out (they are neither updated nor decayed). Parameters a backend
    tagged (`set_engine_group`) leave their group for one right after it with the same settings and the
    backend's keys.

    Embeddings are excluded by module type (not by name) so that a tied output head, which shares
    the embedding's tensor, is treated the same way.
    """
    return _split_engine_groups(_groups(model, weight_decay, plugin_groups, lr))


def _groups(model: nn.Module, weight_decay: float, plugin_groups: Sequence[ParamGroup],
            lr: float | None) -> list[dict]:
    no_decay_ids = _no_decay_ids(model)
    claimed = {id(p) for g in plugin_groups for p in g.params}
    seen = set(claimed)
    rest = []
    for _, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            rest.append(p)
    groups = _split_decay(rest, no_decay_ids, weight_decay, {})
    for group in plugin_groups:
        if group.frozen:
            continue
        keys = {"name": group.name, **({"lr": lr * group.lr_scale} if lr is not None else {}), **group.engine}
        if group.weight_decay is None:
            groups += _split_decay(group.params, no_decay_ids, weight_decay, keys)
        else:
            groups.append({"params": list(group.params), "weight_decay": group.weight_decay, **keys})
    return [g for g in groups if g["params"]]


def _split_engine_groups(groups: list[dict]) -> list[dict]:
    """Each group, then one group per distinct backend key set of its tagged parameters (same settings)."""
    out = []
    for group in groups:
        plain, tagged = [], {}
        for p in group["params"]:
            keys = getattr(p, ENGINE_GROUP_ATTR, None)
            if keys is None:
                plain.append(p)
            else:
                tagged.setdefault(tuple(sorted(keys.items())), []).append(p)
        out.append({**group, "params": plain})
        out += [{**group, **dict(keys), "params": params} for keys, params in tagged.items()]
    return [g for g in out if g["params"]]


def _no_decay_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        # A backend's parallel embedding (megatron's vocabulary-parallel one) says so: it is not an nn.Embedding.
        if isinstance(module, nn.Embedding) or getattr(module, "is_embedding", False):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def _split_decay(params: list[nn.Parameter], no_decay_ids: set[int], weight_decay: float, keys: dict) -> list[dict]:
    """A decaying group of the matrices and a non-decaying one of the rest (vectors, embeddings)."""
    decay, no_decay = [], []
    for p in params:
        (no_decay if p.ndim < 2 or id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, **keys}, {"params": no_decay, "weight_decay": 0.0, **keys}]


def freeze(plugin_groups: Sequence[ParamGroup]) -> None:
    """Switch gradients off for the parameters of frozen groups (before the engine sees the model)."""
    for group in plugin_groups:
        if group.frozen:
            for p in group.params:
                p.requires_grad_(False)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether no element of `tensors` is NaN or Inf, with one host sync per device and no full-size temporary.

    The max-abs norm is NaN or Inf exactly when an element is (and cannot overflow, unlike the 2-norm).
    `torch.isfinite(g)` would allocate an abs copy and bool masks of every gradient, 7 bytes per
    parameter; under DeepSpeed's ZeRO-1/2 the gradient here is the flat fp32 partition, so that was the
    memory peak of a 1B step with activation checkpointing on an H100 (27 GB allocated, against 20.5 GB
    of model states).
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():  # the max of nothing is undefined (and has nothing to check)
            by_device.setdefault(t.device, []).append(t)
    return all(bool(torch.isfinite(_extremes(ts)).all()) for ts in by_device.values())


def _extremes(ts: list[torch.Tensor]) -> torch.Tensor:
    """Values that are all finite exactly when every element of `ts` is (NaN propagates through both).

    CUDA: the max-abs norm, one multi-tensor kernel for all. CPU: each tensor's min and max, whose kernel
    is 8x faster there than the max-abs norm (2.2 ms against 16.8 ms for 7M fp32 values on 2 cores; the
    NaN guard was 1% of the CPU benchmark's step).
    """
    if ts[0].device.type != "cpu":
        return torch.stack(torch._foreach_norm(ts, ord=math.inf))
    return torch.stack([v.float() for t in ts for v in torch.aminmax(t)])


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips the whole step when any gradient is NaN/Inf.

    DeepSpeed's ZeRO optimizers already skip such steps; without ZeRO the client optimizer runs as
    is, so the guard gives every stage the same semantics. `overflow` is the attribute DeepSpeed's
    engine reads to count a skipped step and hold the lr schedule back.
    """

    overflow: bool = False

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not all_finite(grads)
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: OptimConfig, plugin_groups: Sequence[ParamGroup] = ()
                    ) -> torch.optim.Optimizer:
    """AdamW over the decay/no-decay groups and the plugins' groups, on torch's fused kernel (CUDA and CPU).

    Frozen groups are switched off first (`freeze`). Fused AdamW is one kernel over all tensors instead of
    a loop of foreach kernels: for a 1B model on an H100 it is the difference between the optimizer step
    costing ~25 ms and ~60 ms; on CPU (`backend.offload_optimizer`'s partitions, CPU runs) 50M parameters
    take 49 ms against 216 ms foreach and 152 ms with DeepSpeedCPUAdam (2-core machine).
    """
    freeze(plugin_groups)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)
    groups = param_groups(model, cfg.weight_decay, plugin_groups, lr=cfg.lr)
    return GuardedAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **({"fused": True} if fused else {}))


def lr_factor(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based) of `total`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.type == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.type == "cosine":
        span = max(1, total - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(total * cfg.decay_fraction))
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int):
    """A LambdaLR over `lr_factor`; DeepSpeed steps it once per applied optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
