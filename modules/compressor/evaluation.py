"""What the compressor is measured by at every evaluation, on the held-out examples (plugins.md (a.6)).

On the same continuation tokens (each example's tokens 1 .. t-1), the decoder's loss
    loss_none     without the context (the continuation alone, after its uncompressed prefix if any),
    loss_full     reading the context tokens themselves (the original row, context and continuation one document),
    loss_comp     reading the compressed vectors,
and the controls loss_zeroed (vectors set to 0) and loss_shuffled (vectors permuted across the batch), which a
compressor that works leaves near loss_none. gap_closed = (loss_none - loss_comp) / (loss_none - loss_full);
ppl_* = exp(loss_*) (natural log). Reconstruction: rec_acc, the teacher-forced top-1 accuracy of the decoder
rewriting the context after <Rec>; rec_exact, the share of `exact_match` held-out spans per rank it rewrites
greedily, token for token.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slimtrain.modules.plugin import PluginContext
from slimtrain.modules.transformer.io import ModelInputs

from .compressor import MAIN
from .projector import REC

LOSSES = ("none", "full", "comp", "zeroed", "shuffled")


def evaluate_compressor(ctx: PluginContext, batches: Iterable[Any], exact_match: int, task_vectors: bool = True,
                        decoder: nn.Module | None = None, projector: str = MAIN,
                        longest: int = 64) -> dict[str, float]:
    """The metrics above for the run's own decoder, or for `decoder` (an extra one) through its `projector`;
    `longest`: the longest reconstruction target (context_tokens)."""
    from .plugin import compress_batch, decoder_inputs

    model, sums, held = ctx.model, torch.zeros(len(LOSSES) + 3, dtype=torch.float64), []
    reader = model if decoder is None else decoder
    for batch in batches:
        extras = batch.extras
        base = ModelInputs.of(batch)
        compressed = compress_batch(model, batch, task_vectors, projector)
        vectors = compressed.vectors
        shuffled = vectors[torch.randperm(vectors.shape[0], generator=torch.Generator().manual_seed(0))
                           .to(vectors.device)]
        none = replace(base, input_ids=extras["none_ids"], position_ids=extras["none_pos"], doc_ids=extras["none_doc"],
                       splice=None)
        full = replace(base, position_ids=extras["full_pos"], doc_ids=extras["full_doc"], splice=None)
        rows = [(none, torch.roll(extras["none_ids"], -1, dims=1), extras["gap_none"]),
                (full, torch.roll(batch.input_ids, -1, dims=1), extras["gap_full"])]
        rows += [(decoder_inputs(base, batch, v), batch.labels, extras["gap_dec"])
                 for v in (vectors, torch.zeros_like(vectors), shuffled)]
        for i, (inputs, targets, mask) in enumerate(rows):
            logits = reader(**inputs.model_kwargs()).logits
            sums[i] += _token_loss(logits, targets, mask).sum().double().cpu()
            if i == 2:
                sums[len(LOSSES) + 1] += _correct(logits, batch.labels, extras["rec_dec"]).double().cpu()
                sums[len(LOSSES) + 2] += extras["rec_dec"].sum().double().cpu()
        sums[len(LOSSES)] += extras["gap_dec"].sum().double().cpu()
        if len(held) < exact_match:
            held.extend(_reconstructions(batch, compressed, exact_match - len(held)))
    total = ctx.comm.all_reduce(sums.to(ctx.device), group="data").cpu()
    tokens = float(total[len(LOSSES)])
    out = {f"loss_{name}": float(total[i]) / max(tokens, 1) for i, name in enumerate(LOSSES)}
    out.update({f"ppl_{name}": math.exp(min(out[f"loss_{name}"], 50.0)) for name in ("none", "full", "comp")})
    gap = out["loss_none"] - out["loss_full"]
    # Meaningful once the context helps (loss_none > loss_full); nan when it changes nothing at all.
    out["gap_closed"] = (out["loss_none"] - out["loss_comp"]) / gap if gap != 0 else float("nan")
    out["rec_acc"] = float(total[len(LOSSES) + 1] / total[len(LOSSES) + 2].clamp(min=1))
    if exact_match:
        matches = _greedy_matches(reader, held, exact_match, longest)
        counts = torch.tensor([sum(matches), len(matches)], dtype=torch.float64)
        counts = ctx.comm.all_reduce(counts.to(ctx.device), group="data").cpu()
        out["rec_exact"] = float(counts[0] / counts[1].clamp(min=1))
    return out


def _token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[mask].float(), targets[mask], reduction="none")


def _correct(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (logits[mask].argmax(-1) == targets[mask]).sum()


def _reconstructions(batch: Any, compressed, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(vectors, context tokens) of up to `limit` reconstruction examples of `batch`."""
    spans, ends = compressed.spans, compressed.counts.cumsum(0)
    tasks = batch.extras["ctx_task"][spans.rows, spans.starts]
    found = []
    for i in (tasks == REC).nonzero().flatten().tolist()[:limit]:
        vectors = compressed.vectors[int(ends[i] - compressed.counts[i]):int(ends[i])].detach()
        found.append((vectors, spans.tokens[i, : int(spans.lengths[i])]))
    return found


@torch.no_grad()
def _greedy_matches(model: nn.Module, held: list[tuple[torch.Tensor, torch.Tensor]], count: int,
                    steps: int) -> list[bool]:
    """Whether greedy decoding after each held example's vectors rewrites its context exactly. Every rank runs
    `count` decodes of `steps` tokens whatever it holds (cycling its examples, or decoding a stand-in it does not
    count when it holds none): an engine that shards parameters (ZeRO-3) needs every forward on every rank."""
    stand_in = [(torch.zeros(1, model.embed.weight.shape[1], device=model.embed.weight.device), None)]
    cycle, found = held or stand_in, []
    for i in range(count):
        vectors, target = cycle[i % len(cycle)]
        got = greedy_after(model, vectors, steps)
        if held and i < len(held):
            found.append(bool(torch.equal(got[: target.numel()], target)))
    return found


def greedy_after(model: nn.Module, vectors: torch.Tensor, steps: int) -> torch.Tensor:
    """The decoder's greedy continuation of `vectors` [k, H] (embeddings read as a prompt), `steps` tokens."""
    embeds, out = vectors.to(model.embed.weight.dtype)[None], []
    for _ in range(steps):
        token = model(inputs_embeds=embeds).logits[0, -1].argmax()
        out.append(token)
        embeds = torch.cat([embeds, model.embed(token.view(1, 1))], dim=1)
    return torch.stack(out)
