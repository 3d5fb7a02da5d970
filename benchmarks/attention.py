"""Attention backends side by side: forward + backward of one layer's attention on packed rows.

The baseline, measured in the same run, is SDPA's fused causal kernel on rows of one document each
(what a plain loop without document masking runs). Each backend is timed on two layouts: one document
per row (sdpa, flex and varlen then take SDPA's causal kernel too, flash its own dense one) and rows packed with documents
of random lengths (mean `--doc-len`), where the document mask removes work. TFLOP/s counts only the
work the mask leaves: 4·n²/2·H·D per document of n tokens forward, 2.5 times that backward.

    python benchmarks/attention.py                    # CPU preset: eager and sdpa
    python benchmarks/attention.py --preset 1b        # the 1B model's shapes, bf16 (GPU)

Prints a table (ms per forward+backward, TFLOP/s, ratio to the baseline, and apart from those the ms
to build the mask, which a model pays once per forward for all its layers) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch

PRESETS = {
    "cpu": dict(batch=2, seq=512, heads=8, kv_heads=2, head_dim=32, doc_len=128),
    "1b": dict(batch=2, seq=4096, heads=32, kv_heads=4, head_dim=64, doc_len=1024),
}
GPU_BACKENDS = ("sdpa", "flex", "varlen", "flash")
CPU_BACKENDS = ("eager", "sdpa")  # flex has no backward on CPU


def packed_doc_ids(batch: int, seq: int, mean_len: int, seed: int = 0) -> torch.Tensor:
    """[batch, seq] doc ids: documents of exponential lengths (mean `mean_len`, at least 1) cut to fit
    the row, as a greedy packer leaves them; a document may continue on no other row."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < seq:
            n = max(1, int(torch.empty(1).exponential_(1 / mean_len, generator=gen)))
            ids.extend([doc] * min(n, seq - len(ids)))
            doc += 1
        rows.append(ids)
    return torch.tensor(rows)


def masked_flops(doc_ids: torch.Tensor, heads: int, head_dim: int) -> float:
    """Forward + backward FLOPs of causal attention within each document of `doc_ids`."""
    from slimtrain.core.masks import segment_lengths

    n = segment_lengths(doc_ids).double()
    forward = float((4 * n * (n + 1) / 2).sum()) * heads * head_dim
    return 3.5 * forward


def _timed(fn: Callable[[], None], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _available(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `name` can run here, else why not."""
    from slimtrain.modules.transformer.attention import check_backend

    try:
        check_backend(name)
    except RuntimeError as err:
        return str(err).split(";")[0]
    if name in ("varlen", "flash") and (device.type != "cuda" or dtype == torch.float32):
        return "CUDA bf16/fp16 only"
    return None


def time_backend(name: str, doc_ids: torch.Tensor, shape: dict, dtype: torch.dtype, reps: int, warmup: int) -> float:
    """Median seconds of one forward + backward of `name` on q, k, v shaped like one layer's."""
    from slimtrain.modules.transformer.attention import bind_attention

    device = doc_ids.device
    b, s = doc_ids.shape
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, s, shape["heads"], shape["head_dim"], device=device, dtype=dtype, generator=gen)
    k, v = (torch.randn(b, s, shape["kv_heads"], shape["head_dim"], device=device, dtype=dtype, generator=gen)
            for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_(True)
    grad = torch.randn_like(q)

    bound = bind_attention(name, doc_ids, s, device, dtype)  # once per model forward, shared by all layers
    return _timed(lambda: bound(q, k, v).backward(grad), reps, warmup)


def time_mask(name: str, doc_ids: torch.Tensor, device: torch.device, reps: int, warmup: int,
              on_host: bool = False) -> float:
    """Median seconds to build `name`'s mask structure from CPU `doc_ids`: paid once per forward, not per
    layer. on_host: the trainer's way (`Batch.to`), the layout found on the CPU and moved with the
    ids; else the ids are moved first and the backend asks the device. Timed with an idle GPU queue, so
    the device-asking column counts its round trips, not the wait behind queued work a training step adds."""
    from slimtrain.core.documents import Documents
    from slimtrain.modules.transformer.attention import bind_attention

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = doc_ids.shape[1]
    layout = (lambda: Documents.checked_on_host(doc_ids).to(device)) if on_host else (
        lambda: doc_ids.to(device, non_blocking=True))
    return _timed(lambda: bind_attention(name, layout(), s, device, dtype), reps, warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b" if gpu else "cpu")
    p.add_argument("--doc-len", type=int, default=None, help="mean document length of the packed layout")
    p.add_argument("--backends", nargs="*", default=None, help="backends to time (default: all that run here)")
    p.add_argument("--reps", type=int, default=20 if gpu else 5)
    p.add_argument("--warmup", type=int, default=5 if gpu else 1)
    args = p.parse_args()
    shape = dict(PRESETS[args.preset])
    doc_len = args.doc_len or shape.pop("doc_len")
    shape.pop("doc_len", None)
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    layouts = {
        "one_doc_per_row": torch.zeros(shape["batch"], shape["seq"], dtype=torch.long),
        f"packed_mean_{doc_len}": packed_doc_ids(shape["batch"], shape["seq"], doc_len),
    }
    base_s = time_backend("sdpa", layouts["one_doc_per_row"].to(device), shape, dtype, args.reps, args.warmup)
    rows, skipped = [], {}
    for name in args.backends or (GPU_BACKENDS if gpu else CPU_BACKENDS):
        why = _available(name, device, dtype)
        if why:
            skipped[name] = why
            continue
        for layout, doc_ids in layouts.items():
            secs = time_backend(name, doc_ids.to(device), shape, dtype, args.reps, args.warmup)
            tflops = masked_flops(doc_ids, shape["heads"], shape["head_dim"]) / secs / 1e12
            mask_s = time_mask(name, doc_ids, device, args.reps, args.warmup)
            host_s = time_mask(name, doc_ids, device, args.reps, args.warmup, on_host=True)
            rows.append(dict(backend=name, layout=layout, ms=round(secs * 1e3, 3), tflops=round(tflops, 4),
                             speedup_vs_causal_sdpa=round(base_s / secs, 3), mask_ms_per_forward=round(mask_s * 1e3, 3),
                             host_mask_ms_per_forward=round(host_s * 1e3, 3)))
    print(f"{'backend':8} {'layout':20} {'ms':>9} {'TFLOP/s':>9} {'vs causal sdpa':>15} {'mask ms/forward':>16} "
          f"{'(host-checked)':>15}")
    for r in rows:
        print(f"{r['backend']:8} {r['layout']:20} {r['ms']:9.3f} {r['tflops']:9.4f} {r['speedup_vs_causal_sdpa']:14.2f}x "
              f"{r['mask_ms_per_forward']:16.3f} {r['host_mask_ms_per_forward']:15.3f}")
    for name, why in skipped.items():
        print(f"{name:8} skipped: {why}")
    print(json.dumps({"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
                      "dtype": str(dtype).removeprefix("torch."), **shape, "doc_len": doc_len,
                      "baseline_ms": round(base_s * 1e3, 3), "rows": rows, "skipped": skipped}))


if __name__ == "__main__":
    main()
