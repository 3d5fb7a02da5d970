"""Lossless speculative decoding: a head drafts, the base model verifies all drafts in one forward.

Greedy verification keeps the longest run of drafts that equal the base model's own argmax, then adds the
base's token after them, so the output is token for token the base model's plain greedy output; the
speedup is the mean accepted length tau (tokens per base forward). Chains work for every head; trees
(several candidates per draft position, verified at once with a tree attention mask) for heads that
rank candidates (medusa, hydra). Batch 1, as speculative decoding is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimtrain.modules.transformer.kv_cache import KVCache

from .base import BaseStep, Drafter


@dataclass
class SpecStats:
    """rounds: base forwards after the prefill. accepted[j]: rounds whose first j + 1 drafts were all accepted.
    tokens: tokens added by the rounds (accepted drafts plus the base's own token each round)."""

    rounds: int = 0
    tokens: int = 0
    accepted: list[int] = field(default_factory=list)

    @property
    def tau(self) -> float:
        """Mean accepted length: tokens per base forward (1.0 means no draft ever accepted)."""
        return self.tokens / max(self.rounds, 1)

    def acceptance(self) -> list[float]:
        """Per draft position j: the fraction of rounds that accepted drafts 1..j."""
        return [a / max(self.rounds, 1) for a in self.accepted]


@dataclass
class Tree:
    """Draft tokens as a tree below the last accepted token (node 0, the root): parent[i] < i, depth >= 1."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]

    def attention(self, device: torch.device) -> torch.Tensor:
        """[1 + n, 1 + n] bool: each node (the root first) attends to itself and its ancestors."""
        n = len(self.tokens) + 1
        mask = torch.eye(n, dtype=torch.bool)
        for i, parent in enumerate(self.parents, start=1):
            mask[i] |= mask[parent]
        return mask.to(device)


def draft_tree(drafter: Drafter, widths: list[int]) -> Tree:
    """The tree of `widths[d]` candidates per node at depth d + 1, each conditioned on its path."""
    tree = Tree([], [], [])
    frontier = [(0, [])]  # (node, tokens on its path)
    for width in widths:
        nxt = []
        for node, path in frontier:
            for token in drafter.children(path, width):
                tree.tokens.append(token)
                tree.parents.append(node)
                tree.depths.append(len(path) + 1)
                nxt.append((len(tree.tokens), path + [token]))
        frontier = nxt
    return tree


class SpeculativeDecoder:
    """Greedy speculative decoding of one sequence with the base `model` and one head's `drafter`.

    draft_tokens: chain length per round; tree_widths: candidates per draft position (a tree instead of a
    chain). `hidden_layers`: base layers whose outputs the drafter reads.
    """

    def __init__(self, model: nn.Module, drafter: Drafter, draft_tokens: int = 3, tree_widths: list[int] | None = None,
                 hidden_layers: tuple[int, ...] = ()) -> None:
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens={draft_tokens} must be >= 1")
        if tree_widths is not None and (not tree_widths or min(tree_widths) < 1):
            raise ValueError(f"tree_widths={tree_widths} needs one width >= 1 per draft position")
        self.model, self.drafter = model, drafter
        self.draft_tokens, self.tree_widths, self.hidden_layers = draft_tokens, tree_widths, hidden_layers

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None, rounds: int | None = None,
                 eos_id: int | None = None) -> tuple[torch.Tensor, SpecStats]:
        """`input_ids` [1, S] followed by the base model's greedy continuation, and the acceptance statistics.

        Stops after `max_new_tokens` tokens (the output is cut there), after `rounds` verification rounds
        (every call then runs the same number of forwards: what an evaluation on several ranks needs), or at
        `eos_id`, whichever comes first."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"speculative decoding takes one sequence, input_ids [1, S]; got {tuple(input_ids.shape)}")
        if max_new_tokens is None and rounds is None:
            raise ValueError("give max_new_tokens or rounds (or both)")
        per_round = len(self.tree_widths) if self.tree_widths else self.draft_tokens
        budget = max_new_tokens if rounds is None else rounds * (per_round + 1)
        if max_new_tokens is not None:
            budget = min(budget, max_new_tokens)
        capacity = input_ids.shape[1] + budget + self._nodes_per_round() + 1
        cache = KVCache.for_model(self.model, 1, capacity)
        out = self.model(input_ids, cache=cache, hidden_layers=self.hidden_layers)
        first = int(out.logits[0, -1].argmax())
        prompt = input_ids[0].tolist()
        self.drafter.start(prompt[0], capacity)
        self.drafter.observe(_step(out, range(input_ids.shape[1]), prompt[1:] + [first]))
        tokens, stats = prompt + [first], SpecStats(accepted=[0] * per_round)
        new = 1
        while not self._done(tokens, new, stats, max_new_tokens, rounds, eos_id):
            added = self._round(tokens, cache, stats)
            tokens += added
            new += len(added)
        if eos_id is not None and eos_id in tokens[len(prompt):]:
            new = min(new, tokens[len(prompt):].index(eos_id) + 1)
        if max_new_tokens is not None:
            new = min(new, max_new_tokens)
        return torch.tensor([tokens[: len(prompt) + new]], device=input_ids.device), stats

    def _nodes_per_round(self) -> int:
        if not self.tree_widths:
            return self.draft_tokens
        nodes, level = 0, 1
        for width in self.tree_widths:
            level *= width
            nodes += level
        return nodes

    @staticmethod
    def _done(tokens: list[int], new: int, stats: SpecStats, max_new_tokens: int | None, rounds: int | None,
              eos_id: int | None) -> bool:
        if rounds is not None and stats.rounds >= rounds:
            return True
        if max_new_tokens is not None and new >= max_new_tokens:
            return True
        return eos_id is not None and eos_id in tokens[len(tokens) - new:]

    def _round(self, tokens: list[int], cache: KVCache, stats: SpecStats) -> list[int]:
        """One draft-and-verify round: the tokens it adds (accepted drafts, then the base's token)."""
        device = cache.keys.device
        start = cache.length  # the position of the last accepted token, which the base has not read yet
        if self.tree_widths:
            tree = draft_tree(self.drafter, self.tree_widths)
            nodes, parents, depths = tree.tokens, [-1] + tree.parents, [0] + tree.depths
            mask = tree.attention(device)
        else:
            nodes = self.drafter.chain(self.draft_tokens)
            parents, depths = list(range(-1, len(nodes))), list(range(len(nodes) + 1))
            mask = None
        ids = torch.tensor([[tokens[-1], *nodes]], device=device)
        positions = (start + torch.tensor(depths, device=device))[None]
        out = self.model(ids, position_ids=positions, cache=cache, tree_mask=mask, hidden_layers=self.hidden_layers)
        best = out.logits[0].argmax(-1).tolist()
        path = _accepted_path(best, [-1, *nodes], parents)
        cache.keep(start, path)
        added = [nodes[i - 1] for i in path[1:]] + [best[path[-1]]]
        for j in range(len(path) - 1):
            stats.accepted[j] += 1
        stats.rounds += 1
        stats.tokens += len(added)
        self.drafter.observe(_step(out, path, added))
        return added


def _accepted_path(best: list[int], tokens: list[int], parents: list[int]) -> list[int]:
    """Node indices from the root down the branch whose every token is the base's argmax at its parent."""
    path = [0]
    while True:
        child = next((i for i, p in enumerate(parents) if p == path[-1] and tokens[i] == best[path[-1]]), None)
        if child is None:
            return path
        path.append(child)


def _step(out, rows, next_tokens: list[int]) -> BaseStep:
    index = torch.as_tensor(list(rows), device=out.hidden_states.device)
    return BaseStep(hidden=out.hidden_states[0, index], last_hidden=out.last_hidden[0, index], next_tokens=next_tokens,
                    layer_hidden={k: v[0, index] for k, v in out.layer_hidden.items()})
