"""Execution options that must not change the numbers: activation checkpointing and compiled blocks."""

from __future__ import annotations

from typing import Callable

import torch

from slimtrain.modules.transformer import Transformer


def _loss_and_grads(model: Transformer, ids: torch.Tensor, doc_ids: torch.Tensor, pos: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(ids, position_ids=pos, doc_ids=doc_ids).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(packed: Callable, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = [packed([20, 30, 14], 64), packed([64], 64)]  # two documents and padding, then one full row
    doc_ids = torch.stack([r[0] for r in rows])
    pos = torch.stack([r[1] for r in rows])
    ids = torch.randint(0, vocab, doc_ids.shape, generator=torch.Generator().manual_seed(0))
    return ids, doc_ids, pos


def test_activation_checkpointing_gives_identical_gradients(make_model: Callable, packed: Callable) -> None:
    ids, doc_ids, pos = _batch(packed, 123)
    for attention in ("eager", "sdpa"):
        ref, recomputed = make_model(attention=attention).train(), make_model(attention=attention).train()
        recomputed.set_activation_checkpointing()
        loss_ref, grads_ref = _loss_and_grads(ref, ids, doc_ids, pos)
        loss, grads = _loss_and_grads(recomputed, ids, doc_ids, pos)
        assert torch.equal(loss, loss_ref)
        assert grads.keys() == grads_ref.keys() and all(torch.equal(grads[k], grads_ref[k]) for k in grads)


def test_compiled_blocks_match_eager(make_model: Callable, packed: Callable) -> None:
    """Dense, int4-LSQ and ternary-with-int8-activations QAT models, compiled with activation checkpointing,
    over two steps (the LSQ one calibrates its step sizes in the first forward)."""
    from slimtrain.modules.plugin_registry import build_plugins, validate_plugin_config

    from torch._dynamo.utils import counters

    counters.clear()
    ids, doc_ids, pos = _batch(packed, 123)
    qat = {"type": "qat", "weights": {"format": "int", "bits": 4, "group_size": 32}, "estimator": "lsq"}
    ternary = {"type": "qat", "weights": {"format": "ternary"}, "kernels": "torch",
               "activations": {"format": "int", "bits": 8, "granularity": "token"}}
    for block in (None, qat, ternary):
        models = []
        for compiled in (False, True):
            model = make_model(attention="sdpa").train()
            for plugin in build_plugins([validate_plugin_config(block)]) if block else []:
                plugin.apply(model)
                plugin.set_step(1)
            if compiled:
                keys = list(model.state_dict())
                model.set_activation_checkpointing()
                model.compile_blocks()
                assert list(model.state_dict()) == keys  # checkpoints and exports see the same names
            models.append(model)
        for _ in range(2):
            (loss_ref, grads_ref), (loss, grads) = (_loss_and_grads(m, ids, doc_ids, pos) for m in models)
            torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-5)
            assert grads.keys() == grads_ref.keys()
            for name in grads:
                torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
            for m, g in zip(models, (grads_ref, grads)):
                with torch.no_grad():
                    for n, p in m.named_parameters():
                        p -= 0.1 * g[n]  # a plain SGD step, so the second round sees moved weights
    assert counters["stats"]["unique_graphs"] >= 1  # something was compiled, not all left to eager
