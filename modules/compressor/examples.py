"""The compressor's training examples, cut from packed token rows on the data side (a batch transform).

Each document segment of a row is cut, front to back, into examples: a context span of up to C tokens and the
up to T tokens that follow it in the same document. A reconstruction example (drawn with probability
`reconstruction_fraction`, per example, seeded by the row's key) drops the continuation and targets the context
itself. Nothing crosses a document: a segment too short for a context and two target tokens gives none.

The decoder row is re-laid, examples packed from its start: each example's V + 1 vector slots (its compressed
context, then the `<Rec>` / `<Cont>` task vector; V without task vectors), then its target tokens, as one attention document with
positions 0, 1, ...; the labels follow (the task slot predicts the first target token); the rest of the row is
padding. An example whose slots and target would overflow the row is shortened or dropped: the row never spills.

Fields (all [B, S]; the layouts are fixed on the host, so the forward never waits on the device):
    ctx_ids, ctx_span: the encoder's input: each context span's tokens where they sat in the row, span id (the
        example's number in the row) on its slots, -1 elsewhere (`Spans.from_span_ids`).
    ctx_task: REC or CONT on each context span's slots (-1 elsewhere).
    dec_ids, dec_pos, dec_doc: the decoder row (vector slots hold token 0, replaced by the splice; doc -1 pads).
    dec_vec: True on the vector slots (task slots included), in the compressor's output order.
    labels (replacing the batch's): the decoder row's targets.
    gap_dec: continuation tokens 1 .. t-1 as targets in the decoder row (what L_comp and L_none are measured on);
    gap_full, full_doc, full_pos: the same targets in the original row, each example's context and continuation as
        one document (L_full: the decoder reading the context tokens themselves).
    rec_dec: the reconstruction examples' targets in the decoder row (teacher-forced reconstruction accuracy).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping, Sequence

import torch

from slimtrain.core.sentinels import IGNORE_INDEX
from slimtrain.core.transforms import TRANSFORMS

from .projector import CONT, REC

PAD = -1


def vectors_per_context(tokens: int, factor: int | None, count: int | None, memory: int | None) -> int:
    """Compressed vectors of a context span of `tokens` tokens (without the task vector)."""
    if memory is not None:
        return memory
    if count is not None:
        return min(tokens, count)
    return math.ceil(tokens / factor)


@TRANSFORMS.register("compressor-examples")
class CompressorExamples:
    """The batch transform (see the module docstring). `identity()` is part of the loader's resume fingerprint."""

    name = "compressor-examples"

    def __init__(self, context_tokens: int, continuation_tokens: int, min_context_tokens: int,
                 reconstruction_fraction: float, factor: int | None, count: int | None, memory: int | None,
                 task_vectors: bool = True) -> None:
        self.context, self.continuation, self.min_context = context_tokens, continuation_tokens, min_context_tokens
        self.task_vectors = task_vectors
        self.rec_fraction = reconstruction_fraction
        self.factor, self.count, self.memory = factor, count, memory

    def identity(self) -> dict[str, Any]:
        return {"context": self.context, "continuation": self.continuation, "min_context": self.min_context,
                "rec_fraction": self.rec_fraction, "factor": self.factor, "count": self.count, "memory": self.memory,
                "task_vectors": self.task_vectors}

    def slots(self, context: int) -> int:
        """Vector slots of an example whose context has `context` tokens (its task vector included)."""
        return vectors_per_context(context, self.factor, self.count, self.memory) + int(self.task_vectors)

    def __call__(self, fields: Mapping[str, torch.Tensor], rows: Sequence[int | None]) -> dict[str, torch.Tensor]:
        ids, docs = fields["input_ids"], fields["doc_ids"]
        b, s = ids.shape
        out = {name: torch.full((b, s), PAD, dtype=torch.long) for name in
               ("ctx_ids", "ctx_span", "ctx_task", "dec_doc", "full_doc")}
        out["ctx_ids"].zero_()
        out.update({name: torch.zeros((b, s), dtype=torch.long) for name in ("dec_ids", "dec_pos", "full_pos")})
        out.update({name: torch.zeros((b, s), dtype=torch.bool) for name in ("dec_vec", "gap_dec", "gap_full",
                                                                               "rec_dec")})
        out["labels"] = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
        for row, key in enumerate(rows):
            if key is not None:
                self._row(ids[row].tolist(), docs[row].tolist(), self._generator(key), {k: v[row] for k, v in out.items()})
        return out

    def _generator(self, key: int) -> torch.Generator:
        digest = hashlib.sha256(json.dumps([self.identity(), key], sort_keys=True).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def _row(self, ids: list[int], docs: list[int], gen: torch.Generator, out: dict[str, torch.Tensor]) -> None:
        cursor, example = 0, 0  # the next free slot of the decoder row; the example's number in the row
        for start, end in _segments(docs):
            pos = start
            while True:
                plan = self._plan(end - pos, len(ids) - cursor, gen)
                if plan is None:
                    break
                context, target_len, rec = plan
                self._write(ids, pos, context, target_len, rec, cursor, example, out)
                cursor += self.slots(context) + target_len
                pos += context + (0 if rec else target_len)
                example += 1

    def _plan(self, left: int, room: int, gen: torch.Generator) -> tuple[int, int, bool] | None:
        """(context tokens, target tokens, reconstruction?) of the next example, or None when none fits: `left`
        tokens remain in the document segment, `room` slots in the decoder row."""
        if left < self.min_context + 2:
            return None
        context = min(self.context, left - 2)
        rec = bool(torch.rand((), generator=gen) < self.rec_fraction)
        target = context if rec else min(self.continuation, left - context)
        target = min(target, room - self.slots(context))
        if target < 2:  # a continuation needs a token beyond the task slot's to be measured
            return None
        return context, target, rec

    def _write(self, ids: list[int], pos: int, context: int, target_len: int, rec: bool, cursor: int,
               example: int, out: dict[str, torch.Tensor]) -> None:
        span = slice(pos, pos + context)
        out["ctx_ids"][span] = torch.tensor(ids[pos:pos + context])
        out["ctx_span"][span] = example
        out["ctx_task"][span] = REC if rec else CONT
        slots = self.slots(context)
        target = ids[pos:pos + target_len] if rec else ids[pos + context:pos + context + target_len]
        row = slice(cursor, cursor + slots + target_len)
        out["dec_doc"][row] = example
        out["dec_pos"][row] = torch.arange(slots + target_len)
        out["dec_vec"][cursor:cursor + slots] = True
        first = cursor + slots
        out["dec_ids"][first:first + target_len] = torch.tensor(target)
        # The task slot predicts the first target token, each target token the next; the last has none.
        out["labels"][first - 1:first + target_len - 1] = torch.tensor(target)
        if rec:
            out["rec_dec"][first - 1:first + target_len - 1] = True
            return
        out["gap_dec"][first:first + target_len - 1] = True  # targets 1 .. t-1, also predictable without context
        whole = slice(pos, pos + context + target_len)
        out["full_doc"][whole] = example
        out["full_pos"][whole] = torch.arange(context + target_len)
        out["gap_full"][pos + context:pos + context + target_len - 1] = True


def _segments(docs: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of one document id (padding, -1, excluded)."""
    runs, start = [], 0
    for i in range(1, len(docs) + 1):
        if i == len(docs) or docs[i] != docs[start]:
            if docs[start] >= 0:
                runs.append((start, i))
            start = i
    return runs
