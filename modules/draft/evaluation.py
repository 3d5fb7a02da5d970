"""The draft plugin's evaluation: top-1 accuracy per draft position on held-out batches, and acceptance per
position and tau from speculative decoding of held-out prompts (every rank decodes the same number of
rounds, so that sharded engines run the same forwards on every rank)."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from slimtrain.modules.plugin import PluginContext

from .base import BaseView
from .losses import position_result
from .speculate import SpeculativeDecoder


def base_view(model: nn.Module, outputs: Any, batch: Any) -> BaseView:
    """What the heads read of one training forward of `batch`."""
    return BaseView(model=model, input_ids=batch.input_ids, doc_ids=batch.doc_ids, position_ids=batch.position_ids,
                    documents=batch.attention_documents, hidden=outputs.hidden_states, last_hidden=outputs.last_hidden,
                    layer_hidden=outputs.layer_hidden)


def evaluate_heads(heads: dict[str, nn.Module], ctx: PluginContext, batches: Iterable[Any], self_distill: bool,
                   prompts: int, prompt_tokens: int, rounds: int) -> dict[str, float]:
    """`<kind>/acc<k>` for every head and draft position; with `prompts`, `<kind>/tau` and `<kind>/accept<k>`."""
    model, sums, held = ctx.model, {}, []
    for batch in batches:
        outputs = model(**ctx.inputs(batch).model_kwargs())
        view = base_view(model, outputs, batch)
        for kind, head in heads.items():
            for out in head.draft_outputs(view):
                r = position_result(out, view, batch.labels, self_distill)
                key = f"{kind}/acc{out.offset}"
                sums[key] = sums.get(key, torch.zeros(2, dtype=torch.float64)) + torch.stack(
                    [r.correct.double().cpu(), r.count.double().cpu()])
        if len(held) < prompts:
            held.extend(_first_document(ids, docs, prompt_tokens)
                        for ids, docs in zip(batch.input_ids[: prompts - len(held)], batch.doc_ids))
    results = {}
    for key in sorted(sums):
        total = ctx.comm.all_reduce(sums[key].to(ctx.device), group="data").cpu()
        results[key] = float(total[0] / total[1].clamp(min=1))
    if prompts:
        results.update(_acceptance(heads, ctx, _cycled(held, prompts), rounds))
    return results


def _first_document(ids: torch.Tensor, doc_ids: torch.Tensor, limit: int) -> torch.Tensor:
    """The first `limit` tokens of a row's first document (fewer when the document is shorter)."""
    length = int((doc_ids == doc_ids[0]).cumprod(0).sum())
    return ids[: max(1, min(length, limit))]


def _cycled(rows: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """`n` prompts from `rows`, repeating them when the held-out pass held fewer rows on this rank."""
    if not rows:
        raise ValueError("the evaluation had no held-out batch on this rank to take draft prompts from")
    return [rows[i % len(rows)] for i in range(n)]


def _acceptance(heads: dict[str, nn.Module], ctx: PluginContext, prompts: list[torch.Tensor],
                rounds: int) -> dict[str, float]:
    results = {}
    for kind, head in heads.items():
        totals = torch.zeros(4 + head.positions, dtype=torch.float64)
        for prompt in prompts:
            decoder = SpeculativeDecoder(ctx.model, head.drafter(ctx.model), draft_tokens=head.positions,
                                         hidden_layers=getattr(head, "hidden_layers", ()))
            out, stats = decoder.generate(prompt[None], rounds=rounds)
            agree, new = greedy_agreement(ctx.model, prompt.numel(), out)
            totals += torch.tensor([agree, new, stats.rounds, stats.tokens, *stats.accepted], dtype=torch.float64)
        totals = ctx.comm.all_reduce(totals.to(ctx.device), group="data").cpu()
        results[f"{kind}/greedy_match"] = float(totals[0] / totals[1].clamp(min=1))
        results[f"{kind}/tau"] = float(totals[3] / totals[2])
        results.update({f"{kind}/accept{j + 1}": float(a / totals[2]) for j, a in enumerate(totals[4:])})
    return results


def greedy_agreement(model: nn.Module, prompt_len: int, output: torch.Tensor) -> tuple[int, int]:
    """How many of the tokens speculative decoding added after the prompt are the model's own greedy choice given
    every token before them, and how many it added. One teacher-forced forward of the whole output checks them
    all (the same forwards on every rank), so equal counts mean the speculation was lossless."""
    logits = model(output[:, :-1]).logits[0, prompt_len - 1:]
    new = output[0, prompt_len:]
    return int((logits.argmax(-1) == new).sum()), int(new.numel())
