"""The loss's fp32 cross-entropy, eager vs compiled (what `train.compile` adds to the loss), in one run.

Times forward + backward over [tokens, vocab] logits in the compute dtype and, on a GPU, the peak
memory each adds above the logits. Prints the ratio compiled/eager and one JSON line.

    python benchmarks/loss.py                        # 4096 x 32000, bf16 on GPU and on CPU
    python benchmarks/loss.py --tokens 8192 --vocab 128256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from slimtrain.trainer.loss.cross_entropy import compiled_cross_entropy_sum, fp32_cross_entropy_sum


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(fn, logits: torch.Tensor, labels: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds of forward + backward, and (CUDA) peak bytes per logit above the logits."""
    for _ in range(2):  # warm-up: compiles the compiled one
        logits.grad = None
        fn(logits, labels).backward()
    times = []
    for _ in range(reps):
        logits.grad = None
        _sync()
        t0 = time.perf_counter()
        fn(logits, labels).backward()
        _sync()
        times.append(time.perf_counter() - t0)
    out = {"seconds": statistics.median(times)}
    if logits.is_cuda:
        logits.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(logits, labels).backward()
        out["peak_bytes_per_logit"] = (torch.cuda.max_memory_allocated() - base) / logits.numel()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.tokens, args.vocab, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)
    labels[::7] = -100  # some ignored positions, as after padding or prompts
    eager = run(fp32_cross_entropy_sum, logits, labels, args.reps)
    compiled = run(compiled_cross_entropy_sum(), logits, labels, args.reps)
    speedup = eager["seconds"] / compiled["seconds"]
    print(f"eager    {eager['seconds'] * 1e3:9.1f} ms")
    print(f"compiled {compiled['seconds'] * 1e3:9.1f} ms   ({speedup:.2f}x eager)")
    if "peak_bytes_per_logit" in eager:
        print(f"peak above the logits: eager {eager['peak_bytes_per_logit']:.1f} B/logit, "
              f"compiled {compiled['peak_bytes_per_logit']:.1f}")
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "tokens": args.tokens, "vocab": args.vocab, "dtype": args.dtype,
                      "eager": eager, "compiled": compiled, "speedup": round(speedup, 3)}))


if __name__ == "__main__":
    main()
