"""The token cross-entropy every loss path sums: logits upcast to fp32, eager or compiled."""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from slimtrain.data.batch import IGNORE_INDEX

CrossEntropySum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def fp32_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the token cross-entropies of logits [..., V], upcast to fp32, against labels [...]
    (IGNORE_INDEX labels count nothing)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@functools.cache
def compiled_cross_entropy_sum() -> CrossEntropySum:
    """`fp32_cross_entropy_sum` compiled (train.compile): one fused pass over the logits forward and one
    backward, instead of materialising their fp32 upcast and log-softmax (8 bytes per logit each way).

    Static shapes: each shape (the chunk, a short last chunk, eval) gets its own kernel whatever came
    before it. With automatic dynamic shapes the first new shape would swap in a symbolic-shape kernel for
    all later calls, so a resumed run, which starts on the static one, could sum in another order than
    the straight run did at the same step and lose bitwise resume. A run calls it with a handful of shapes
    (with and without gradients), well under Dynamo's recompile limit (8), past which new shapes would
    run eager."""
    return torch.compile(fp32_cross_entropy_sum, dynamic=False)
