"""Does `slimtrain validate --world-size 1`'s memory estimate hold? One GPU, a recipe's model, micro-batch,
precision, ZeRO stage, activation checkpointing and loss chunking: a few optimizer steps of our real step
(model + DeepSpeed backend + loss) on random tokens, then torch.cuda.max_memory_allocated against the
estimate, part by part where a part can be measured on its own.

    python benchmarks/memory.py                                   # recipes/llama-1b-dense.yaml (GPU)
    python benchmarks/memory.py recipes/llama-1b-dense.yaml train.loss_chunk_tokens=4096
    python benchmarks/memory.py recipes/tiny-cpu.yaml             # CPU: the estimate only (smoke)

Ends with one JSON line. The estimate's 2 GB reserve (CUDA context, NCCL, allocator slack) is not in what
the allocator counts, so the comparison is against the estimate without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import _batches, _init_dist  # noqa: E402  (benchmarks/ is not a package)

GB = 1024**3


def build_step(recipe, vocab: int, accum: int, device: torch.device):
    """Our step of `recipe` on one rank with `accum` micro-batches per optimizer step: (step function, model)."""
    from slimtrain.modules.transformer import Transformer
    from slimtrain.trainer.backends.deepspeed import DeepSpeedBackend
    from slimtrain.trainer.loss.lm import make_loss_fn
    from slimtrain.trainer.optim import build_optimizer, build_scheduler

    t = recipe.train.model_copy(update={"global_batch_size": recipe.train.micro_batch_size * accum})
    model = Transformer(recipe.model.model_copy(update={"vocab_size": vocab}))
    model.set_activation_checkpointing(t.activation_checkpointing)
    if t.compile:
        model.compile_blocks()
    backend = DeepSpeedBackend(recipe.backend, t, recipe.optim)
    model.to(backend.device)
    opt = build_optimizer(model, recipe.optim)
    backend.setup(model, opt, build_scheduler(opt, recipe.optim.schedule, t.steps))
    loss_fn = make_loss_fn((), t.loss_chunk_tokens)
    batches = _batches(vocab, t.micro_batch_size, recipe.data.seq_len, accum, device)
    return (lambda: backend.train_step(batches, loss_fn)), model


def main() -> None:
    from slimtrain.trainer.errors import RecipeError
    from slimtrain.trainer.env.memory import estimate, resolve_vocab_size
    from slimtrain.trainer.recipe.loading import load_recipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default=str(REPO / "recipes" / "llama-1b-dense.yaml"))
    p.add_argument("overrides", nargs="*", help="key.sub=value, as on the slimtrain command line")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps before reading the peak")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step (the peak does not grow "
                   "with more: gradients accumulate in place)")
    p.add_argument("--vocab", type=int, default=32000, help="model.vocab_size where the recipe leaves it null")
    args = p.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    try:
        vocab = resolve_vocab_size(recipe)  # as `slimtrain validate` does
    except RecipeError:  # a tokenizer directory that is not on this machine
        vocab = args.vocab
    est = estimate(recipe, 1, vocab)
    result = {"recipe": Path(args.recipe).name, "overrides": args.overrides, "params": est.params,
              "estimate_gb": {k: round(v / GB, 2) for k, v in {
                  "model_states": est.model_states, "of_which_step_only": est.step_only,
                  "activations": est.activations, "logits": est.logits, "grad_bucket": est.buckets,
                  "backward_peak": est.backward_peak, "total_without_reserve": est.total - est.reserve}.items()}}
    gpu = torch.cuda.is_available()
    if gpu:
        _init_dist()
        device = torch.device("cuda")
        step, model = build_step(recipe, vocab, args.accum, device)
        torch.cuda.synchronize()
        after_setup = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()  # the training steps' peak, not the set-up's
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        steady = torch.cuda.memory_allocated()
        measured = {"after_setup": after_setup / GB, "after_steps": steady / GB, "peak": peak / GB,
                    "peak_minus_states": (peak - steady) / GB}
        result["measured_gb"] = {k: round(v, 2) for k, v in measured.items()}
        result["peak_over_estimate"] = round(peak / (est.total - est.reserve), 3)
        result["device"] = torch.cuda.get_device_name()
        print(f"after setup {after_setup / GB:7.2f} GB   between steps {steady / GB:7.2f} GB")
        print(f"peak allocated {peak / GB:7.2f} GB   estimate without reserve {(est.total - est.reserve) / GB:7.2f} GB"
              f"   ratio {result['peak_over_estimate']:.3f}")
    else:
        print(f"no CUDA: estimate only, {(est.total - est.reserve) / GB:.2f} GB without the reserve")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
