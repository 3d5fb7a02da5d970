"""Each draft position's loss and top-1 accuracy, on the positions whose target stays in their document."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slimtrain.core.sentinels import IGNORE_INDEX

from .base import BaseView, DraftOutput
from .targets import shift_left, shifted_labels


class PositionResult(NamedTuple):
    """loss: mean over the valid positions (0 with none, still in the graph); correct / count: top-1 hits and
    valid positions (what the accuracy is summed from over batches and ranks)."""

    loss: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor


CHUNK_TOKENS = 2048
"""Positions whose logits one chunk holds: a head's [tokens, vocab] logits are never whole (with more positions,
each chunk is recomputed in the backward instead of kept: a 1B model's micro-batch of 8k tokens over a 32k
vocabulary would hold 1 GB of fp32 logits per draft position)."""


def position_result(out: DraftOutput, base: BaseView, labels: torch.Tensor, self_distill: bool,
                    chunk: int = CHUNK_TOKENS) -> PositionResult:
    """Offset `out.offset`'s loss against the data's labels or, with `self_distill`, against the base model's own
    distribution at the position it drafts (restricted to the draft vocabulary for a head that has one); top-1
    accuracy against the same target (the label, or the base's argmax: what greedy verification accepts)."""
    targets = shifted_labels(labels, base.doc_ids, out.offset)
    valid = targets != IGNORE_INDEX
    features, wanted = out.features[valid], targets[valid]
    teacher = shift_left(base.hidden.detach(), out.offset)[valid] if self_distill else None
    index = None if out.vocab is None else _draft_index(out.vocab, int(base.model.cfg.vocab_size))

    def piece(f: torch.Tensor, w: torch.Tensor, t: torch.Tensor | None):
        return _chunk(out, base, f, w, t, index)

    sums, correct, count = [], 0, 0
    for i in range(0, len(features), chunk):
        args = (features[i:i + chunk], wanted[i:i + chunk], None if teacher is None else teacher[i:i + chunk])
        if len(features) > chunk and torch.is_grad_enabled():
            s, c, n = checkpoint(piece, *args, use_reentrant=False)
        else:
            s, c, n = piece(*args)
        sums.append(s)
        correct, count = correct + c, count + n
    if not sums:
        return PositionResult(features.sum() * 0.0, torch.zeros((), device=features.device, dtype=torch.long),
                              torch.zeros((), device=features.device, dtype=torch.long))
    return PositionResult(torch.stack(sums).sum() / max(int(count), 1), correct, count)


def _chunk(out: DraftOutput, base: BaseView, features: torch.Tensor, wanted: torch.Tensor,
           teacher_hidden: torch.Tensor | None, index: torch.Tensor | None):
    """(summed loss, top-1 hits, positions that count) of one chunk of valid positions."""
    if teacher_hidden is not None:
        with torch.no_grad():
            teacher = base.model.lm_head(teacher_hidden).float()
            if index is not None:  # EAGLE-3: positions whose base argmax lies outside the draft vocabulary learn nothing
                keep = index[teacher.argmax(-1)] >= 0
                teacher, features = teacher[keep][:, out.vocab], features[keep]
            want = teacher.argmax(-1)
        logits = out.project(features).float()
        total = -(teacher.softmax(-1) * logits.log_softmax(-1)).sum()
    else:
        if index is not None:  # targets outside the draft vocabulary learn nothing
            drafted = index[wanted]
            features, wanted = features[drafted >= 0], drafted[drafted >= 0]
        want = wanted
        logits = out.project(features).float()
        total = F.cross_entropy(logits, want, reduction="sum")
    with torch.no_grad():
        hits = (logits.argmax(-1) == want).sum()
    return total, hits, torch.tensor(len(want), device=hits.device)


def _draft_index(vocab: torch.Tensor, size: int) -> torch.Tensor:
    """[size]: the draft id of each target id, -1 outside the draft vocabulary."""
    index = torch.full((size,), -1, dtype=torch.long, device=vocab.device)
    index[vocab] = torch.arange(len(vocab), device=vocab.device)
    return index
