"""Shared helpers of the QAT tests: a tiny model with the qat plugin applied and briefly trained."""

from __future__ import annotations

import torch

from slimtrain.modules.plugin_registry import build_plugins, validate_plugin_config
from slimtrain.modules.transformer import ModelConfig, Transformer

TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   max_seq_len=32, attention="eager")


def qat_model(block: dict, cfg: ModelConfig = TINY, steps: int = 3, seed: int = 0):
    """(model, plugin): `block` is a recipe's qat item; the model takes `steps` AdamW steps with fake-quant on."""
    [plugin] = build_plugins([validate_plugin_config({"type": "qat", **block})])
    torch.manual_seed(seed)
    model = Transformer(cfg)
    plugin.apply(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        plugin.set_step(step)
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=g)
        logits = model(ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    plugin.set_step(steps)
    return model.eval(), plugin
