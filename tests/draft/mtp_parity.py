"""transformers' own MTP path against ours, for an mtp/ export: shared by the dense and the MoE export tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimtrain.modules.draft.base import BaseView
from slimtrain.modules.transformer.generate import greedy_generate


def check_transformers_mtp(model: nn.Module, hf_class: type, directory: Path, mtp_layers: list[int]) -> None:
    """`hf_class` (a transformers CausalLM class) loads `directory` with `mtp_layers` listed as its MTP layers
    (what the released classes list for their own depth); transformers' `MtpModel` then computes our MTP modules'
    logits, and its `generate(use_mtp=True)` gives our greedy tokens."""
    from transformers.modeling_layers import MtpModel

    class WithMtp(hf_class):
        _keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{i}\..*" for i in mtp_layers]

    hf = WithMtp.from_pretrained(directory, attn_implementation="eager").eval()
    mtp = MtpModel.from_pretrained(hf).eval()
    n = 12
    ids = torch.randint(0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(ids)
        hidden = hf(ids, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(hidden, ours.hidden_states, atol=1e-5, rtol=0)
        view = BaseView(model, ids, torch.zeros_like(ids), torch.arange(n)[None], None, ours.hidden_states,
                        ours.last_hidden)
        ours_k = [o.project(o.features) for o in model.draft["mtp"].draft_outputs(view)]
        h, pos = hidden, torch.arange(n)[None]
        for k, layer in enumerate(mtp.layers):  # layer k reads tokens t + k + 1 and the previous layer's output
            shifted = torch.zeros_like(ids)
            shifted[:, : n - k - 1] = ids[:, k + 1:]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            h = layer(mtp.embed_tokens(shifted), h, mtp.rotary_emb(h, pos), mask, pos, None)
            torch.testing.assert_close(mtp._project_to_logits(h)[0, : n - k - 1], ours_k[k][0, : n - k - 1],
                                       atol=1e-4, rtol=0)
        drafted = hf.generate(ids, max_new_tokens=16, use_mtp=True, do_sample=False)
        assert torch.equal(drafted, greedy_generate(model, ids, 16))
