"""QAT export: the fake-quantized weights for the plain checkpoint, and the packed compressed-tensors one.

The packing itself is compressed-tensors' (the library vLLM and transformers read the format with):
we hand each compressor the fake-quantized weight and the exact scales the forward used, so the
integers/FP4 codes it stores dequantize back to the very weights we trained with.
"""

from __future__ import annotations

from typing import Any

import torch

from slimtrain.modules.plugin import ExportContext, ExportVariant, StateDict
from slimtrain.modules.quantizable import TRANSFORM_CHILD, QuantizableWeights

from .config import QATConfig, QuantSpec
from .estimators import lsq_init_step, lsq_step
from .linear import FakeQuantLinear
from .reference import QParams
from .stacked import StackedWeightQAT, stacked_init_step

Matrices = list[tuple[torch.Tensor, QParams]]  # per matrix of a stacked weight: (fake-quantized fp32, qparams)

# Our format -> compressed-tensors storage format (None: the format defines no packed layout).
PACKED_FORMAT = {"int": "pack-quantized", "ternary": "pack-quantized", "fp8_e4m3": "float-quantized",
                 "fp8_e5m2": None, "mxfp8": "mxfp8-quantized", "mxfp4": "mxfp4-pack-quantized",
                 "nvfp4": "nvfp4-pack-quantized"}
_STRATEGY = {"tensor": "tensor", "channel": "channel", "token": "token", "group": "group", "block": "block"}


def quant_args(spec: QuantSpec, dynamic: bool) -> dict[str, Any] | None:
    """compressed-tensors QuantizationArgs (as a dict) for `spec`, or None when it has no equivalent."""
    f, g = spec.format, spec.resolved_granularity
    args: dict[str, Any] = {"symmetric": spec.symmetric, "dynamic": dynamic, "strategy": _STRATEGY[g]}
    if f in ("int", "ternary"):
        args.update(num_bits=2 if f == "ternary" else spec.bits, type="int")
    elif f == "fp8_e4m3" or f == "mxfp8":
        args.update(num_bits=8, type="float")
    elif f in ("mxfp4", "nvfp4"):
        args.update(num_bits=4, type="float")
    else:
        return None
    if g == "group":
        args["group_size"] = spec.resolved_group_size
    if g == "block":
        args["block_structure"] = [spec.resolved_group_size] * 2
    if f == "nvfp4":
        args.update(strategy="tensor_group", scale_dtype="torch.float8_e4m3fn")
        if dynamic:
            return None  # NVFP4 inputs need a calibrated static tensor scale in this format; we use dynamic ones
    if f in ("mxfp4", "mxfp8"):
        args["scale_dtype"] = "torch.uint8"
    return args


def scheme(cfg: QATConfig, targets: list[str]):
    """The compressed-tensors QuantizationScheme of the run (None when the weights' format has no packing)."""
    from compressed_tensors.quantization import QuantizationScheme

    fmt = PACKED_FORMAT[cfg.weights.format]
    weights = quant_args(cfg.weights, dynamic=False)
    if fmt is None or weights is None:
        return None
    acts = quant_args(cfg.activations, dynamic=True) if cfg.activations is not None else None
    return QuantizationScheme(targets=targets, weights=weights, input_activations=acts, format=fmt)


def ct_state(w_fq: torch.Tensor, qp: QParams) -> StateDict:
    """The per-module dict a compressed-tensors compressor takes: weight plus scale tensors."""
    state = {"weight": w_fq, "weight_scale": qp.scale.float()}
    if qp.zero_point is not None:
        state["weight_zero_point"] = qp.zero_point.to(torch.int8)
    if qp.global_scale is not None:
        state["weight_global_scale"] = qp.global_scale.float()
    return state


def compress(w_fq: torch.Tensor, qp: QParams, sch) -> StateDict:
    """Packed tensors of one layer (local names: weight_packed, weight_scale, ...)."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(sch.format)
    return compressor.compress(ct_state(w_fq, qp), sch)


def export_qat(cfg: QATConfig, layers: dict[str, FakeQuantLinear], ctx: ExportContext,
               stacked: dict[str, StackedWeightQAT] | None = None) -> None:
    """Rewrite ctx.state to the fake-quantized weights (Linear layers and stacked weights) and register the
    packed variant."""
    packed: dict[str, tuple[torch.Tensor, QParams]] = {}
    for name, layer in layers.items():
        step = None
        if cfg.estimator == "lsq":
            step = _pop_lsq_step(ctx.state, f"{name}.weight_step_", cfg, ctx.state[f"{name}.weight"], lsq_init_step)
        w_fq, qp = layer.export_weight(ctx.state[f"{name}.weight"].float(), step)
        ctx.state[f"{name}.weight"] = w_fq
        packed[f"{name}.weight"] = (w_fq, qp)
    matrices = _export_stacked(cfg, stacked or {}, ctx)
    linears = [n for n, m in ctx.model.named_modules() if isinstance(m, torch.nn.Linear)]
    declared = [f"{n}.{w}" for n, m in ctx.model.named_modules() if isinstance(m, QuantizableWeights)
                for w in m.matmul_weights()]
    sch = scheme(cfg, targets=["Linear"])
    if sch is None:
        ctx.notes.append(f"qat: {cfg.weights.format} has no compressed-tensors layout; only the dequantized "
                         "checkpoint was written")
        return
    ctx.variants.append(ExportVariant(
        name="packed", transform=lambda hf, to_ours: _pack(hf, to_ours, packed, matrices, cfg.weights, sch),
        config=lambda hf_to_ours: {"quantization_config": quantization_config(
            sch, packed, linears, hf_to_ours, [w for w in declared if w not in matrices])},
        readme="Packed low-bit weights in the compressed-tensors format (vLLM, transformers).",
    ))


def _pop_lsq_step(state: StateDict, prefix: str, cfg: QATConfig, weight: torch.Tensor, init) -> torch.Tensor:
    """The learned steps from a checkpoint's LSQ tensors (`{prefix}base`, `gain`, `calibrated`, removed from
    `state`); never calibrated (fake-quant never started): from the weights now, as the first quantized step
    would have set them."""
    base, gain = state.pop(f"{prefix}base"), state.pop(f"{prefix}gain")
    calibrated = bool(state.pop(f"{prefix}calibrated"))
    if calibrated:
        return lsq_step(base.float(), gain.float(), cfg.lsq_lr_scale)
    return init(weight.float(), cfg.weights, cfg.lsq_init)


def _export_stacked(cfg: QATConfig, stacked: dict[str, StackedWeightQAT], ctx: ExportContext) -> dict[str, Matrices]:
    """Each stacked weight (our name) -> its matrices as exported; ctx.state holds the fake-quantized stack."""
    out: dict[str, Matrices] = {}
    for path, transform in stacked.items():
        for attr, shape in transform.shapes.items():
            name, step = f"{path}.{attr}", None
            if cfg.estimator == "lsq":
                step = _pop_lsq_step(ctx.state, f"{path}.{TRANSFORM_CHILD}.{attr}_step_", cfg, ctx.state[name],
                                     stacked_init_step)
            out[name] = transform.export_weight(ctx.state[name], step)
            ctx.state[name] = torch.stack([w for w, _ in out[name]]).reshape(shape)
    return out


def _pack(hf_state: StateDict, to_ours: dict[str, str], packed: dict, matrices: dict[str, Matrices],
          spec: QuantSpec, sch) -> StateDict:
    out: StateDict = {}
    find = _MatrixFinder(matrices, spec)
    for hf_name, tensor in hf_state.items():
        ours = to_ours.get(hf_name)
        if ours in packed:
            w_fq, qp = packed[ours]
        elif ours in matrices:
            w_fq, qp = find(hf_name, tensor, ours)
        else:
            out[hf_name] = tensor
            continue
        prefix = hf_name.removesuffix("weight")
        out.update({prefix + k: v for k, v in compress(w_fq, qp, sch).items()})
    return out


class _MatrixFinder:
    """Which rows of which matrix of a stacked weight an HF tensor holds.

    The exporter maps an HF tensor that is a view of a stacked weight (an expert's gate_proj: rows 0:I of
    expert e's gate_up) to the stacked weight's name only, and hands the variant a copy; the rows are found by
    value among the row blocks of its height, trying first the block after the previous match (adapters write
    experts in order, so that is nearly always the one). Matrices equal in value pack alike, so a tie is harmless.
    """

    def __init__(self, matrices: dict[str, Matrices], spec: QuantSpec) -> None:
        self.matrices, self.spec = matrices, spec
        self.next: dict[str, int] = {}

    def __call__(self, hf_name: str, tensor: torch.Tensor, ours: str) -> tuple[torch.Tensor, QParams]:
        mats = self.matrices[ours]
        rows, cols = mats[0][0].shape
        n = tensor.shape[0] if tensor.dim() == 2 else 0
        if tensor.dim() != 2 or tensor.shape[1] != cols or not n or rows % n:
            raise ValueError(f"{hf_name} {tuple(tensor.shape)} is not a block of rows of one matrix of {ours} "
                             f"({len(mats)} x [{rows}, {cols}]); the packed export needs one tensor per matrix "
                             "(per expert), or per row block of one")
        blocks = [(e, r) for e in range(len(mats)) for r in range(0, rows, n)]
        start = self.next.get(ours, 0)
        for j in range(len(blocks)):
            e, r = blocks[(start + j) % len(blocks)]
            w = mats[e][0][r:r + n]
            if torch.equal(w.to(tensor.dtype), tensor):
                self.next[ours] = (start + j + 1) % len(blocks)
                return w.clone(), slice_qparams(mats[e][1], self.spec, r, n, rows, hf_name)
        raise ValueError(f"{hf_name} equals no block of {n} rows of {ours}: the exported tensor is not the "
                         "fake-quantized weight (did an adapter change it?)")


def slice_qparams(qp: QParams, spec: QuantSpec, start: int, n: int, rows: int, what: str) -> QParams:
    """The qparams of rows start:start+n of a matrix with `rows` rows (a per-tensor scale covers every row), as
    copies: two tensors of one file sharing memory are saved once (the other name silently dropped)."""
    per_scale = rows // qp.scale.shape[0]  # 1 for channel and group scales, the tile edge for blocks
    a, b = 0, qp.scale.shape[0]
    if spec.resolved_granularity != "tensor":
        if start % per_scale or n % per_scale:
            raise ValueError(f"{what} holds rows {start}:{start + n} of a weight quantized in {per_scale}x{per_scale} "
                             f"blocks, which do not tile it; set weights.group_size to a divisor of {n}")
        a, b = start // per_scale, (start + n) // per_scale
    zero = None if qp.zero_point is None else qp.zero_point[a:b].clone()
    glob = None if qp.global_scale is None else qp.global_scale.clone()
    return QParams(qp.scale[a:b].clone(), zero, glob)


def quantization_config(sch, packed: dict, linears: list[str], hf_to_ours: dict[str, str],
                        unpacked_stacked: list[str] = ()) -> dict[str, Any]:
    """config.json's `quantization_config`: one config group over the Linear layers, the others ignored.

    A Linear kept in high precision is listed in `ignore` by its HF module name; a tied output head
    has no tensor of its own in the HF files and keeps its module name (`lm_head`). A stacked weight kept in
    high precision (excluded experts) is listed by the HF module of each of its tensors (every expert's
    projections): serving engines read expert layers through the Linear config group too.
    """
    from compressed_tensors.quantization import QuantizationConfig

    ours_to_hf = {o: h.removesuffix(".weight") for h, o in hf_to_ours.items()}
    ignore = {ours_to_hf.get(f"{n}.weight", n) for n in linears if f"{n}.weight" not in packed}
    ignore |= {h.removesuffix(".weight") for h, o in hf_to_ours.items() if o in set(unpacked_stacked)}
    config = QuantizationConfig(config_groups={"group_0": sch}, format=sch.format, quantization_status="compressed",
                                ignore=sorted(ignore))
    return config.model_dump(mode="json", exclude_none=True)


@torch.no_grad()
def dequantize_packed(layer_state: StateDict, sch) -> torch.Tensor:
    """fp32 weights from one layer's packed tensors, decoded by compressed-tensors' own unpacking."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    fmt = sch.format
    if fmt not in ("mxfp4-pack-quantized", "nvfp4-pack-quantized"):
        state = {k: (v.float() if v.is_floating_point() and k != "weight_packed" else v) for k, v in layer_state.items()}
        return BaseCompressor.get_value_from_registry(fmt).decompress(state, sch)["weight"].float()
    # compressed-tensors' FP4 decompress returns bf16; decode the same codes in fp32 to compare exactly.
    packed = layer_state["weight_packed"]
    codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    scale = compressor._decompress_scale(layer_state["weight_scale"], torch.float32)
    return dequantize(x_q=codes, scale=scale, args=sch.weights, global_scale=layer_state.get("weight_global_scale"),
                      dtype=torch.float32)
