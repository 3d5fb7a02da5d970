"""What the decoder is called with (`ModelInputs`) and what it returns (`TransformerOutput`).

Plugins see both: `Plugin.model_inputs` may change the inputs (embeddings spliced in, hidden states of
chosen layers requested, loss targets re-laid), and `Plugin.losses` reads the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from slimtrain.core.documents import Documents


@dataclass
class Splice:
    """Embeddings that replace the token embeddings at `mask`'s positions.

    mask: [B, S] bool. embeds: [N, H], one row per True position of `mask`, in row-major order
    (`mask.nonzero()` order), in any float dtype (cast to the model's compute dtype).
    """

    mask: torch.Tensor
    embeds: torch.Tensor


@dataclass
class ModelInputs:
    """One forward's inputs. Exactly one of `input_ids` and `inputs_embeds` is set.

    input_ids [B, S]; inputs_embeds [B, S, H] (used as they are: no token embedding);
    position_ids [B, S] (default 0..S-1 per row); doc_ids: the document layout (see Transformer.forward);
    splice: embeddings put in place of some token embeddings (with input_ids);
    hidden_layers: layers whose output hidden states to return in `TransformerOutput.layer_hidden`;
    with_logits: False skips the LM head (the chunked loss applies it itself);
    labels [B, S]: the LM loss's targets (-100 ignored) — not given to the model. A plugin that re-lays
    the sequence re-lays these too; the number of label tokens must stay the batch's (mask labels in a
    batch transform, where the count is taken).
    """

    input_ids: torch.Tensor | None = None
    inputs_embeds: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    doc_ids: "torch.Tensor | Documents | None" = None
    splice: Splice | None = None
    hidden_layers: tuple[int, ...] = ()
    with_logits: bool = True
    labels: torch.Tensor | None = None

    @classmethod
    def of(cls, batch: Any, with_logits: bool = True) -> "ModelInputs":
        """The inputs a `Batch` stands for, before any plugin changes them. doc_ids is the layout found on the
        host when the batch moved (none for rows of one document each, varlen boundaries ready for packed
        rows), so the forward never waits on the device to learn it."""
        return cls(input_ids=batch.input_ids, position_ids=batch.position_ids, doc_ids=batch.attention_documents,
                   with_logits=with_logits, labels=batch.labels)

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `Transformer.forward`."""
        return {"input_ids": self.input_ids, "inputs_embeds": self.inputs_embeds, "position_ids": self.position_ids,
                "doc_ids": self.doc_ids, "splice": self.splice, "hidden_layers": self.hidden_layers,
                "with_logits": self.with_logits}

    def requesting(self, *layers: int) -> "ModelInputs":
        """These inputs, also asking for the output hidden states of `layers` (negative counts from the end)."""
        return replace(self, hidden_layers=tuple(sorted(set(self.hidden_layers) | set(layers))))


@dataclass
class TransformerOutput:
    """One forward's outputs.

    logits: [B, S, V] in the compute dtype (None when the caller applies the head itself, e.g. the
        chunked loss).
    hidden_states: the final normed hidden states [B, S, H] (the LM head's input).
    last_hidden: the last layer's output before the final norm [B, S, H].
    layer_hidden: layer index (as requested, negative allowed) -> that layer's output hidden states.
    aux: what layers computed for the loss and for metrics (router logits, expert loads): name -> one
        tensor per layer that produced it, in layer order.
    """

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    last_hidden: torch.Tensor | None = None
    layer_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    aux: dict[str, list[torch.Tensor]] = field(default_factory=dict)
