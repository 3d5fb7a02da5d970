"""Each draft position's loss and top-1 accuracy, on the positions whose target stays in their document."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from slimtrain.core.sentinels import IGNORE_INDEX

from .base import BaseView, DraftOutput
from .targets import shift_left, shifted_labels


class PositionResult(NamedTuple):
    """loss: mean over the valid positions (0 with none, still in the graph); correct / count: top-1 hits and
    valid positions (what the accuracy is summed from over batches and ranks)."""

    loss: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor


def position_result(out: DraftOutput, base: BaseView, labels: torch.Tensor, self_distill: bool) -> PositionResult:
    """Offset `out.offset`'s loss against the data's labels or, with `self_distill`, against the base model's own
    distribution at the position it drafts (restricted to the draft vocabulary for a head that has one); top-1
    accuracy against the same target (the label, or the base's argmax: what greedy verification accepts)."""
    targets = shifted_labels(labels, base.doc_ids, out.offset)
    valid = targets != IGNORE_INDEX
    if self_distill:
        with torch.no_grad():
            teacher = base.model.lm_head(shift_left(base.hidden.detach(), out.offset)[valid]).float()
        if out.vocab is not None:  # EAGLE-3: positions whose base argmax lies outside the draft vocabulary learn nothing
            inside = _draft_index(out.vocab, int(base.model.cfg.vocab_size))[teacher.argmax(-1)] >= 0
            valid[valid.clone()] = inside
            teacher = teacher[inside][:, out.vocab]
        logits = out.project(out.features[valid]).float()
        probs = teacher.softmax(-1)
        loss = -(probs * logits.log_softmax(-1)).sum(-1).mean() if len(logits) else logits.sum() * 0.0
        wanted = teacher.argmax(-1)
    else:
        wanted = targets[valid]
        if out.vocab is not None:  # targets outside the draft vocabulary learn nothing
            index = _draft_index(out.vocab, int(base.model.cfg.vocab_size))[wanted]
            valid[valid.clone()] = index >= 0
            wanted = index[index >= 0]
        logits = out.project(out.features[valid]).float()
        loss = F.cross_entropy(logits, wanted) if len(logits) else logits.sum() * 0.0
    with torch.no_grad():
        correct = (logits.argmax(-1) == wanted).sum()
    return PositionResult(loss, correct, valid.sum())


def _draft_index(vocab: torch.Tensor, size: int) -> torch.Tensor:
    """[size]: the draft id of each target id, -1 outside the draft vocabulary."""
    index = torch.full((size,), -1, dtype=torch.long, device=vocab.device)
    index[vocab] = torch.arange(len(vocab), device=vocab.device)
    return index
