"""Pipeline parallelism of our `Transformer` for megatron-core's schedules (1F1B, and interleaved: `chunk_views`).

Each stage keeps a contiguous run of the decoder layers; the embedding stays on the first stage, the final norm and
the head on the last (the other stages' norm is a parameter-free identity: their output is the residual stream). A layer another stage holds is replaced by `SkippedLayer` (no parameters, the residual stream
passed through), so every parameter keeps its global name (`layers.11.attn.q_proj.weight` on the second of two
stages of a 12-layer model) and checkpoints and exports need no renaming. The model is built whole from the seed
(or imported) and cut afterwards, so that each stage holds the single-device model's weights.

Between stages megatron-core's p2p communication carries [seq, batch, hidden] tensors (its layout): our hidden
states ([batch, seq, hidden]) are transposed on the way out and back on the way in. Every stage reads the same
micro-batches (the positions and document ids shape each stage's attention); the last computes the loss with the
trainer's own loss function.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from slimtrain.data.batch import Batch
from slimtrain.modules.transformer.io import ModelInputs


class SkippedLayer(nn.Module):
    """A decoder layer held by another pipeline stage: the residual stream passes through unchanged."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Any) -> tuple[torch.Tensor, dict]:
        return x, {}


def stage_layers(num_layers: int, stage: int, stages: int) -> range:
    """The layers stage `stage` of `stages` holds (equal contiguous runs; the layer count divides by `stages`)."""
    per = num_layers // stages
    return range(stage * per, (stage + 1) * per)


def held_stages(rank: int, ranks: int, chunks: int) -> list[int]:
    """The (virtual) stages pipeline rank `rank` of `ranks` holds, one per model chunk: with interleaving (`chunks`
    > 1) rank r holds stages r, r + ranks, r + 2 ranks, ... (megatron's interleaved order)."""
    return [c * ranks + rank for c in range(chunks)]


def cut(model: nn.Module, held: list[int], stages: int) -> None:
    """Keep only the part of `model` its (virtual) stages `held` of `stages` hold, in place: their layers, the
    embedding with stage 0, the final norm and the head with the last stage."""
    kept = {i for stage in held for i in stage_layers(len(model.layers), stage, stages)}
    for i in range(len(model.layers)):
        if i not in kept:
            model.layers[i] = SkippedLayer()
    if 0 not in held:
        model.embed = None
        if model.lm_head is not None and model.cfg.tie_embeddings:
            # This stage's head weight is a copy of the first stage's embedding (its gradient summed with the
            # embedding's by megatron's finalize_model_grads): the embedding's optimizer group, counted once in the
            # gradient norm (megatron skips parameters marked `shared`).
            model.lm_head.is_embedding = True
            model.lm_head.weight.shared = True
    if stages - 1 not in held:  # the final norm and the head are the last stage's (the others' outputs skip them)
        model.norm = nn.Identity()
        model.lm_head = None


def chunk_views(model: nn.Module, held: list[int], stages: int) -> list[nn.Module]:
    """One module per held stage, each running that stage's part of `model` (already `cut` to `held`). They share
    `model`'s own submodules, so every parameter stays `model`'s (its names, checkpoints, the optimizer's view);
    a view only skips what the other chunks compute."""
    if len(held) == 1:
        return [model]
    views = []
    for stage in held:
        view = copy.copy(model)  # shallow: the same config, buffers and submodule objects
        view._modules = dict(model._modules)
        view.layers = nn.ModuleList(list(model.layers))
        cut(view, [stage], stages)
        views.append(view)
    return views


def row_slice(batch: Batch, start: int, stop: int) -> Batch:
    """Rows [start, stop) of `batch` (its extras too where they are per row); the document layout is found again."""
    rows = batch.input_ids.shape[0]
    cut_rows = lambda t: t[start:stop] if t.dim() and t.shape[0] == rows else t  # noqa: E731
    return Batch(input_ids=batch.input_ids[start:stop], labels=batch.labels[start:stop],
                 position_ids=batch.position_ids[start:stop], doc_ids=batch.doc_ids[start:stop],
                 extras={k: cut_rows(v) for k, v in batch.extras.items()})


class StageModule(nn.Module):
    """What megatron's schedule runs: the stage's model, and the activation received from the previous stage."""

    def __init__(self, model: nn.Module, first: bool, last: bool) -> None:
        from megatron.core.enums import ModelType

        super().__init__()
        # What megatron's schedules and gradient finalisation ask a model: its type, whether it holds the
        # embedding (pre_process) or the head (post_process), whether the two share a weight (then the first and the
        # last stage each hold a copy, their gradients summed by megatron's finalize_model_grads).
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process = first, last
        self.share_embeddings_and_output_weights = bool(model.cfg.tie_embeddings)
        self.model = model
        self.first, self.last = first, last
        self.received: torch.Tensor | None = None

    def shared_embedding_or_output_weight(self) -> torch.Tensor | None:
        """megatron's hook for tied embeddings across stages: the copy this stage holds (embedding or head)."""
        if self.first:
            return self.model.embed.weight
        return self.model.lm_head.weight if self.last else None

    def set_input_tensor(self, tensor: torch.Tensor | list | None) -> None:
        """megatron's hook: the previous stage's output ([seq, batch, hidden]), None on the first stage."""
        if isinstance(tensor, (list, tuple)):
            tensor = tensor[0]
        self.received = None if tensor is None else tensor.transpose(0, 1)

    def forward(self, batch: Any) -> torch.Tensor:
        """A first or middle stage's output for megatron's p2p: the residual stream after its layers."""
        kwargs = self._kwargs(batch, with_logits=False)
        return self.model(**kwargs).last_hidden.transpose(0, 1).contiguous()

    def _kwargs(self, batch: Any, with_logits: bool) -> dict[str, Any]:
        kwargs = ModelInputs.of(batch, with_logits).model_kwargs()
        if not self.first:
            kwargs.pop("input_ids")
            kwargs["inputs_embeds"] = self.received
        return kwargs


class LastStageView:
    """The last stage as the trainer's loss function sees a model: called with a batch's model inputs, it runs on the
    received activation instead of the token ids; `module` is the model itself (for its head)."""

    def __init__(self, stage: StageModule) -> None:
        self.stage = stage
        self.module = stage.model

    def __call__(self, **kwargs: Any) -> Any:
        if not self.stage.first:
            kwargs.pop("input_ids", None)
            kwargs["inputs_embeds"] = self.stage.received
        return self.stage.model(**kwargs)


def forward_step_func(loss_fn: Callable, norm: float, device: torch.device, sums: dict[str, Any]) -> Callable:
    """megatron's `forward_step_func(data_iterator, model)`: a stage's forward; on the last stage the trainer's loss
    (its token-loss sum and terms added into `sums`), which megatron divides by the micro-batch count."""

    def step(data_iterator: Any, model: nn.Module) -> tuple[torch.Tensor, Callable]:
        from megatron.core.utils import get_attr_wrapped_model

        batch = next(data_iterator).to(device)
        stage = get_attr_wrapped_model(model, "set_input_tensor", return_model_obj=True)
        if not stage.last:
            return stage(batch), _as_is
        loss, token_loss_sum, terms = loss_fn(LastStageView(stage), batch, norm)
        sums["loss"] = sums.get("loss", 0.0) + token_loss_sum.detach().double()
        for name, value in terms.items():
            sums.setdefault("terms", {})[name] = sums.get("terms", {}).get(name, 0.0) + value.detach().double()
        return loss, _as_is

    return step


def _as_is(output: torch.Tensor) -> tuple[torch.Tensor, dict]:
    return output, {}
