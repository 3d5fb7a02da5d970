"""The `qat` plugin: selects Linear layers (and modules that declare matmul weights, e.g. MoE experts) by pattern,
fake-quantizes them, switches fake-quant on by step, exports."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from slimtrain.modules.plugin import ExportContext, MetricNames, Plugin, PluginContext, WeightInit
from slimtrain.modules.plugin_registry import register_plugin
from slimtrain.modules.quantizable import TRANSFORM_CHILD, QuantizableWeights, high_precision_reason

from .config import DEFAULT_EXCLUDE, QATConfig, QuantSpec
from .linear import FakeQuantLinear, QATLinear
from .stacked import StackedWeightQAT

QAT_ORDER = 20  # after moe (10): experts exist before they and their Linears are quantized


def select_linears(model: nn.Module, cfg: QATConfig) -> list[str]:
    """Module paths of the Linear layers to quantize (see `select_modules`)."""
    return [n for n in select_modules(model, cfg) if isinstance(model.get_submodule(n), nn.Linear)]


def select_modules(model: nn.Module, cfg: QATConfig) -> list[str]:
    """Module paths to quantize: Linear layers and `QuantizableWeights` modules matched by `include` and not by
    `exclude`. Every include pattern must match one of them, every exclude pattern a module (the defaults
    excepted). A Linear its owner declared high precision (`keep_high_precision`) is never chosen."""
    names = [n for n, _ in model.named_modules() if n]
    quantizable = {n: m for n, m in model.named_modules()
                   if n and (isinstance(m, nn.Linear) or isinstance(m, QuantizableWeights))}
    kept = {n: reason for n, m in quantizable.items() if (reason := high_precision_reason(m)) is not None}
    eligible = [n for n in quantizable if n not in kept]
    for i, pattern in enumerate(cfg.include):
        if not any(fnmatchcase(n, pattern) for n in eligible):
            _refuse_include(i, pattern, eligible, kept)
    for i, pattern in enumerate(cfg.exclude):
        if pattern not in DEFAULT_EXCLUDE and not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"exclude[{i}]={pattern!r} matches no module; modules look like {_examples(names)}")
    chosen = [n for n in eligible if any(fnmatchcase(n, p) for p in cfg.include)
              and not any(fnmatchcase(n, p) for p in cfg.exclude)]
    if not chosen:
        raise ValueError(f"include={cfg.include} minus exclude={cfg.exclude} leaves no Linear layer to quantize")
    return chosen


def _refuse_include(i: int, pattern: str, eligible: list[str], kept: dict[str, str]) -> None:
    held = [n for n in kept if fnmatchcase(n, pattern)]
    if held:
        raise ValueError(f"include[{i}]={pattern!r} matches only modules that stay in high precision, e.g. "
                         f"{held[0]!r}: {kept[held[0]]}; remove the pattern")
    raise ValueError(f"include[{i}]={pattern!r} matches no Linear layer (or module with declared matmul weights); "
                     f"they look like {_examples(eligible)}")


def _examples(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")


def check_shape(name: str, layer: nn.Linear, spec: QuantSpec, role: str) -> None:
    """Group sizes must divide the input features (and tile edges both dimensions)."""
    check_matrix(name, (layer.out_features, layer.in_features), spec, role)


def check_matrix(name: str, shape: tuple[int, int], spec: QuantSpec, role: str, what: str = "") -> None:
    """Group sizes must divide the input features K of a weight [N, K] (tile edges both N and K); `what`
    describes the matrix in the error (e.g. "each expert of")."""
    g, size = spec.resolved_granularity, spec.resolved_group_size
    n, k = shape
    if g == "group" and k % size:
        valid = [s for s in (16, 32, 64, 128, 256) if k % s == 0]
        raise ValueError(f"{role}.group_size={size} does not divide the {k} input features of {what}{name!r}; "
                         f"use one of {valid or 'a divisor of ' + str(k)}, or exclude the layer")
    if g == "block" and (k % size or n % size) and role == "weights":
        raise ValueError(f"{role}: block {size}x{size} does not tile {what}{name!r} ({n}x{k}); set group_size to a "
                         "common divisor or use granularity channel, or exclude the module")


@register_plugin("qat", QATConfig)
class QATPlugin(Plugin):
    """Quantization-aware training (see docs/qat.md)."""

    order = QAT_ORDER

    def __init__(self, cfg: QATConfig) -> None:
        super().__init__(cfg)
        self.cfg: QATConfig = cfg
        # Module path -> the fake-quantizing layer there: the QATLinear swapped in, or what a tensor-parallel backend
        # replaced it with (a layer holding a slice of the weight and of its state), refreshed in `init_weights`.
        self.layers: dict[str, FakeQuantLinear] = {}
        # Module path -> the transform installed on it. The module at a path may be replaced after `apply` (a
        # backend keeping a share of the experts builds a smaller one and carries the transform over), so the
        # module is looked up by path when needed and the map refreshed from the model in `init_weights`.
        self.stacked: dict[str, StackedWeightQAT] = {}
        self.active = False
        self._calibration_checked = False

    def apply(self, model: nn.Module) -> None:
        for name in select_modules(model, self.cfg):
            module = model.get_submodule(name)
            if isinstance(module, nn.Linear):
                self._swap_linear(model, name, module)
            else:
                self._install_transform(name, module)

    def _swap_linear(self, model: nn.Module, name: str, layer: nn.Linear) -> None:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        if id(layer.weight) in embeddings:
            raise ValueError(f"{name!r} shares its weight with the embedding (model.tie_embeddings=true), which "
                             "stays in high precision; exclude it or untie the embeddings")
        check_shape(name, layer, self.cfg.weights, "weights")
        if self.cfg.activations is not None:
            check_shape(name, layer, self.cfg.activations, "activations")
        parent_name, _, attr = name.rpartition(".")
        self.layers[name] = QATLinear(layer, self.cfg)
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, self.layers[name])

    def _install_transform(self, name: str, module: QuantizableWeights) -> None:
        if self.cfg.activations is not None:
            # The inputs of an expert's second product are made inside the grouped computation: no seam reaches them.
            raise ValueError(f"activations (format {self.cfg.activations.format!r}) cannot be quantized in {name!r}: "
                             "activation quantization of modules with declared matmul weights (MoE experts) is not "
                             "supported; set activations: null, or keep these modules in high precision (e.g. "
                             "exclude: ['lm_head', '*.router', '*.experts'])")
        weights = module.matmul_weights()
        for attr, w in weights.items():
            if w.dim() < 2:
                raise ValueError(f"{name}.{attr} has shape {tuple(w.shape)}: a matmul weight needs [..., out, in]")
            check_matrix(f"{name}.{attr}", tuple(w.shape[-2:]), self.cfg.weights, "weights",
                         what="each matrix [out, in] of " if w.dim() > 2 else "")
        self.stacked[name] = StackedWeightQAT(weights, self.cfg)
        module.set_weight_transform(self.stacked[name])

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        # LSQ's step starts from the weights, which exist only now when the model was built on the meta device.
        for name in self.layers:
            layer = model.get_submodule(name)
            if not isinstance(layer, FakeQuantLinear):
                raise RuntimeError(f"{name} is no longer a fake-quantizing layer: a backend that replaces a QATLinear "
                                   "must carry its state over (slimtrain.modules.qat.linear.FakeQuantLinear)")
            self.layers[name] = layer
            if f"{name}.weight_step_base" not in init.imported:
                layer.reset_lsq_step()
        for name in self.stacked:
            owner = model.get_submodule(name)  # the module there now (a share of the experts under expert parallelism)
            transform = getattr(owner, TRANSFORM_CHILD, None)
            if not isinstance(transform, StackedWeightQAT):
                raise RuntimeError(f"{name} no longer carries the QAT transform installed on it: the module that "
                                   "replaced it must carry it over "
                                   "(slimtrain.modules.quantizable.shard_weight_transform)")
            self.stacked[name] = transform
            skip = {w for w in transform.shapes if f"{name}.{TRANSFORM_CHILD}.{w}_step_base" in init.imported}
            transform.reset_lsq_step(owner.matmul_weights(), skip)

    def on_step_start(self, ctx: PluginContext) -> None:
        # "active" derives from the step alone and the calibrated LSQ steps (with their flag) are
        # buffers in the checkpoint, so a resumed run is in the same state as an uninterrupted one.
        self.set_step(ctx.step)

    def set_step(self, step: int) -> None:
        """Fake-quant on from `start_step` + 1 (what `on_step_start` does; also for tools outside a run)."""
        self.active = step > self.cfg.start_step
        for layer in [*self.layers.values(), *self.stacked.values()]:
            layer.active = self.active
        if self.active and self.cfg.estimator == "lsq" and not self._calibration_checked:
            self._calibration_checked = True  # read the flags once per process (a device sync each)
            for layer in self.layers.values():
                layer.calibrate_pending = not bool(layer.weight_step_calibrated)
            for transform in self.stacked.values():
                transform.calibrate_pending = transform.pending_calibration()

    def metric_names(self) -> MetricNames:
        return MetricNames(metrics=("qat/active",))

    def metrics(self, ctx: PluginContext) -> dict[str, float]:
        return {"qat/active": float(self.active)}

    def export(self, ctx: ExportContext) -> None:
        from .export import export_qat

        export_qat(self.cfg, self.layers, ctx, self.stacked)

