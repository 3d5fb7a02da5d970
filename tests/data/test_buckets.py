"""`data.packer: buckets` (dataset decomposition): power-of-two pieces, one row length per step, constant token
slots per step, every token once per epoch across ranks, the curricula, exact resume, and bad recipes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtrain.data.bucket_epoch import BucketSpec
from slimtrain.data.bucket_loader import BucketLoader
from slimtrain.data.curriculum import cycle_parts, schedule
from slimtrain.data.decompose import bucket_lengths, decompose
from slimtrain.data.errors import DataError, LoaderStateError
from slimtrain.data.loader import StreamSpec

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny-cpu.yaml"
S, MB, GB = 64, 2, 8  # seq_len (the longest bucket), micro-batch rows of S, global batch rows of S


def _lengths(n: int = 300, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 3 * S, n).tolist() + [S, 2 * S, 1, 100]


def _loader(dataset, *, rank=0, world=1, mb=MB, gb=GB, seed=0, prefetch=0, **bucket_kw) -> BucketLoader:
    spec = StreamSpec(dataset, "buckets", S, None, seed, 64, buckets=BucketSpec(**{"min_len": 8, **bucket_kw}))
    return BucketLoader(spec, rank=rank, world_size=world, micro_batch_size=mb, global_batch_size=gb, pad_id=0,
                        prefetch=prefetch)


def _steps(dataset, steps: int, *, world: int = 2, mb: int = MB, gb: int = GB, state=None, **kw) -> list[list]:
    """The micro-batches of `steps` global steps, each step's in global order (rank by rank)."""
    loaders = [_loader(dataset, rank=r, world=world, mb=mb, gb=gb, **kw) for r in range(world)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = [[next(loader) for loader in loaders for _ in range(gb // world // mb)] for _ in range(steps)]
    for loader in loaders:
        loader.close()
    return out


def _doc_of_token(dataset) -> np.ndarray:
    """Token t (tokens are 1..N, unique) belongs to document _doc_of_token[t]."""
    return np.concatenate([[-1], np.repeat(np.arange(len(dataset.doc_len)), dataset.doc_len)])


# -- decomposition ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("remainder", ["pad", "drop"])
def test_decomposition_tiles_every_document_with_power_of_two_pieces(remainder: str) -> None:
    lengths = np.asarray(_lengths(500, seed=1))
    docs = np.random.default_rng(2).permutation(len(lengths))
    pieces, dropped = decompose(docs, lengths[docs], S, 8, remainder)
    assert (pieces.length <= S).all() and (pieces.length > 0).all()
    pow2 = (pieces.length & (pieces.length - 1)) == 0
    for d in range(len(lengths)):
        mine = pieces.take(pieces.doc == d)
        n = int(lengths[d])
        assert np.array_equal(mine.start, np.sort(mine.start))  # in document order, longest first within r
        expected_end = n if remainder == "pad" else n - n % 8
        assert np.array_equal(mine.start, np.concatenate([[0], np.cumsum(mine.length)[:-1]])[:len(mine)])
        assert int(mine.length.sum()) == expected_end
        short = mine.length < 8  # at most one piece below min_len: the document's last
        assert short.sum() <= 1 and (not short.any() or short[-1])
        rest = mine.length[mine.length < S]
        assert (np.diff(rest) < 0).all()  # r's binary expansion, longest piece first
    assert pow2[pieces.length >= 8].all()
    assert dropped == (0 if remainder == "pad" else int((lengths % 8).sum()))


def test_the_papers_example_and_bucket_lengths() -> None:
    pieces, _ = decompose(np.array([7]), np.array([100]), 256, 4)
    assert pieces.length.tolist() == [64, 32, 4] and pieces.start.tolist() == [0, 64, 96]
    pieces, _ = decompose(np.array([0]), np.array([600]), 256, 16, "drop")
    assert pieces.length.tolist() == [256, 256, 64, 16]  # 600 = 2 x 256 + 64 + 16 + 8 (dropped)
    assert bucket_lengths(16, 256) == [16, 32, 64, 128, 256]


# -- the loader ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("curriculum", ["grow", "short_to_long"])
def test_every_token_exactly_once_per_epoch_across_ranks(unique_dataset, curriculum: str) -> None:
    dataset = unique_dataset([_lengths()])
    stats = _loader(dataset, curriculum=curriculum).packing_stats()
    doc_of = _doc_of_token(dataset)
    seen = []
    for step in _steps(dataset, stats["steps"], curriculum=curriculum):
        for batch in step:
            for row in batch.input_ids:
                real = row[row != 0].numpy()
                seen.append(real)
                # one piece of one document per row: consecutive tokens of one document, from the row's start
                assert len(set(doc_of[real])) <= 1 and (np.diff(real) == 1).all()
                assert (row[: len(real)] != 0).all()
    seen = np.sort(np.concatenate(seen))
    assert np.array_equal(seen, np.arange(1, dataset.num_tokens + 1))  # tokens are 1..N, pad is 0
    assert stats["tokens"] == dataset.num_tokens and stats["dropped_fraction"] == 0.0


def test_every_step_has_one_row_length_and_constant_token_slots(unique_dataset) -> None:
    dataset = unique_dataset([_lengths()])
    stats = _loader(dataset, remainder="drop").packing_stats()
    lengths_seen = set()
    steps = _steps(dataset, stats["steps"], remainder="drop")
    partial = max(t for t, step in enumerate(steps) if step[0].input_ids.shape[1] == 8)
    for t, step in enumerate(steps):
        shapes = {tuple(b.input_ids.shape) for b in step}
        assert len(shapes) == 1  # every micro-batch of every rank: one length
        rows, row_len = shapes.pop()
        lengths_seen.add(row_len)
        assert rows * row_len == MB * S and sum(b.input_ids.numel() for b in step) == GB * S
        real = sum(b.num_tokens for b in step)
        if t != partial:  # only the shortest bucket's last step of the epoch may be partial
            assert real == GB * S
        assert all(b.single_document_rows for b in step if b.num_tokens == b.input_ids.numel())
    assert lengths_seen == {8, 16, 32, 64}
    assert stats["tokens_per_step"] == GB * S and stats["padded_fraction"] < GB * S / stats["tokens"]


def test_labels_continue_across_pieces_and_positions_restart(unique_dataset) -> None:
    dataset = unique_dataset([_lengths()])
    doc_of = _doc_of_token(dataset)
    batch = _steps(dataset, 1, world=1)[0][0]
    for ids, labels, pos in zip(batch.input_ids, batch.labels, batch.position_ids):
        n = int((ids != 0).sum())
        assert pos[:n].tolist() == list(range(n))
        assert torch.equal(labels[: n - 1], ids[1:n])
        last = int(ids[n - 1])
        follows = last + 1 <= dataset.num_tokens and doc_of[last + 1] == doc_of[last]
        assert int(labels[n - 1]) == (last + 1 if follows else -100)  # the document's next token, in another row


def test_the_stream_does_not_depend_on_world_size_or_micro_batch(unique_dataset) -> None:
    dataset = unique_dataset([_lengths()])
    flat = lambda steps: torch.cat([r for step in steps for b in step for r in b.input_ids.flatten()[None]])  # noqa: E731
    one = flat(_steps(dataset, 20, world=1, mb=8))
    two = flat(_steps(dataset, 20, world=2, mb=2))
    assert torch.equal(one, two)


def test_resume_mid_epoch_and_mid_step_is_exact(unique_dataset) -> None:
    dataset = unique_dataset([_lengths()])
    straight = _loader(dataset, rank=1, world=2, prefetch=2)
    expected = [next(straight) for _ in range(2 * 7 + 1 + 12)]
    first = _loader(dataset, rank=1, world=2, prefetch=2)
    for _ in range(2 * 7 + 1):  # 7 steps and one micro-batch into the 8th
        next(first)
    state = first.state_dict()
    first.close()
    assert state["micro_batches_in_step"] == 1 and "buckets" in state["stream"]
    resumed = _loader(dataset, rank=1, world=2, prefetch=2)
    resumed.load_state_dict(state)
    for want in expected[2 * 7 + 1:]:
        got = next(resumed)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
    straight.close()
    resumed.close()


def test_resume_across_epochs_on_another_world_size(unique_dataset) -> None:
    dataset = unique_dataset([_lengths(60)])
    steps = _loader(dataset).packing_stats()["steps"]
    straight = _steps(dataset, steps + 5, world=2)
    head = [_loader(dataset, rank=0, world=1, mb=4)]
    for _ in range((steps - 2) * GB // 4):
        next(head[0])
    state = head[0].state_dict()
    tail = _steps(dataset, 7, world=2, state=state)
    for want, got in zip(straight[steps - 2:], tail):
        assert torch.equal(torch.cat([b.input_ids.flatten() for b in want]), torch.cat([b.input_ids.flatten() for b in got]))
    assert straight[steps][0].input_ids.shape != () and _loader(dataset).packing_stats()["epoch"] == 0


def test_a_state_loads_only_into_the_same_stream(unique_dataset) -> None:
    dataset = unique_dataset([_lengths()])
    loader = _loader(dataset)
    for _ in range(GB // MB):  # one whole step
        next(loader)
    state = loader.state_dict()
    with pytest.raises(LoaderStateError, match="min_len"):
        _loader(dataset, min_len=16).load_state_dict(state)
    with pytest.raises(LoaderStateError, match="resume with train.global_batch_size=8"):
        _loader(dataset, gb=16).load_state_dict(state)


def test_buckets_feed_training_only_and_refuse_batch_transforms(unique_dataset) -> None:
    val = unique_dataset([_lengths(20)], split="val")
    with pytest.raises(DataError, match="evaluation reads rows of data.seq_len"):
        _loader(val)

    class Spans:  # a plugin's batch transform: it may need rows of seq_len (the compressor's spans do)
        name = "spans"

    spec = StreamSpec(unique_dataset([_lengths(20)]), "buckets", S, None, 0, 64, transforms=(Spans(),),
                      buckets=BucketSpec(min_len=8))
    with pytest.raises(DataError, match=r"batch transforms \['spans'\] do not take; use data.packer=bfd"):
        BucketLoader(spec, rank=0, world_size=1, micro_batch_size=MB, global_batch_size=GB, pad_id=0)


# -- the curriculum -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("curriculum, weights", [("grow", None), ("short_to_long", None), ("weighted", [1, 2, 3])])
@pytest.mark.parametrize("cycles", [1, 3])
def test_every_curriculum_schedules_each_step_once(curriculum: str, weights, cycles: int) -> None:
    counts = [40, 25, 10]
    order = schedule(counts, curriculum, cycles, np.random.default_rng(0), weights)
    assert np.bincount(order, minlength=3).tolist() == counts
    parts = cycle_parts(counts, cycles)
    at = 0
    for part in parts:  # each cycle holds its share of every bucket
        assert np.bincount(order[at:at + part.sum()], minlength=3).tolist() == part.tolist()
        if curriculum == "short_to_long":
            assert (np.diff(order[at:at + part.sum()]) >= 0).all()
        at += part.sum()


def test_grow_draws_short_rows_early_and_long_rows_late() -> None:
    order = schedule([100, 100, 100, 100], "grow", 1, np.random.default_rng(0))
    quarters = order.reshape(4, 100).mean(1)
    assert quarters[0] < 1.0 < 2.5 < quarters[-1]  # Grow-P2 odds 8:4:2:1 over equal counts
    uniform = schedule([100, 100, 100, 100], "weighted", 1, np.random.default_rng(0), [1, 1, 1, 1])
    assert abs(uniform[:200].mean() - 1.5) < 0.3


def test_the_loader_follows_the_curriculum(unique_dataset) -> None:
    dataset = unique_dataset([_lengths()])
    loader = _loader(dataset, curriculum="short_to_long", cycles=2)
    order = loader.plans.get(0).order
    lengths = [loader.row_len_at(t) for t in range(len(order))]
    half = int(cycle_parts(np.bincount(order), 2)[0].sum())
    assert lengths[:half] == sorted(lengths[:half]) and lengths[half:] == sorted(lengths[half:])
    batches = [next(loader) for _ in range(len(order) * GB // MB)]
    assert [b.input_ids.shape[1] for b in batches[:: GB // MB]] == lengths


# -- recipes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("data.buckets.min_len=12", "data.buckets.min_len=12 is not a power of two; use 8 or 16"),
    ("data.buckets.min_len=128", "data.buckets.min_len=128 is above data.seq_len=64, the longest bucket"),
    ("data.seq_len=48", "data.seq_len=48 is not a power of two, and data.packer=buckets makes it the longest bucket"),
    ("data.seq_len=128", "data.seq_len=128 (the longest bucket of data.packer=buckets) exceeds model.max_seq_len=64"),
    ("data.buckets.curriculum=weighted ; data.buckets.weights=[1, 2]",
     "data.buckets.weights has 2 entries but the buckets are 4 lengths [8, 16, 32, 64]"),
    ("data.buckets.weights=[1, 2, 3, 4]", "weights go with `curriculum: weighted` and only with it"),
    ("data.buckets.curriculum=weighted ; data.buckets.weights=[1, 0, 1, 1]", "every weight must be above 0"),
    ("data.buckets.curriculum=longest", "data.buckets.curriculum: got 'longest'"),
    ("data.val_packer=buckets", "data.val_packer=buckets: evaluation reads rows of data.seq_len"),
])
def test_bad_bucket_recipes_say_what_to_fix(override: str, expected: str) -> None:
    from slimtrain.trainer.recipe.schema import RecipeError, load_recipe

    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, ["data.packer=buckets", "data.buckets.min_len=8", *override.split(" ; ")])
    assert expected in str(info.value)


# -- a real run ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_run_trains_and_resumes_bitwise_after_sigkill(tmp_path_factory: pytest.TempPathFactory) -> None:
    sys.path.insert(0, str(REPO / "tests" / "trainer"))
    try:
        from train_helpers import records, run_train, run_until_checkpoint_then_kill
    finally:
        sys.path.pop(0)
    cache = tmp_path_factory.mktemp("cache")
    # Source code is long: rows of 64 hold 99% of the tokens, so weights that favour the short lengths make
    # the 12 steps switch lengths (and the resumed half start on the curriculum's draw, not on a fresh one).
    overrides = ["data.packer=buckets", "data.buckets.min_len=8", "data.buckets.curriculum=weighted",
                 "data.buckets.weights=[1000, 1000, 1000, 1]", "train.steps=12", "checkpoint.every=6", "eval.every=6"]
    straight = tmp_path_factory.mktemp("straight")
    proc = run_train(straight, cache, overrides)
    assert proc.returncode == 0, proc.stdout
    killed = tmp_path_factory.mktemp("killed")
    run_until_checkpoint_then_kill(killed, cache, 6, overrides)
    proc = run_train(killed, cache, overrides)
    assert proc.returncode == 0, proc.stdout
    assert "resumed" in proc.stdout
    assert records(killed) == records(straight)  # every step's loss, grad norm, row length; the evaluations
    steps = [r for r in records(straight) if "loss" in r]
    assert len({r["row_len"] for r in steps[:6]}) > 1 and len({r["row_len"] for r in steps[6:]}) > 1
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
