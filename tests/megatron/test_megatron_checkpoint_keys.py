"""How the megatron backend's checkpoint code reads keys and nested state (no process group needed): a key names a
model tensor or an optimizer's state of it, chained or not; a fresh parameter's entries leave the state it loads,
lists included (the bf16 optimizer keeps its fp32 masters in lists of lists), and come back where they were."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.dist_checkpointing.mapping import ShardedTensor  # noqa: E402

from slimtrain.trainer.backends.megatron.checkpoint import (  # noqa: E402
    KEY, _dicts_as_lists, _lists_as_dicts, _put, _take_fresh,
)


@pytest.mark.parametrize("key, kind, name", [
    ("model.layers.0.attn.q_proj.weight", None, "layers.0.attn.q_proj.weight"),
    ("optimizer.state.exp_avg.model.embed.weight", "exp_avg", "embed.weight"),
    ("optimizer.state.fp32_param.model.layers.1.mlp.experts.gate_up", "fp32_param", "layers.1.mlp.experts.gate_up"),
    ("chained_1.optimizer.state.param.model.layers.1.mlp.experts.down", "param", "layers.1.mlp.experts.down"),
    ("model.draft.model.head.weight", None, "draft.model.head.weight"),  # a submodule called `model` stays in the name
])
def test_a_key_names_its_tensor_and_the_optimizer_state_kind(key: str, kind: str | None, name: str) -> None:
    match = KEY.match(key)
    assert match is not None and match["kind"] == kind and match["name"] == name


def test_a_key_of_another_kind_is_not_a_tensor_of_the_model() -> None:
    assert KEY.match("optimizer.distributed.dp_group_idx_0.param_groups") is None


def test_fresh_entries_leave_lists_and_dicts_and_come_back_in_place() -> None:
    def st(key: str, value: float) -> ShardedTensor:
        return ShardedTensor.from_rank_offsets(key, torch.full((2,), value))

    state = {"model": {"a": st("model.a", 1.0), "new": st("model.new", 2.0)},
             "optimizer": {"fp32_from_fp16_params": [[st("optimizer.state.fp32_param.model.a", 3.0),
                                                      st("optimizer.state.fp32_param.model.new", 4.0)]],
                           "param_groups": [{"lr": 0.1}]}}
    converted = _lists_as_dicts(state)
    assert converted == [("optimizer", "fp32_from_fp16_params"), ("optimizer", "fp32_from_fp16_params", 0)]
    assert state["optimizer"]["param_groups"] == [{"lr": 0.1}]  # no sharded tensor in it: left a list
    taken = _take_fresh(state, {"new"})
    assert [key for _, key, _ in taken] == ["model.new", "optimizer.state.fp32_param.model.new"]
    assert list(state["model"]) == ["a"] and list(state["optimizer"]["fp32_from_fp16_params"][0]) == [0]
    loaded = {"model": {"a": torch.ones(2)}, "optimizer": {"fp32_from_fp16_params": {0: {0: torch.ones(2) * 3}},
                                                           "param_groups": [{"lr": 0.1}]}}
    for path, _, tensor in taken:
        _put(loaded, path, tensor)
    _dicts_as_lists(loaded, converted)
    masters = loaded["optimizer"]["fp32_from_fp16_params"]
    assert isinstance(masters, list) and isinstance(masters[0], list)
    assert [float(t[0]) for t in masters[0]] == [3.0, 4.0] and float(loaded["model"]["new"][0]) == 2.0
