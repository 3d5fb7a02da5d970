"""Batch transforms (slimtrain.core.transforms): fields built in collate, moved with the batch, part of
the resume fingerprint; and packers chosen from the registry (a new one needs no schema edit)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from data_helpers import synthetic_dataset

from slimtrain.core.transforms import BatchTransform
from slimtrain.data.errors import LoaderStateError
from slimtrain.data.loader import Loader, StreamSpec

S = 32


class FirstTokens:
    """Marks each row's first `n` + (row key mod 3) tokens and drops them from the loss."""

    name = "first-tokens"

    def __init__(self, n: int) -> None:
        self.n = n

    def identity(self) -> dict[str, Any]:
        return {"n": self.n}

    def __call__(self, fields, rows):
        labels = fields["labels"].clone()
        mask = torch.zeros_like(labels, dtype=torch.bool)
        key = torch.full((len(rows),), -1, dtype=torch.int64)
        for b, row in enumerate(rows):
            if row is not None:
                mask[b, : self.n + row % 3] = True
                key[b] = row
        labels[mask] = -100
        return {"labels": labels, "span": mask, "row_key": key}


@pytest.fixture
def dataset(tmp_path):
    lengths = np.random.default_rng(0).integers(1, 3 * S, 120).tolist()
    return synthetic_dataset(tmp_path, [lengths])


def _loader(dataset, transforms=(), rank=0, world=1):
    spec = StreamSpec(dataset, "bfd", S, None, 0, buffer_docs=64, transforms=tuple(transforms))
    return Loader(spec, rank=rank, world_size=world, micro_batch_size=2, global_batch_size=4, pad_id=0)


def test_transform_fields_are_built_in_collate_and_move_with_the_batch(dataset) -> None:
    assert isinstance(FirstTokens(2), BatchTransform)
    plain, shaped = _loader(dataset), _loader(dataset, [FirstTokens(2)])
    for _ in range(5):
        a, b = next(plain), next(shaped)
        assert torch.equal(a.input_ids, b.input_ids) and set(b.extras) == {"span", "row_key"}
        assert (b.labels[b.extras["span"]] == -100).all()
        assert torch.equal(b.labels[~b.extras["span"]], a.labels[~b.extras["span"]])
        assert b.num_label_tokens < a.num_label_tokens  # the loss's count is taken after the transform
        moved = b.to("meta")
        assert set(moved.extras) == {"span", "row_key"} and moved.extras["span"].device.type == "meta"
    plain.close(), shaped.close()


def test_fields_depend_on_the_row_alone_so_resume_and_world_size_see_the_same(dataset) -> None:
    straight = _loader(dataset, [FirstTokens(1)])
    batches = [next(straight) for _ in range(8)]
    resumed = _loader(dataset, [FirstTokens(1)])
    for _ in range(3):
        next(resumed)
    state = resumed.state_dict()
    again = _loader(dataset, [FirstTokens(1)])
    again.load_state_dict(state)
    for want in batches[3:]:
        got = next(again)
        assert torch.equal(got.labels, want.labels) and torch.equal(got.extras["span"], want.extras["span"])
    # Two ranks of the same stream: rank r's rows are the single rank's rows of its share, fields included.
    ranks = [_loader(dataset, [FirstTokens(1)], rank=r, world=2) for r in range(2)]
    for step in range(2):
        for r, loader in enumerate(ranks):
            got, want = next(loader), batches[2 * step + r]
            assert torch.equal(got.extras["row_key"], want.extras["row_key"])
            assert torch.equal(got.extras["span"], want.extras["span"]) and torch.equal(got.labels, want.labels)
    for loader in (straight, resumed, again, *ranks):
        loader.close()


def test_the_transforms_are_part_of_the_resume_fingerprint(dataset) -> None:
    saved = _loader(dataset, [FirstTokens(2)])
    next(saved)
    state = saved.state_dict()
    assert state["stream"]["transforms"] == [{"name": "first-tokens", "n": 2}]
    for other in ([], [FirstTokens(3)]):
        with pytest.raises(LoaderStateError, match="another data stream"):
            _loader(dataset, other).load_state_dict(state)
    plain = _loader(dataset)
    assert "transforms" not in plain.state_dict()["stream"]  # states saved before transforms existed still load
    saved.close()


def test_a_transform_may_not_replace_the_tokens(dataset) -> None:
    class Bad(FirstTokens):
        def __call__(self, fields, rows):
            return {"input_ids": fields["input_ids"]}

    with pytest.raises(ValueError, match="may not replace"):
        next(_loader(dataset, [Bad(1)]))


def test_a_registered_packer_is_valid_in_a_recipe_without_a_schema_edit() -> None:
    from slimtrain.data.config import DataConfig
    from slimtrain.data.packing import PACKERS

    data = {"sources": [{"type": "python-stdlib"}], "tokenizer": {"train": {"vocab_size": 300}}, "seq_len": 16}
    with pytest.raises(ValueError, match="unknown packer 'reverse-bfd'"):
        DataConfig.model_validate({**data, "packer": "reverse-bfd"})
    PACKERS.register("reverse-bfd")(PACKERS.get("bfd"))
    try:
        assert DataConfig.model_validate({**data, "packer": "reverse-bfd"}).packer == "reverse-bfd"
    finally:
        PACKERS._items.pop("reverse-bfd")


def test_a_transform_must_be_the_one_registered_under_its_name() -> None:
    """Its name stands for it in loader states: build_loader refuses an unregistered or impostor transform."""
    from slimtrain.core.transforms import TRANSFORMS
    from slimtrain.data.errors import DataError
    from slimtrain.data.pipeline import _check_registered

    with pytest.raises(DataError, match="register it with slimtrain.core.transforms.TRANSFORMS.register"):
        _check_registered([FirstTokens(1)])
    TRANSFORMS.register("first-tokens")(FirstTokens)
    try:
        _check_registered([FirstTokens(1)])

        class Impostor(FirstTokens):
            pass

        with pytest.raises(DataError, match="not the one registered as 'first-tokens'"):
            _check_registered([Impostor(1)])
    finally:
        TRANSFORMS._items.pop("first-tokens")
