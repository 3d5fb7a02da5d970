"""DeepSpeed-Ulysses on the quickstart-shaped model: bytes each rank exchanges, step time and peak memory as the
sequence length and the ranks double together (DeepSpeed-Ulysses' claim: communication per rank stays constant).

    python benchmarks/sequence_parallel.py                   # 1, 2 and 4 ranks at 1024, 2048, 4096 tokens (CPU, gloo)
    python benchmarks/sequence_parallel.py --ranks 1 2 --base 2048
    python benchmarks/sequence_parallel.py --device cuda     # on a GPU machine (NCCL), one rank per GPU

Each configuration runs in its own `torchrun` with N ranks forming one sequence-parallel group: the model with its
sequence split over the ranks (the backend's `UlyssesShard`: DeepSpeed's `DistributedAttention`), one packed row of
N x `--base` tokens, forward and backward timed over `--steps` after a warm-up. Bytes are counted at
`torch.distributed.all_to_all_single` (every exchange DeepSpeed makes, forward and backward), per rank and step.
Memory: the peak CUDA allocation on a GPU; on a CPU the growth of the process's peak resident set during the timed
steps (coarse). Each line carries its ratio to the 1-rank run at `--base` tokens, and the same sequence on one rank
(what splitting it saves), both measured in the same invocation.
On a 2-core CPU 4 ranks share 2 cores: their times measure oversubscription, not Ulysses; the bytes do not depend on
it. Ends with one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One configuration, inside torchrun: print one JSON line on rank 0."""
    import torch
    import torch.distributed as dist

    from slimtrain.modules.transformer import Transformer
    from slimtrain.modules.transformer.config import ModelConfig

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    n = dist.get_world_size()
    seq = args.seq or args.base * n
    sent = _count_exchanges(dist)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=6, num_heads=4,
                      num_kv_heads=4, max_seq_len=seq, attention="sdpa")
    model = Transformer(cfg).to(device)
    if n > 1:
        from slimtrain.trainer.backends.deepspeed_ulysses import create_sequence_groups

        model.sequence_shard = create_sequence_groups(n)
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1)).to(device)
    lengths = [seq // 4, seq // 4 + 37, seq // 2 - 37]  # packed documents that cross the slice boundaries
    doc_ids = torch.cat([torch.full((k,), i) for i, k in enumerate(lengths)])[None].to(device)
    positions = torch.cat([torch.arange(k) for k in lengths])[None].to(device)

    def step() -> None:
        logits = model(ids, position_ids=positions, doc_ids=doc_ids).logits
        logits.float().logsumexp(-1).sum().backward()

    step()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sent["bytes"] = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024)
    row = torch.tensor([seconds, sent["bytes"] / args.steps, float(peak)], dtype=torch.float64)
    rows = [torch.zeros_like(row) for _ in range(n)]
    dist.all_gather(rows, row.to(device) if cuda else row)
    if dist.get_rank() == 0:
        worst = torch.stack([r.cpu() for r in rows]).max(0).values.tolist()
        print(json.dumps({"ranks": n, "seq_len": seq, "tokens_per_rank": seq // n, "step_s": worst[0],
                          "bytes_per_rank": worst[1], "peak_bytes_per_rank": worst[2]}))
    dist.destroy_process_group()


def _count_exchanges(dist) -> dict[str, int]:
    """Wrap `all_to_all_single` (DeepSpeed's exchanges go through it) to add the bytes each call sends."""
    counter = {"bytes": 0}
    original = dist.all_to_all_single

    def counted(output, input, *a, **k):
        counter["bytes"] += input.numel() * input.element_size()
        return original(output, input, *a, **k)

    dist.all_to_all_single = counted
    return counter


def run(ranks: int, args: argparse.Namespace, seq: int = 0) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", __file__, "--worker",
           f"--base={args.base}", f"--steps={args.steps}", f"--device={args.device}", f"--seq={seq}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{ranks} ranks failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--base", type=int, default=1024, help="tokens per rank (the sequence is ranks x base)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    lines = [run(n, args) for n in args.ranks]
    base = next((x for x in lines if x["ranks"] == 1), lines[0])
    for line in lines:
        # The same sequence on one rank: what the split saves in memory (and costs or saves in time).
        alone = line if line["ranks"] == 1 else run(1, args, seq=line["seq_len"])
        line.update(benchmark="sequence_parallel", device=args.device,
                    step_s_ratio=line["step_s"] / base["step_s"],
                    peak_ratio=line["peak_bytes_per_rank"] / max(base["peak_bytes_per_rank"], 1.0),
                    one_rank_same_seq_step_s=alone["step_s"], one_rank_same_seq_peak_bytes=alone["peak_bytes_per_rank"],
                    peak_vs_one_rank_same_seq=line["peak_bytes_per_rank"] / max(alone["peak_bytes_per_rank"], 1.0))
        print(json.dumps(line))


if __name__ == "__main__":
    main()
