"""What draft heads read from the base model, in training and in decoding, and what they give back.

A head drafts `positions` tokens ahead. In training it returns, for each draft offset k = 1..positions,
features at every position t and the projection that turns them into logits of token t + k + 1 (the
target `labels[t + k]`, see targets.py). In decoding it is a `Drafter`: it observes the base model's
outputs at the positions the verification accepted and proposes the next tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn


@dataclass
class BaseView:
    """One training forward of the base model, as the heads read it.

    model: the base `Transformer` (its `embed`, `lm_head`, `cfg`). input_ids, doc_ids, position_ids [B, S]
    (doc_ids PAD_DOC_ID on padding, 0 everywhere for rows of one document). documents: the layout the
    attention backends take (None: one causal document per row). hidden: the final normed hidden states;
    last_hidden: the last layer's output before the final norm; layer_hidden: outputs of the layers
    a head asked for (`ModelInputs.hidden_layers`), by layer index.
    """

    model: nn.Module
    input_ids: torch.Tensor
    doc_ids: torch.Tensor
    position_ids: torch.Tensor
    documents: object
    hidden: torch.Tensor
    last_hidden: torch.Tensor
    layer_hidden: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class DraftOutput:
    """Offset k's features [B, S, F] and `project` (features [N, F] -> logits [N, V']). `vocab` [V']: the
    target id of each logit, for a head over a reduced draft vocabulary (None: the whole vocabulary). `aux`: what
    the head's own block reported (an MoE MLP's routing), which joins the model's `outputs.aux`."""

    offset: int
    features: torch.Tensor
    project: Callable[[torch.Tensor], torch.Tensor]
    vocab: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class BaseStep:
    """The base model's outputs at positions the verification accepted (rows [m, H]), and the token that
    follows each of them (`next_tokens` [m]: accepted drafts, then the base's own token)."""

    hidden: torch.Tensor
    last_hidden: torch.Tensor
    next_tokens: list[int]
    layer_hidden: dict[int, torch.Tensor] = field(default_factory=dict)


class Drafter(Protocol):
    """A head's decoding state for one sequence (batch 1)."""

    def start(self, first_token: int, max_len: int) -> None:
        """Begin a sequence whose first token is `first_token`, for up to `max_len` positions."""
        ...

    def observe(self, step: BaseStep) -> None:
        """Take the base model's outputs at newly accepted positions (the first call: the prompt)."""
        ...

    def chain(self, k: int) -> list[int]:
        """The next `k` tokens drafted greedily after the last accepted one."""
        ...

    def children(self, path: list[int], width: int) -> list[int]:
        """Tree drafting: the `width` likeliest tokens at draft position len(path) + 1, after the drafted
        tokens `path` (raises for heads that only draft chains)."""
        ...


def own_generator_seed(generator: torch.Generator) -> int:
    """A seed for `init_weights` drawn from a plugin's generator (the model's init rule, the plugin's stream)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))
