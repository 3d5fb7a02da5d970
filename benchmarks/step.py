"""Training-step throughput: slimtrain (model + DeepSpeed backend + loss) vs a plain PyTorch loop over
transformers' LlamaForCausalLM with the same config, data, optimizer and precision, in one process.

    python benchmarks/step.py                      # CPU preset
    python benchmarks/step.py --preset 1b          # ~1B model, seq 4096, bf16 (GPU)
    python benchmarks/step.py --accum 8            # 8 micro-batches per optimizer step (a real global batch)

Contenders are timed in alternating rounds (median round each). Prints tokens/s of both, the
ratio ours/baseline and MFU (GPU), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

PRESETS = {
    "cpu": dict(model=dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2,
                           vocab_size=8192), seq=256, micro=8),
    "1b": dict(model=dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                          vocab_size=32000), seq=4096, micro=2),
}


def _init_dist() -> None:
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def _batches(vocab: int, micro: int, seq: int, n: int, device: torch.device, doc_len: int = 0):
    """`n` micro-batches of random tokens: one document per row, or documents of mean `doc_len` packed."""
    from attention import packed_doc_ids

    from slimtrain.data.batch import Batch

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (micro, seq + 1), generator=g)
        docs = packed_doc_ids(micro, seq, doc_len, seed=i) if doc_len else torch.zeros(micro, seq, dtype=torch.long)
        idx = torch.arange(seq).expand(micro, seq)
        starts = torch.ones_like(docs, dtype=torch.bool)
        starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
        pos = idx - torch.where(starts, idx, 0).cummax(1).values  # positions restart in every document
        out.append(Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), pos.contiguous(), docs).to(device))
    return out


def _model(cfg, attention: str, compile_blocks: bool, recompute: bool):
    from slimtrain.modules.transformer import Transformer

    model = Transformer(cfg.model_copy(update={"attention": attention}))
    model.set_activation_checkpointing(recompute)
    if compile_blocks:
        model.compile_blocks()
    return model


def make_ours(cfg, device: torch.device, micro: int, bf16: bool, attention: str, zero: int, compile_blocks: bool = False,
              recompute: bool = False, loss_chunk: int = 0, accum: int = 1):
    """Our step: Transformer + DeepSpeed (ZeRO-`zero`) + fp32-upcast CE, one rank, `accum` micro-batches per
    optimizer step (`train.compile`, `train.activation_checkpointing` and `train.loss_chunk_tokens` as the
    flags say)."""
    from slimtrain.trainer.backends.deepspeed import DeepSpeedBackend
    from slimtrain.trainer.recipe.schema import DeepSpeedConfig, OptimConfig, TrainConfig
    from slimtrain.trainer.loss.lm import make_loss_fn
    from slimtrain.trainer.optim import build_optimizer, build_scheduler

    model = _model(cfg, attention, compile_blocks, recompute)
    optim_cfg = OptimConfig(lr=1e-4)
    backend = DeepSpeedBackend(DeepSpeedConfig(zero_stage=zero, precision="bf16" if bf16 else "fp32"),
                               TrainConfig(global_batch_size=micro * accum, micro_batch_size=micro), optim_cfg)
    model.to(backend.device)
    opt = build_optimizer(model, optim_cfg)
    backend.setup(model, opt, build_scheduler(opt, optim_cfg.schedule, 10**6))
    loss_fn = make_loss_fn((), loss_chunk)
    return lambda micro_batches: backend.train_step(micro_batches, loss_fn)


def make_plain_ours(cfg, device: torch.device, bf16: bool, attention: str, compile_blocks: bool = False,
                    recompute: bool = False):
    """Our model inside the baseline's plain loop: separates model speed from engine overhead."""
    model = _model(cfg, attention, compile_blocks, recompute).to(device)
    return _plain_step(model, device, bf16,
                       lambda m, b: m(b.input_ids, position_ids=b.position_ids, doc_ids=b.attention_documents).logits)


def make_hf(cfg, device: torch.device, bf16: bool):
    """The plain loop: LlamaForCausalLM (sdpa) + torch AdamW + clipping.

    bf16 is the usual mixed precision of a plain loop: fp32 weights and optimizer, bf16 autocast,
    the same numerics as our DeepSpeed bf16 step (bf16 compute, fp32 master weights).
    """
    from transformers import LlamaForCausalLM

    from slimtrain.modules.transformer.hf_llama import hf_config

    hf_cfg = hf_config(cfg, bos_id=None, eos_id=0)
    hf_cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf_cfg).to(device)
    return _plain_step(model, device, bf16, lambda m, b: m(input_ids=b.input_ids, position_ids=b.position_ids).logits)


def _plain_step(model, device: torch.device, bf16: bool, forward):
    # torch's fused AdamW (CUDA and CPU), as our backend uses: the contenders differ in the step, not the kernel.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(micro_batches) -> None:
        for b in micro_batches:  # gradient accumulation: the mean over the micro-batches
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = forward(model, b)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b.labels.flatten())
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(steps: dict, batches, rounds: int, per_round: int, warmup: int) -> dict[str, float]:
    """Tokens/s of each step function: warm up, then alternate rounds between them and take each one's
    median round, so that load changes on a shared machine hit every contender alike."""
    for fn in steps.values():
        for i in range(warmup):
            fn(batches[i % len(batches)])
    rates: dict[str, list[float]] = {name: [] for name in steps}
    tokens = per_round * sum(b.input_ids.numel() for b in batches[0])
    for _ in range(rounds):
        for name, fn in steps.items():
            _sync()
            t0 = time.perf_counter()
            for i in range(per_round):
                fn(batches[i % len(batches)])
            _sync()
            rates[name].append(tokens / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def profile(steps: dict, batches, n: int = 3) -> dict[str, dict[str, float]]:
    """torch.profiler tables (top 25 ops by self device time, or CPU time without CUDA) of `n` steps of each
    contender, then their time side by side by kind of work (`profile_kinds`): where the time of one goes
    and not the other's. Returns seconds per kind per contender."""
    from profile_kinds import format_kinds, time_by_kind
    from torch.profiler import ProfilerActivity, profile as run_profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    kinds = {}
    for name, fn in steps.items():
        with run_profiler(activities=activities) as prof:
            for i in range(n):
                fn(batches[i % len(batches)])
            _sync()
        print(f"\n=== {name}: {n} steps ===\n{prof.key_averages().table(sort_by=key, row_limit=25)}")
        kinds[name] = time_by_kind(prof)
    print(f"\n=== seconds by kind of work, {n} steps ===\n{format_kinds(kinds)}")
    return kinds


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    from slimtrain.modules.transformer import ModelConfig
    from slimtrain.trainer.logging import Throughput

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="1b" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per contender")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--attention", default="auto")
    p.add_argument("--doc-len", type=int, default=0,
                   help="pack rows with documents of this mean length (ours masks across them; the baseline, "
                   "transformers' default forward, attends across them); 0: one document per row, the same work "
                   "for both. MFU still counts full causal attention: with documents it is nominal for ours")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--micro", type=int, default=None)
    p.add_argument("--accum", type=int, default=1,
                   help="micro-batches per optimizer step, both contenders (real pretraining batches on one GPU "
                   "are many micro-batches: the optimizer step is paid once per global batch)")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage of our DeepSpeed step")
    p.add_argument("--plain", action="store_true", help="also time our model in the baseline's plain loop")
    p.add_argument("--compile", action="store_true", help="ours with train.compile (torch.compile of each block)")
    p.add_argument("--ac", action="store_true", help="ours with train.activation_checkpointing")
    p.add_argument("--loss-chunk", type=int, default=0, help="ours with train.loss_chunk_tokens=N")
    p.add_argument("--profile", action="store_true", help="after timing, print a profiler table per contender")
    args = p.parse_args()
    preset = PRESETS[args.preset]
    seq, micro = args.seq or preset["seq"], args.micro or preset["micro"]
    cfg = ModelConfig(max_seq_len=seq, **preset["model"])
    gpu = torch.cuda.is_available()
    per_round = args.steps or (5 if gpu else 2)
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    _init_dist()
    device = torch.device("cuda" if gpu else "cpu")
    flat = _batches(cfg.vocab_size, micro, seq, 4 * args.accum, device, args.doc_len)
    batches = [flat[i * args.accum:(i + 1) * args.accum] for i in range(4)]  # 4 optimizer steps' worth
    steps = {"hf": make_hf(cfg, device, bf16=gpu),
             "ours": make_ours(cfg, device, micro, gpu, args.attention, args.zero, args.compile, args.ac,
                             args.loss_chunk, args.accum)}
    if args.plain:
        steps["ours_plain"] = make_plain_ours(cfg, device, gpu, args.attention, args.compile, args.ac)
    rates = measure(steps, batches, args.rounds, per_round, args.warmup)
    kinds = profile(steps, batches) if args.profile else None
    hf_tps, ours_tps, plain_tps = rates["hf"], rates["ours"], rates.get("ours_plain")
    peak = Throughput(cfg.flops_per_token(seq)).peak
    fpt, fpt_palm = cfg.flops_per_token(seq), cfg.flops_per_token(seq, causal=False)
    result = {
        "device": torch.cuda.get_device_name() if gpu else "cpu", "preset": args.preset, "params": cfg.num_params(),
        "seq": seq, "micro": micro, "accum": args.accum, "precision": "bf16" if gpu else "fp32", "attention": args.attention,
        "doc_len": args.doc_len,
        "mfu_attention_counted": "full causal rows" + (" (nominal for ours: documents are masked)" if args.doc_len else ""),
        "ours_tokens_per_s": round(ours_tps, 1), "hf_tokens_per_s": round(hf_tps, 1),
        "ratio": round(ours_tps / hf_tps, 3), "zero_stage": args.zero, "compile": args.compile,
        "activation_checkpointing": args.ac,
        "loss_chunk_tokens": args.loss_chunk,
        "ours_model_in_plain_loop_tokens_per_s": round(plain_tps, 1) if plain_tps else None,
        "ours_mfu": round(ours_tps * fpt / peak, 4) if peak else None,
        "hf_mfu": round(hf_tps * fpt / peak, 4) if peak else None,
        "ours_mfu_palm": round(ours_tps * fpt_palm / peak, 4) if peak else None,
        "hf_mfu_palm": round(hf_tps * fpt_palm / peak, 4) if peak else None,
        "profile_seconds_by_kind": {n: {k: round(v, 4) for k, v in d.items()} for n, d in kinds.items()} if kinds else None,
    }
    # MFU counts the causal half of attention; "PaLM MFU" whole rows, as torchtitan and nanoGPT report it.
    print(f"{'':10} {'tokens/s':>12} {'MFU':>8} {'PaLM MFU':>9}")
    for who in ("ours", "hf"):
        mfus = [result[f"{who}_mfu"], result[f"{who}_mfu_palm"]]
        cells = "".join(f" {m:8.1%}" if m is not None else "" for m in mfus)
        print(f"{who:10} {result[f'{who}_tokens_per_s']:12,.0f}{cells}")
    print(f"ratio ours/hf: {result['ratio']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
