"""Helpers shared by the attention tests: twin models under another backend, random packed layouts."""

from __future__ import annotations

import torch

from slimtrain.modules.transformer import Transformer


def with_backend(model: Transformer, name: str) -> Transformer:
    """The same weights under another attention backend."""
    twin = Transformer(model.cfg.model_copy(update={"attention": name}))
    twin.load_state_dict(model.state_dict())
    return twin.eval().to(next(model.parameters()).device, next(model.parameters()).dtype)


def random_layout(rows: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed rows: 1-4 documents, 0 to seq_len/4 trailing padding; the last row all padding."""
    doc_ids = torch.full((rows, seq_len), -1, dtype=torch.long)
    position_ids = torch.zeros(rows, seq_len, dtype=torch.long)
    for r in range(rows - 1):
        used = seq_len - int(torch.randint(0, seq_len // 4, (1,), generator=gen))
        num_docs = int(torch.randint(1, 5, (1,), generator=gen))
        cuts = (torch.randperm(used - 1, generator=gen)[: num_docs - 1] + 1).sort().values.tolist()
        for doc, (a, b) in enumerate(zip([0, *cuts], [*cuts, used])):
            doc_ids[r, a:b] = doc
            position_ids[r, a:b] = torch.arange(b - a)
    return doc_ids, position_ids
