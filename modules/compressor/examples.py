"""The compressor's training examples, cut from packed token rows on the data side (a batch transform).

Each document segment of a row is cut, front to back, into examples: a context span of up to C tokens and the
up to T tokens that follow it in the same document; with `prefix_tokens` > 0, a continuation example first reads
an uncompressed prefix of the same document's tokens before the span (its length drawn per example in
[0, prefix_tokens]). A reconstruction example (drawn with probability `reconstruction_fraction`, per example,
seeded by the row's key) drops the continuation and targets the context itself. Nothing crosses a document: a
segment too short for a context and two target tokens gives none.

The decoder row is re-laid, examples packed from its start: each example's prefix, its V + 1 vector slots (its
compressed context, then the `<Rec>` / `<Cont>` task vector; V without task vectors), then its target tokens, as
one attention document with positions 0, 1, ...; the labels follow (the task slot predicts the first target
token; the prefix is never a target); the rest of the row is padding. An example whose slots and target would
overflow the row is shortened or dropped: the row never spills.

Fields (all [B, S]; the layouts are fixed on the host, so the forward never waits on the device):
    ctx_ids, ctx_span: the encoder's input: each context span's tokens where they sat in the row, span id (the
        example's number in the row) on its slots, -1 elsewhere (`Spans.from_span_ids`).
    ctx_task: REC or CONT on each context span's slots (-1 elsewhere).
    dec_ids, dec_pos, dec_doc: the decoder row (vector slots hold token 0, replaced by the splice; doc -1 pads).
    dec_vec: True on the vector slots (task slots included), in the compressor's output order.
    labels (replacing the batch's): the decoder row's targets.
    gap_dec: continuation tokens 1 .. t-1 as targets in the decoder row (what L_comp is measured on).
    none_ids, none_pos, none_doc, gap_none: each continuation example without its context (its prefix, then the
        continuation) and the same targets there (L_none).
    gap_full, full_doc, full_pos: the same targets in the original row, each example's prefix, context and
        continuation as one document (L_full: the decoder reading the context tokens themselves).
    rec_dec: the reconstruction examples' targets in the decoder row (teacher-forced reconstruction accuracy).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping, NamedTuple, Sequence

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
                 task_vectors: bool = True, prefix_tokens: int = 0) -> None:
        self.context, self.continuation, self.min_context = context_tokens, continuation_tokens, min_context_tokens
        self.prefix = prefix_tokens
        self.task_vectors = task_vectors
        self.rec_fraction = reconstruction_fraction
        self.factor, self.count, self.memory = factor, count, memory

    def identity(self) -> dict[str, Any]:
        return {"context": self.context, "continuation": self.continuation, "min_context": self.min_context,
                "rec_fraction": self.rec_fraction, "factor": self.factor, "count": self.count, "memory": self.memory,
                "task_vectors": self.task_vectors, "prefix": self.prefix}

    def slots(self, context: int) -> int:
        """Vector slots of an example whose context has `context` tokens (its task vector included)."""
        return vectors_per_context(context, self.factor, self.count, self.memory) + int(self.task_vectors)

    def __call__(self, fields: Mapping[str, torch.Tensor], rows: Sequence[int | None]) -> dict[str, torch.Tensor]:
        ids, docs = fields["input_ids"], fields["doc_ids"]
        b, s = ids.shape
        out = {name: torch.full((b, s), PAD, dtype=torch.long) for name in
               ("ctx_ids", "ctx_span", "ctx_task", "dec_doc", "full_doc", "none_doc")}
        out["ctx_ids"].zero_()
        out.update({name: torch.zeros((b, s), dtype=torch.long) for name in ("dec_ids", "dec_pos", "full_pos",
                                                                               "none_ids", "none_pos")})
        out.update({name: torch.zeros((b, s), dtype=torch.bool) for name in ("dec_vec", "gap_dec", "gap_full",
                                                                               "gap_none", "rec_dec")})
        out["labels"] = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
        for row, key in enumerate(rows):
            if key is not None:
                mine = {k: v[row] for k, v in out.items()}
                self._row(ids[row].tolist(), docs[row].tolist(), self._generator(key), mine)
        return out

    def _generator(self, key: int) -> torch.Generator:
        # Seeded by the data-side settings alone: runs that differ only in pooling draw the same examples, so their
        # metrics are measured on the same held-out tokens.
        data = {k: v for k, v in self.identity().items() if k in ("context", "continuation", "min_context",
                                                                   "rec_fraction", "prefix")}
        digest = hashlib.sha256(json.dumps([data, key], sort_keys=True).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))

    def _row(self, ids: list[int], docs: list[int], gen: torch.Generator, out: dict[str, torch.Tensor]) -> None:
        cursor, example = 0, 0  # the next free slot of the decoder row; the example's number in the row
        for start, end in _segments(docs):
            pos = start
            while True:
                plan = self._plan(end - pos, len(ids) - cursor, gen)
                if plan is None:
                    break
                self._write(ids, pos, plan, cursor, example, out)
                cursor += plan.prefix + self.slots(plan.context) + plan.target
                pos += plan.prefix + plan.context + (0 if plan.rec else plan.target)
                example += 1

    def _plan(self, left: int, room: int, gen: torch.Generator) -> "Plan | None":
        """The next example, or None when none fits: `left` tokens remain in the document segment, `room` slots in
        the decoder row."""
        if left < self.min_context + 2:
            return None
        rec = bool(torch.rand((), generator=gen) < self.rec_fraction)
        prefix = 0
        if self.prefix and not rec:  # a continuation's uncompressed prefix, drawn in [0, prefix_tokens]
            prefix = min(int(torch.randint(0, self.prefix + 1, (), generator=gen)), left - self.min_context - 2)
        context = min(self.context, left - prefix - 2)
        target = context if rec else min(self.continuation, left - prefix - context)
        target = min(target, room - prefix - self.slots(context))
        if target < 2:  # a continuation needs a token beyond the task slot's to be measured
            return None
        return Plan(prefix, context, target, rec)

    def _write(self, ids: list[int], pos: int, plan: "Plan", cursor: int, example: int,
               out: dict[str, torch.Tensor]) -> None:
        p, context, target_len = plan.prefix, plan.context, plan.target
        at = pos + p  # the context span's first token in the row
        span = slice(at, at + context)
        out["ctx_ids"][span] = torch.tensor(ids[at:at + context])
        out["ctx_span"][span] = example
        out["ctx_task"][span] = REC if plan.rec else CONT
        slots = self.slots(context)
        target = ids[at:at + target_len] if plan.rec else ids[at + context:at + context + target_len]
        length = p + slots + target_len
        out["dec_doc"][cursor:cursor + length] = example
        out["dec_pos"][cursor:cursor + length] = torch.arange(length)
        out["dec_ids"][cursor:cursor + p] = torch.tensor(ids[pos:at])  # the prefix: read, never a target
        out["dec_vec"][cursor + p:cursor + p + slots] = True
        first = cursor + p + slots
        out["dec_ids"][first:first + target_len] = torch.tensor(target)
        # The task slot predicts the first target token, each target token the next; the last has none.
        out["labels"][first - 1:first + target_len - 1] = torch.tensor(target)
        if plan.rec:
            out["rec_dec"][first - 1:first + target_len - 1] = True
            return
        out["gap_dec"][first:first + target_len - 1] = True  # targets 1 .. t-1, also predictable without context
        # Without the context: the prefix then the continuation, packed in the row as the decoder row is.
        none = slice(cursor, cursor + p + target_len)
        out["none_doc"][none] = example
        out["none_pos"][none] = torch.arange(p + target_len)
        out["none_ids"][none] = torch.tensor(ids[pos:at] + target)
        out["gap_none"][cursor + p:cursor + p + target_len - 1] = True
        whole = slice(pos, at + context + target_len)  # with the context's own tokens: the original row
        out["full_doc"][whole] = example
        out["full_pos"][whole] = torch.arange(p + context + target_len)
        out["gap_full"][at + context:at + context + target_len - 1] = True


class Plan(NamedTuple):
    """One example: uncompressed prefix, context and target token counts; whether it is a reconstruction."""

    prefix: int
    context: int
    target: int
    rec: bool


def _segments(docs: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of one document id (padding, -1, excluded)."""
    runs, start = [], 0
    for i in range(1, len(docs) + 1):
        if i == len(docs) or docs[i] != docs[start]:
            if docs[start] >= 0:
                runs.append((start, i))
            start = i
    return runs
