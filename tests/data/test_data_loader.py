"""The loader: exactly-once epochs across ranks, batch semantics, resume (same and changed world size), val passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slimtrain.data.batch import IGNORE_INDEX, PAD_DOC_ID
from slimtrain.data.errors import DataError, LoaderStateError
from slimtrain.data.loader import Loader, StreamSpec

S = 32


def _lengths(n: int = 150, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 3 * S, n).tolist() + [S, 2 * S, 1]


def _loader(dataset, *, rank=0, world=1, mb=2, gb=8, packer="bfd", seed=0, prefetch=2, weights=None, mask=True):
    spec = StreamSpec(dataset, packer, S, weights, seed, buffer_docs=64)
    return Loader(spec, rank=rank, world_size=world, micro_batch_size=mb, global_batch_size=gb, pad_id=0,
                  mask_cross_doc_labels=mask, prefetch=prefetch)


def _global_rows(dataset, steps: int, *, world: int, mb: int, gb: int, start_state=None, **kw) -> list[torch.Tensor]:
    """The rows of `steps` global steps in global order (rank by rank, micro-batch by micro-batch)."""
    loaders = [_loader(dataset, rank=r, world=world, mb=mb, gb=gb, **kw) for r in range(world)]
    if start_state is not None:
        for loader in loaders:
            loader.load_state_dict(start_state)
    rows = []
    for _ in range(steps):
        for loader in loaders:
            for _ in range(gb // world // mb):
                rows.extend(next(loader).input_ids)
    for loader in loaders:
        loader.close()
    return rows


@pytest.mark.parametrize("packer", ["concat", "bfd"])
def test_every_token_exactly_once_per_epoch_across_ranks(unique_dataset, packer: str) -> None:
    dataset = unique_dataset([_lengths()])
    rows_per_epoch = _loader(dataset, packer=packer).packing_stats()["rows"]
    steps = -(-rows_per_epoch // 8)
    rows = _global_rows(dataset, steps, world=2, mb=2, gb=8, packer=packer)
    epoch = torch.stack(rows[:rows_per_epoch])
    seen = epoch[epoch != 0].sort().values
    assert torch.equal(seen, torch.arange(1, dataset.num_tokens + 1))  # tokens are 1..N, pad is 0


def _doc_last_tokens(dataset) -> set[int]:
    return set((np.cumsum(dataset.doc_len)).tolist())  # unique tokens: doc i ends at token cumsum[i]


@pytest.mark.parametrize("mask", [True, False])
def test_batch_labels_positions_and_doc_ids(unique_dataset, mask: bool) -> None:
    dataset = unique_dataset([_lengths()])
    loader = _loader(dataset, packer="concat", mask=mask, prefetch=0)
    last = _doc_last_tokens(dataset)
    for _ in range(10):
        b = next(loader)
        assert b.input_ids.shape == (2, S)
        for row in range(2):
            ids, labels = b.input_ids[row].tolist(), b.labels[row].tolist()
            doc, pos = b.doc_ids[row].tolist(), b.position_ids[row].tolist()
            for t in range(S):
                if doc[t] == PAD_DOC_ID:
                    assert labels[t] == IGNORE_INDEX and pos[t] == 0 and ids[t] == 0
                    continue
                assert pos[t] == (0 if t == 0 or doc[t - 1] != doc[t] else pos[t - 1] + 1)
                if ids[t] not in last:
                    assert labels[t] == ids[t] + 1  # the next token of the same document, even across rows
                elif mask or t + 1 == S or doc[t + 1] == PAD_DOC_ID:
                    assert labels[t] == IGNORE_INDEX
                else:
                    assert labels[t] == ids[t + 1]  # unmasked: predict the next document's first token


def test_batches_carry_their_attention_layout_found_in_the_loader(unique_dataset) -> None:
    """The loader answers the attention backends' questions (one document per row? cu_seqlens?) as it
    builds each batch, so the training thread and the GPU never have to; the answers are the masks'."""
    from slimtrain.core.masks import cu_seqlens, single_document_rows

    dataset = unique_dataset([_lengths()])
    loader = _loader(dataset, packer="concat", prefetch=2)
    for _ in range(6):
        b = next(loader)
        docs = b.documents
        assert docs is not None and docs.ids is b.doc_ids and docs.single == single_document_rows(b.doc_ids)
        if not docs.single:
            cu, max_len = cu_seqlens(b.doc_ids)
            assert torch.equal(docs.varlen[0], cu) and docs.varlen[1] == max_len
        moved = b.to("cpu").documents  # the answers travel with the batch
        assert moved.single == docs.single and (docs.varlen is None or torch.equal(moved.varlen[0], docs.varlen[0]))
    b.doc_ids = torch.zeros_like(b.doc_ids)  # replaced after the fact: the stale layout is not trusted
    assert b.to("cpu").single_document_rows is True
    loader.close()


def test_restored_loader_yields_what_an_uninterrupted_one_would(unique_dataset) -> None:
    dataset = unique_dataset([_lengths()])
    reference = [next(_it) for _it in [_loader(dataset, mb=2, gb=4)] for _ in range(40)]
    first = _loader(dataset, mb=2, gb=4, prefetch=3)
    for _ in range(13):  # mid-step: 13 micro-batches with 2 per step
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    first.close()
    resumed = _loader(dataset, mb=2, gb=4, prefetch=3)
    resumed.load_state_dict(state)
    for expected in reference[13:]:
        got = next(resumed)
        assert torch.equal(got.input_ids, expected.input_ids) and torch.equal(got.labels, expected.labels)
    resumed.close()


def test_resume_with_another_world_size_consumes_the_rest_exactly_once(unique_dataset) -> None:
    dataset = unique_dataset([_lengths()])
    rows_per_epoch = _loader(dataset).packing_stats()["rows"]
    total_steps = -(-rows_per_epoch // 8) + 3  # run into the second epoch
    reference = _global_rows(dataset, total_steps, world=1, mb=8, gb=8)
    before = _loader(dataset, rank=1, world=2, mb=2, gb=8)
    for _ in range(5 * 2):  # 5 global steps of 2 micro-batches on this rank
        next(before)
    state = before.state_dict()
    before.close()
    assert state["consumed_samples"] == 40 and state["micro_batches_in_step"] == 0
    after = _global_rows(dataset, total_steps - 5, world=4, mb=1, gb=8, start_state=state)
    assert all(torch.equal(a, b) for a, b in zip(after, reference[40:], strict=True))


def test_mid_step_state_cannot_change_layout_and_other_data_is_refused(unique_dataset) -> None:
    dataset = unique_dataset([_lengths()])
    loader = _loader(dataset, mb=2, gb=8)
    next(loader)
    with pytest.raises(LoaderStateError, match="middle of a global step"):
        _loader(dataset, world=2, rank=0, mb=2, gb=8).load_state_dict(loader.state_dict())
    with pytest.raises(LoaderStateError, match="packer"):
        _loader(dataset, packer="concat").load_state_dict(loader.state_dict())
    other = unique_dataset([_lengths(seed=5)])
    with pytest.raises(LoaderStateError, match="data"):
        _loader(other).load_state_dict(loader.state_dict())
    loader.close()


def test_epochs_are_reshuffled_deterministically(unique_dataset) -> None:
    dataset = unique_dataset([_lengths()])
    loader = _loader(dataset, prefetch=0)
    plans = [loader.plans.get(e) for e in (0, 1)]
    assert not np.array_equal(plans[0][0].doc, plans[1][0].doc)
    again = _loader(dataset, prefetch=0).plans.get(1)
    np.testing.assert_array_equal(again[0].doc, plans[1][0].doc)
    np.testing.assert_array_equal(again[1], plans[1][1])
    different_seed = _loader(dataset, seed=1, prefetch=0).plans.get(0)
    assert not np.array_equal(different_seed[0].doc, plans[0][0].doc)


def test_val_pass_is_finite_padded_and_restarts(unique_dataset) -> None:
    dataset = unique_dataset([_lengths(40)], split="val")
    loaders = [_loader(dataset, rank=r, world=2, mb=2, gb=8) for r in range(2)]
    rows = loaders[0].packing_stats()["rows"]
    passes = [[b.input_ids for b in loader] for loader in loaders]
    assert len(passes[0]) == len(passes[1]) == len(loaders[0]) == 2 * -(-rows // 8)
    tokens = torch.cat([torch.cat(p) for p in passes]).flatten()
    assert torch.equal(tokens[tokens != 0].sort().values, torch.arange(1, dataset.num_tokens + 1))
    again = [b.input_ids for b in loaders[0]]
    assert all(torch.equal(a, b) for a, b in zip(again, passes[0], strict=True))
    assert all(torch.equal(a.input_ids, b) for a, b in zip(loaders[0].fresh(), passes[0], strict=True))


def test_mixture_token_shares_match_weights(unique_dataset) -> None:
    rng = np.random.default_rng(0)
    sources = [rng.integers(1, 80, 400).tolist(), rng.integers(1, 200, 150).tolist(), rng.integers(1, 20, 900).tolist()]
    dataset = unique_dataset(sources)
    weights = [0.5, 0.3, 0.2]
    bounds = np.cumsum([0] + [sum(s) for s in sources])  # token ids of source i: (bounds[i], bounds[i+1]]
    loader = _loader(dataset, weights=weights, mb=8, gb=8, prefetch=0)
    counts = np.zeros(3)
    for _ in range(3 * loader.packing_stats()["rows"] // 8):  # about three epochs
        ids = next(loader).input_ids
        ids = ids[ids != 0].numpy()
        counts += np.histogram(ids, bins=bounds + 0.5)[0]
    np.testing.assert_allclose(counts / counts.sum(), weights, atol=0.01)
    again = _loader(dataset, weights=weights, prefetch=0).plans.get(2)[0].doc
    np.testing.assert_array_equal(again, loader.plans.get(2)[0].doc)


def test_bad_batch_geometry_names_the_fix(unique_dataset) -> None:
    dataset = unique_dataset([_lengths(10)])
    with pytest.raises(DataError, match="not a multiple of world_size"):
        _loader(dataset, world=2, mb=3, gb=8)
