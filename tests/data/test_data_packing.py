"""Packers: every token placed once, rows never exceed seq_len, bfd cuts only documents longer than seq_len."""

from __future__ import annotations

import numpy as np
import pytest

from slimtrain.data.packing import PACKERS, best_fit_decreasing, pack


def _reference_bfd(sizes: list[int], capacity: int) -> list[int]:
    """Item-by-item best-fit decreasing; returns the sorted free room of every bin."""
    rooms: list[int] = []
    for size in sizes:
        fits = [i for i, r in enumerate(rooms) if r >= size]
        if fits:
            best = min(fits, key=lambda i: rooms[i])
            rooms[best] -= size
        else:
            rooms.append(capacity - size)
    return sorted(rooms)


def test_grouped_bfd_matches_item_by_item_bfd() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        capacity = int(rng.integers(1, 50))
        sizes = np.sort(rng.integers(1, capacity + 1, int(rng.integers(0, 80))))[::-1].copy()
        bins, nbins = best_fit_decreasing(sizes, capacity)
        fill = np.bincount(bins, weights=sizes, minlength=nbins).astype(int)
        assert (fill <= capacity).all()
        assert sorted((capacity - fill).tolist()) == _reference_bfd(sizes.tolist(), capacity)


def _lengths(n: int, seq_len: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(1, seq_len, n), rng.integers(seq_len, 4 * seq_len, n // 5), [seq_len, 2 * seq_len]])


@pytest.mark.parametrize("name", ["concat", "bfd", "pad", "buckets"])
def test_every_token_exactly_once_and_rows_fit(name: str) -> None:
    seq_len = 50
    lengths = _lengths(400, seq_len)
    docs = np.random.default_rng(2).permutation(len(lengths))
    plan = pack(name, docs, lengths[docs], seq_len, buffer_docs=150)
    row_tokens = np.add.reduceat(plan.length, plan.row_ptr[:-1]) if plan.num_rows else np.zeros(0)
    assert (row_tokens <= seq_len).all() and (row_tokens > 0).all()
    covered = np.zeros(int(lengths.sum()), dtype=int)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for d, s, n in zip(plan.doc, plan.start, plan.length):
        covered[offsets[d] + s : offsets[d] + s + n] += 1
    assert (covered == 1).all()
    assert plan.num_tokens == lengths.sum() and plan.num_docs == len(lengths)


@pytest.mark.parametrize("name", ["bfd", "pad"])
def test_only_documents_longer_than_seq_len_are_split(name: str) -> None:
    seq_len = 50
    lengths = _lengths(300, seq_len)
    plan = pack(name, np.arange(len(lengths)), lengths, seq_len, buffer_docs=10**6)
    pieces = np.bincount(plan.doc, minlength=len(lengths))
    np.testing.assert_array_equal(pieces > 1, lengths > seq_len)
    assert plan.split_fraction == pytest.approx((lengths > seq_len).mean())
    if name == "bfd":  # long documents: full rows plus at most one remainder piece
        np.testing.assert_array_equal(pieces, -(-lengths // seq_len))


def test_bfd_packs_tighter_than_pad_and_cuts_less_than_concat() -> None:
    seq_len = 128
    lengths = np.random.default_rng(3).integers(1, 200, 2000)
    stats = {n: pack(n, np.arange(2000), lengths, seq_len, 10**6) for n in ("concat", "bfd", "pad")}
    assert stats["bfd"].utilization > 0.99
    assert stats["pad"].utilization < 0.7
    assert stats["bfd"].split_fraction == pytest.approx((lengths > seq_len).mean())
    assert stats["concat"].split_fraction > stats["bfd"].split_fraction


def test_packers_are_deterministic_and_registered() -> None:
    assert PACKERS.names() == ["bfd", "buckets", "concat", "pad"]
    lengths = _lengths(200, 40)
    a = pack("bfd", np.arange(len(lengths)), lengths, 40, 64)
    b = pack("bfd", np.arange(len(lengths)), lengths, 40, 64)
    for field in ("row_ptr", "doc", "start", "length"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_unknown_packer_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'bfd'.*\['bfd', 'buckets', 'concat', 'pad'\]"):
        pack("bdf", np.arange(3), np.ones(3, dtype=np.int64), 8, 10)
