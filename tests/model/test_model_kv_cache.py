"""Incremental decoding: the KV-cache forward equals recomputing the whole sequence, chains and trees alike."""

from __future__ import annotations

import pytest
import torch

from slimtrain.modules.transformer.generate import cached_greedy_generate, greedy_generate
from slimtrain.modules.transformer.kv_cache import KVCache

ATOL = 2e-5


def test_prefill_then_steps_equal_full_forward(make_model) -> None:
    model = make_model(seed=1)
    ids = torch.randint(0, 123, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(ids).logits
    cache = KVCache.for_model(model, batch=2, max_len=32)
    pieces = [model(ids[:, :7], cache=cache).logits]
    for t in range(7, 20, 3):  # a few tokens per forward, as a verified chain feeds them
        pieces.append(model(ids[:, t:t + 3], cache=cache).logits)
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def test_cached_greedy_equals_recomputed_greedy(make_model) -> None:
    model = make_model(seed=2, num_kv_heads=1)
    prompt = torch.randint(0, 123, (3, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(cached_greedy_generate(model, prompt, 40), greedy_generate(model, prompt, 40))


def test_tree_forward_equals_each_branch_recomputed(make_model) -> None:
    """Nodes 0..4 form the tree 0 -> (1 -> 3, 2 -> 4): each node's logits are those of its path."""
    model = make_model(seed=3)
    gen = torch.Generator().manual_seed(2)
    prefix, nodes = torch.randint(0, 123, (1, 6), generator=gen), torch.randint(0, 123, (1, 5), generator=gen)
    parent = [-1, 0, 0, 1, 2]
    ancestors = torch.eye(5, dtype=torch.bool)
    depth = [0] * 5
    for i, p in enumerate(parent):
        if p >= 0:
            ancestors[i] |= ancestors[p]
            depth[i] = depth[p] + 1
    cache = KVCache.for_model(model, 1, 16)
    model(prefix, cache=cache)
    positions = (6 + torch.tensor(depth))[None]
    tree = model(nodes, position_ids=positions, cache=cache, tree_mask=ancestors).logits
    for i in range(5):
        path = ancestors[i].nonzero().flatten()
        alone = model(torch.cat([prefix, nodes[:, path]], dim=1)).logits[:, -1]
        torch.testing.assert_close(tree[:, i], alone, atol=ATOL, rtol=0)

    # Keep the branch 0 -> 2 -> 4 and decode on: the cache then equals one of that sequence.
    cache.keep(6, [0, 2, 4])
    assert cache.length == 9
    nxt = torch.tensor([[7]])
    stepped = model(nxt, cache=cache).logits[:, -1]
    whole = model(torch.cat([prefix, nodes[:, [0, 2, 4]], nxt], dim=1)).logits[:, -1]
    torch.testing.assert_close(stepped, whole, atol=ATOL, rtol=0)
    cache.truncate(7)
    again = model(nodes[:, [2]], cache=cache).logits[:, -1]
    torch.testing.assert_close(again, model(torch.cat([prefix, nodes[:, [0, 2]]], dim=1)).logits[:, -1],
                               atol=ATOL, rtol=0)


def test_cache_errors_say_what_to_change(make_model) -> None:
    model = make_model()
    cache = KVCache.for_model(model, 1, 8)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="one document"):
        model(torch.zeros(1, 4, dtype=torch.long), doc_ids=torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="pass cache="):
        model(torch.zeros(1, 4, dtype=torch.long), tree_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(3)
