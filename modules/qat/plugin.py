"""The `qat` plugin: selects Linear layers by pattern, swaps in QATLinear, switches fake-quant on by step, exports."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from slimtrain.modules.plugin import ExportContext, Plugin, PluginContext, WeightInit
from slimtrain.modules.plugin_registry import register_plugin

from .config import QATConfig, QuantSpec
from .linear import QATLinear

QAT_ORDER = 20  # after moe (10): experts exist before their Linears are quantized


def select_linears(model: nn.Module, cfg: QATConfig) -> list[str]:
    """Module paths of the Linear layers to quantize; every pattern must match something."""
    names = [n for n, _ in model.named_modules() if n]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for i, pattern in enumerate(cfg.include):
        if not any(fnmatchcase(n, pattern) for n in linears):
            raise ValueError(f"include[{i}]={pattern!r} matches no Linear layer; Linear layers look like "
                             f"{_examples(linears)}")
    for i, pattern in enumerate(cfg.exclude):
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"exclude[{i}]={pattern!r} matches no module; modules look like {_examples(names)}")
    chosen = [n for n in linears if any(fnmatchcase(n, p) for p in cfg.include)
              and not any(fnmatchcase(n, p) for p in cfg.exclude)]
    if not chosen:
        raise ValueError(f"include={cfg.include} minus exclude={cfg.exclude} leaves no Linear layer to quantize")
    return chosen


def _examples(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")


def check_shape(name: str, layer: nn.Linear, spec: QuantSpec, role: str) -> None:
    """Group sizes must divide the input features (and tile edges both dimensions)."""
    g, size = spec.resolved_granularity, spec.resolved_group_size
    k, n = layer.in_features, layer.out_features
    if g == "group" and k % size:
        valid = [s for s in (16, 32, 64, 128, 256) if k % s == 0]
        raise ValueError(f"{role}.group_size={size} does not divide the {k} input features of {name!r}; "
                         f"use one of {valid or 'a divisor of ' + str(k)}, or exclude the layer")
    if g == "block" and (k % size or n % size) and role == "weights":
        raise ValueError(f"{role}: block {size}x{size} does not tile {name!r} ({n}x{k}); set group_size to a "
                         "common divisor or use granularity channel")


@register_plugin("qat", QATConfig)
class QATPlugin(Plugin):
    """Quantization-aware training (see docs/qat.md)."""

    order = QAT_ORDER

    def __init__(self, cfg: QATConfig) -> None:
        super().__init__(cfg)
        self.cfg: QATConfig = cfg
        self.layers: dict[str, QATLinear] = {}
        self.active = False
        self._calibration_checked = False

    def apply(self, model: nn.Module) -> None:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        for name in select_linears(model, self.cfg):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = getattr(parent, attr)
            if id(layer.weight) in embeddings:
                raise ValueError(f"{name!r} shares its weight with the embedding (model.tie_embeddings=true), which "
                                 "stays in high precision; exclude it or untie the embeddings")
            check_shape(name, layer, self.cfg.weights, "weights")
            if self.cfg.activations is not None:
                check_shape(name, layer, self.cfg.activations, "activations")
            self.layers[name] = QATLinear(layer, self.cfg)
            setattr(parent, attr, self.layers[name])

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        # LSQ's step starts from the weights, which exist only now when the model was built on the meta device.
        for name, layer in self.layers.items():
            if f"{name}.weight_step_base" not in init.imported:
                layer.reset_lsq_step()

    def on_step_start(self, ctx: PluginContext) -> None:
        # "active" derives from the step alone and the calibrated LSQ steps (with their flag) are
        # buffers in the checkpoint, so a resumed run is in the same state as an uninterrupted one.
        self.set_step(ctx.step)

    def set_step(self, step: int) -> None:
        """Fake-quant on from `start_step` + 1 (what `on_step_start` does; also for tools outside a run)."""
        self.active = step > self.cfg.start_step
        for layer in self.layers.values():
            layer.active = self.active
        if self.active and self.cfg.estimator == "lsq" and not self._calibration_checked:
            self._calibration_checked = True  # read the flags once per process (a device sync each)
            for layer in self.layers.values():
                layer.calibrate_pending = not bool(layer.weight_step_calibrated)

    def metrics(self, ctx: PluginContext) -> dict[str, float]:
        return {"qat/active": float(self.active)}

    def export(self, ctx: ExportContext) -> None:
        from .export import export_qat

        export_qat(self.cfg, self.layers, ctx)
