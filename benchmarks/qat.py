"""What QAT buys: eval loss of a dense model, of its round-to-nearest int4 PTQ, of int4 QAT and of BitNet b1.58,
all trained on the quickstart corpus with the same data, steps and seed; plus, on a GPU, the step-time cost.

    python benchmarks/qat.py                           # quickstart model, 2 CPU ranks (about 4 runs x a few minutes)
    python benchmarks/qat.py --preset tiny --steps 40  # smoke-sized
    python benchmarks/qat.py --steps 600 --bits 2      # int2 group-32 instead of int4 (a PTQ gap a small model shows)
    python benchmarks/qat.py --steps 600 --qat-start 20  # QAT for (almost) the whole run instead of the last quarter
    python benchmarks/qat.py --steps 2000 --qat-start 1500 1900  # two QAT phases branched from one dense run
    python benchmarks/qat.py --steps 2000 --global-batch 64  # GPU: ~4 epochs of the corpus (more tokens per parameter)
    python benchmarks/qat.py --overhead [--compile]    # GPU: step time dense vs QAT (Triton kernels / PyTorch)
    python benchmarks/qat.py --kernels                 # GPU: each kernel vs its PyTorch reference

Quality: (a) dense, (b) (a) after round-to-nearest int4 (or --bits) group-32 PTQ, (c) the same format trained
with QAT (LSQ; the qat-int4-cpu recipe), recovered = (b - c) / (b - a); and (d) ternary b1.58 QAT against (a).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = {  # recipe bases; intermediate 704 so that groups of 32 divide every Linear's input
    "quickstart": {"dense": "quickstart.yaml", "int4": "qat-int4-cpu.yaml", "ternary": "bitnet-b158-cpu.yaml",
                   "overrides": ["model.intermediate_size=704"]},
    "tiny": {"dense": "tiny-cpu.yaml", "int4": "qat-int4-cpu.yaml", "ternary": "bitnet-b158-cpu.yaml",
             "overrides": ["model.intermediate_size=192"]},
}
MIN_PTQ_GAP = 0.01  # eval-loss gap (nats) below which PTQ is lossless here and "recovered" has no meaning
RTN = {"type": "qat", "weights": {"format": "int", "bits": 4, "group_size": 32}, "estimator": "ste"}


def rtn(bits: int) -> dict:
    """Round-to-nearest PTQ at `bits`, groups of 32: the QAT plugin with fake-quant on and nothing learned."""
    return {**RTN, "weights": {**RTN["weights"], "bits": bits}}


def train(recipe: str, name: str, args: argparse.Namespace, extra: list[str]) -> Path:
    """Run `slimtrain train` on `--nproc` local ranks; returns the run directory. A run directory that already
    holds this run's final checkpoint is reused (e.g. runs trained one at a time, or checkpointed more often)."""
    run_dir = Path(args.out) / name
    latest = run_dir / "checkpoints" / "latest"
    if latest.exists() and latest.read_text().strip() == f"step_{args.steps:08d}":
        print(f"reusing {name}: {run_dir} holds step {args.steps}", flush=True)
        return run_dir
    preset = PRESETS[args.preset]
    overrides = [*preset["overrides"], f"train.steps={args.steps}", f"checkpoint.every={args.steps}",
                 f"run.output_dir={run_dir}", "logging.progress=false", "logging.plot=false", "eval.every=0",
                 *(["train.compile=true"] if args.compile else []), *extra]
    if args.preset == "tiny":  # the tiny model with the qat recipes' plugin blocks
        overrides += ["model.hidden_size=64", "model.num_layers=2", "model.max_seq_len=64", "data.seq_len=64",
                      "data.sources=[{type: python-stdlib, max_documents: 300}]", "data.tokenizer.train.vocab_size=512",
                      "train.global_batch_size=8", "train.micro_batch_size=2"]
    overrides += _batch(args)
    cmd = [sys.executable, "-m", "slimtrain.trainer.cli", "train", str(REPO / "recipes" / recipe), f"--nproc={args.nproc}",
           *overrides]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        raise SystemExit(f"training {name} failed:\n{proc.stdout[-4000:]}")
    print(f"trained {name} ({recipe}, {args.steps} steps, {args.nproc} procs) in {time.monotonic() - start:.0f}s", flush=True)
    return run_dir


@torch.no_grad()
def eval_loss(run_dir: Path, plugin_blocks: list[dict] | None, batches: int) -> float:
    """Mean token loss on the first `batches` validation micro-batches, with the checkpoint's plugins
    (or `plugin_blocks` applied to its weights, e.g. RTN PTQ) active."""
    from slimtrain.data import build_loader, prepare
    from slimtrain.modules.plugin_registry import build_plugins, validate_plugin_config
    from slimtrain.modules.transformer import Transformer
    from slimtrain.trainer.export.consolidate import consolidate, load_checkpoint_for_export

    ckpt = load_checkpoint_for_export(run_dir)
    configs = ckpt.recipe.plugins if plugin_blocks is None else [validate_plugin_config(b) for b in plugin_blocks]
    plugins = build_plugins(configs)
    model = Transformer(ckpt.model_cfg)
    for plugin in plugins:
        plugin.apply(model)
    model.load_state_dict(consolidate(ckpt.path, ckpt.recipe.backend.zero_stage))
    for plugin in plugins:
        plugin.set_step(ckpt.trainer_state["step"] + 1)  # fake-quant on, as in serving
    model.eval()
    prepared = prepare(ckpt.recipe.data, progress=False)
    loader = build_loader(prepared, "val", rank=0, world_size=1, micro_batch_size=8, global_batch_size=8,
                          seed=ckpt.recipe.run.seed)
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        logits = model(batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.doc_ids).logits
        total += float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(),
                                                         ignore_index=-100, reduction="sum"))
        count += int((batch.labels != -100).sum())
    return total / count


def _batch(args: argparse.Namespace) -> list[str]:
    """--global-batch rows per step (e.g. a GPU's larger batches), in micro-batches of up to 64 rows."""
    if not args.global_batch:
        return []
    micro = max(1, min(64, args.global_batch // args.nproc))
    return [f"train.global_batch_size={args.global_batch}", f"train.micro_batch_size={micro}"]


def quality(args: argparse.Namespace) -> dict:
    preset, bits, k = PRESETS[args.preset], args.bits, f"int{args.bits}"
    starts = list(dict.fromkeys(args.qat_start or [args.steps * 3 // 4]))  # default: the recipes' last quarter
    if any(not 0 <= s < args.steps for s in starts):  # at or past the end, fake-quant would never train
        raise SystemExit(f"--qat-start {starts}: every start must be in [0, --steps={args.steps})")
    # The dense run also saves at every start, so that each QAT run branches from it (checkpoint.branch_from)
    # instead of retraining the first `start` steps: the same result as one QAT run with fake-quant from
    # `start` (tests/qat/test_qat_train.py), for a fraction of the cost. (The quickstart preset's dense and
    # QAT recipes differ only in the plugin; the tiny preset's also in optimizer and data settings.)
    inside = [s for s in starts if 0 < s < args.steps]
    every = math.gcd(*inside) if inside else args.steps
    if args.steps // every > 40:
        raise SystemExit(f"--qat-start {starts}: the dense run would save every {every} steps to keep each start "
                         "(their greatest common divisor); choose starts with a larger common divisor, e.g. multiples of 100")
    dense = train(preset["dense"], "dense", args, [f"checkpoint.every={every}", f"checkpoint.keep={args.steps // every + 1}"])
    a = eval_loss(dense, None, args.eval_batches)
    b = eval_loss(dense, [rtn(bits)], args.eval_batches)
    measurable = b - a >= MIN_PTQ_GAP  # a recovered fraction over a gap below eval noise is a ratio of noise
    by_start = {}
    for start in starts:
        point = dense / "checkpoints" / f"step_{start:08d}"
        if start and not point.is_dir():  # a dense run reused from an earlier invocation with other starts
            raise SystemExit(f"{dense} has no checkpoint at step {start} to branch from: give this run its own --out")
        branch = [f"checkpoint.branch_from={point}"] if start else []
        qat = train(preset["int4"], f"qat-{k}-from{start}", args,
                    [f"plugins.0.weights.bits={bits}", f"plugins.0.start_step={start}", *branch])
        c = eval_loss(qat, None, args.eval_batches)
        by_start[start] = {"qat": round(c, 4), "recovered": round((b - c) / (b - a), 3) if measurable else None,
                           "branched_from_dense": bool(branch)}
    ternary = train(preset["ternary"], "bitnet-b158", args, []) if args.ternary else None
    t = eval_loss(ternary, None, args.eval_batches) if ternary else float("nan")
    first = by_start[starts[0]]
    result = {"preset": args.preset, "steps": args.steps, "global_batch": args.global_batch or "recipe",
              "eval_batches": args.eval_batches, "qat_start_step": starts[0], "dense": round(a, 4),
              f"{k}_rtn_ptq": round(b, 4), f"{k}_qat": first["qat"], f"{k}_recovered": first["recovered"],
              "qat_branched_from_dense": first["branched_from_dense"],
              "by_qat_start": by_start, "ternary_b158_qat": round(t, 4) if ternary else None}
    print(f"(a) dense                 eval loss {a:.4f}\n(b) {k} g32 RTN PTQ      eval loss {b:.4f}")
    for start, r in by_start.items():
        recovered = r["recovered"] if measurable else f"n/a (PTQ gap {b - a:+.4f} < {MIN_PTQ_GAP})"
        print(f"(c) {k} g32 QAT (LSQ) from step {start}: eval loss {r['qat']:.4f}   recovered (b-c)/(b-a) = {recovered}")
    print(f"(d) ternary b1.58 QAT     eval loss {t:.4f}   vs dense {t - a:+.4f}")
    return result


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync()
    return (time.perf_counter() - start) / steps


OVERHEAD_CONTENDERS = [
    ("dense", None),
    ("int4_g32_triton", {**RTN, "kernels": "triton"}),
    ("int4_g32_torch", {**RTN, "kernels": "torch"}),
    ("int4_g32_lsq", {**RTN, "estimator": "lsq", "calibrate": False}),  # the qat-int4 recipe's estimator
    ("nvfp4_triton", {"type": "qat", "weights": {"format": "nvfp4"}, "kernels": "triton"}),
    ("ternary_a8_triton", {"type": "qat", "weights": {"format": "ternary"}, "kernels": "triton",
                           "activations": {"format": "int", "bits": 8, "granularity": "token"}}),
]


def overhead(args: argparse.Namespace) -> dict:
    """Step time (forward, backward, AdamW; bf16) of a 12-layer 768-wide model on `--micro-batch` rows of 1024
    tokens: dense vs QAT, each eager or with `--compile` (every block compiled, as `train.compile` does).
    The fake-quant cost is per weight, so its share falls as tokens per step grow. Without CUDA: a
    2-layer smoke run on CPU (fp32, PyTorch kernels) that only checks the contenders run."""
    from slimtrain.modules.plugin_registry import build_plugins, validate_plugin_config
    from slimtrain.modules.transformer import ModelConfig, Transformer

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    cfg = ModelConfig(vocab_size=32768 if gpu else 512, hidden_size=768 if gpu else 64,
                      intermediate_size=2048 if gpu else 128, num_layers=12 if gpu else 2, num_heads=12 if gpu else 4,
                      num_kv_heads=4 if gpu else 2, max_seq_len=1024, attention="sdpa")
    ids = torch.randint(0, cfg.vocab_size, (args.micro_batch, 1024 if gpu else 64), device=device)
    out = {}
    for name, block in OVERHEAD_CONTENDERS:
        if not gpu and block and block.get("kernels") == "triton":
            block = {**block, "kernels": "torch"}
        torch.manual_seed(0)
        model = Transformer(cfg)
        plugins = build_plugins([validate_plugin_config(block)]) if block else []
        for p in plugins:
            p.apply(model)
            p.set_step(1)
        model.to(device, dtype)
        if args.compile:
            model.compile_blocks()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)

        def step():
            loss = torch.nn.functional.cross_entropy(model(ids).logits.float().flatten(0, 1), ids.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out[name] = _timed(step, args.timing_steps, 3 + 2 * args.compile) * 1000
        del model, opt
    base = out["dense"]
    print("\n".join(f"{k:20s} {v:8.1f} ms/step  ({v / base - 1:+.1%} vs dense)" for k, v in out.items()))
    return {"compile": args.compile, "device": torch.cuda.get_device_name() if gpu else "cpu",
            "step_ms": {k: round(v, 2) for k, v in out.items()},
            "overhead": {k: round(v / base - 1, 4) for k, v in out.items() if k != "dense"}}


def kernels(args: argparse.Namespace) -> dict:
    """Each kernel vs its PyTorch reference on a 4096 x 4096 bf16 weight: equality and time."""
    from slimtrain.modules.qat import kernels as k
    from slimtrain.modules.qat.config import QuantSpec
    from slimtrain.modules.qat.reference import fake_quant_reference

    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, block in [("int4_g32", {"format": "int", "bits": 4}), ("int4_g128_asym", {"format": "int", "bits": 4,
                        "group_size": 128, "symmetric": False}), ("mxfp4", {"format": "mxfp4"}),
                        ("nvfp4", {"format": "nvfp4"}), ("ternary", {"format": "ternary"})]:
        spec = QuantSpec(**block).check_role("weights", 4)
        y, tscale = k.fake_quant_forward(x, spec)
        ref, mask, _ = fake_quant_reference(x, spec)
        g = torch.randn_like(x)
        equal = torch.equal(y, ref) and torch.equal(k.fake_quant_backward(g, x, spec, tscale), g * mask)
        tk = _timed(lambda: k.fake_quant_forward(x, spec), 20, 3) * 1e3
        tr = _timed(lambda: fake_quant_reference(x, spec), 20, 3) * 1e3
        out[name] = {"equal": equal, "kernel_ms": round(tk, 3), "reference_ms": round(tr, 3), "speedup": round(tr / tk, 1)}
        print(f"{name:16s} equal={equal}  kernel {tk:.3f} ms  reference {tr:.3f} ms  ({tr / tk:.1f}x)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="quickstart")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps of every run (quickstart: 120)")
    parser.add_argument("--nproc", type=int, default=1 if torch.cuda.is_available() else 2,
                        help="training processes per run (1 GPU, or 2 CPU ranks)")
    parser.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8],
                        help="integer width of (b) and (c), groups of 32 (the target figure is int4)")
    parser.add_argument("--qat-start", type=int, nargs="+", default=None,
                        help="step(s) after which (c) fake-quantizes, one QAT run each, all branched from the one "
                        "dense run (default: 3/4 of --steps, as the QAT recipes)")
    parser.add_argument("--no-ternary", dest="ternary", action="store_false", help="skip the b1.58 run")
    parser.add_argument("--eval-batches", type=int, default=32, help="validation micro-batches of 8 rows")
    parser.add_argument("--global-batch", type=int, default=0,
                        help="rows of 256 tokens per step in the quality runs (default: the recipes' 16)")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-qat"))
    parser.add_argument("--overhead", action="store_true", help="GPU: QAT step-time overhead")
    parser.add_argument("--kernels", action="store_true", help="GPU: kernels vs references")
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--compile", action="store_true",
                        help="compile every block (train.compile): in --overhead timings and in the quality runs")
    parser.add_argument("--micro-batch", type=int, default=8, help="--overhead: rows of 1024 tokens per step")
    args = parser.parse_args()
    result = {}
    if args.kernels:
        result["kernels"] = kernels(args)
    if args.overhead:
        result.update({"micro_batch": args.micro_batch, **overhead(args)})
    if not (args.kernels or args.overhead):
        result = quality(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
