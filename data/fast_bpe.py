"""An exact, faster encoder for GPT-2-style byte-level BPE tokenizers (the kind `slimtrain data tokenizer` trains).

HF `tokenizers` spends most of its time in the pre-tokenizer (an Oniguruma regex over a string that
tracks byte alignments), not in BPE. Since BPE runs on each pre-token ("word") independently, the ids of
a document are the concatenation of the ids of its words, and a word seen once never needs BPE again.
This module splits with Python's `re` and looks the words up in a per-process cache; a word not in the
cache goes through the tokenizer's own BPE model (`Tokenizer.model.tokenize`), so the merges are always
HF's.

Exactness rests on the split being the same as HF's. The GPT-2 pattern uses `\\s`, `\\p{L}` and `\\p{N}`,
whose membership outside ASCII differs between regex engines and Unicode versions, so the fast split is
used only on ASCII text, with the classes written out as the ASCII members of those properties. A document
with non-ASCII characters is cut at points where every engine agrees a pre-token ends (see `_CUT`): the
smallest pieces holding its non-ASCII characters go through HF, the ASCII rest takes the fast path.
Documents containing an added token's text (e.g. `<|endoftext|>`) go through HF whole, because HF
matches added tokens before pre-tokenizing.
"""

from __future__ import annotations

import array
import json
import re
from typing import Any

import numpy as np

# ASCII members of the GPT-2 pattern's classes: \s (White_Space), \p{L} (letters), \p{N} (numbers).
_WS = r"\t\n\x0b\x0c\r "
_ALNUM = "A-Za-z0-9"
# The GPT-2 pattern  's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+  over ASCII,
# with the optional space factored out (equivalent: no alternative can match a space itself).
_PATTERN = re.compile(
    rf"'(?:s|t|re|ve|m|ll|d)| ?(?:[A-Za-z]+|[0-9]+|[^{_WS}{_ALNUM}]+)|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
# Token boundaries every engine agrees on (no pre-token spans them, whatever \s, \p{L}, \p{N} mean beyond
# ASCII): after \t \n \v \f \r before an ASCII letter/digit, and after ASCII whitespace before a space
# that precedes an ASCII letter/digit. A piece cut there is encoded with a stand-in for what follows
# ("x" or " x": the same classes), whose ids are then dropped.
_CUT = re.compile(r"[\t\n\x0b\x0c\r](?=[A-Za-z0-9])|[\t\n\x0b\x0c\r ](?= [A-Za-z0-9])")  # a cut at each match's end
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
assert array.array("I").itemsize == 4, "uint32 ids are packed as C unsigned int"
_MAX_CACHE = 2_000_000  # words; cleared when exceeded so memory stays bounded on huge corpora


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (bytes that print stay themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_ASCII_TO_BYTE_LEVEL = {b: c for b, c in _byte_level_alphabet().items() if b < 128}


def supports(tokenizer_json: str) -> bool:
    """Whether `tokenizer_json` is a byte-level BPE whose encoding this module reproduces exactly:
    no normalizer, the GPT-2 regex ByteLevel pre-tokenizer without a prefix space, a BPE model without dropout,
    and neither truncation nor padding (prepare switches both off: documents are never cut or padded)."""
    spec = json.loads(tokenizer_json)
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    return (
        spec.get("normalizer") is None
        and spec.get("truncation") is None
        and spec.get("padding") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and model.get("type") == "BPE"
        and not model.get("dropout")
    )


def _next_cut(text: str, start: int) -> int:
    """The first cut point at or after `start` (the end of the text if none)."""
    m = _CUT.search(text, start)
    return m.end() if m else len(text)


def _last_cut(text: str, floor: int, end: int) -> int:
    """The last cut point in [floor, end] (`floor` if none), scanning back from `end` in growing windows."""
    hi, step = end, 1024
    while hi > floor:
        lo = max(floor, hi - step)
        cuts = [m.end() for m in _CUT.finditer(text, lo, min(hi + 2, end))]  # +2: the pattern's lookahead
        cuts = [c for c in cuts if c <= hi]
        if cuts:
            return cuts[-1]
        hi, step = lo, step * 2
    return floor


class _WordCache(dict):
    """ASCII word -> its ids (packed uint32) from the BPE model, computed on first use."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self._model = model

    def __missing__(self, word: str) -> bytes:
        if len(self) >= _MAX_CACHE:
            self.clear()
        ids = [t.id for t in self._model.tokenize(word.translate(_ASCII_TO_BYTE_LEVEL))]
        packed = self[word] = array.array("I", ids).tobytes()
        return packed


class FastByteLevelEncoder:
    """Encodes documents to uint32 id arrays equal to `tokenizer.encode_batch_fast(texts, add_special_tokens=False)`."""

    def __init__(self, tokenizer: Any) -> None:  # tokenizers.Tokenizer
        self._tok = tokenizer
        # Read once: the worker's tokenizer never changes after this (see data/encode.py).
        self._added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        self._cache = _WordCache(tokenizer.model)
        self._stand_in = {"": b"", "x": self._cache["x"], " x": self._cache[" x"]}

    def _ascii_ids(self, text: str) -> bytes:
        return b"".join(map(self._cache.__getitem__, _PATTERN.findall(text)))

    def _hf_ids(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def _pieces(self, text: str) -> list[tuple[int, int, bool]]:
        """(start, end, fast) pieces of a non-ASCII document: the smallest stretches between cut points that hold
        its non-ASCII characters (for HF), and the ASCII stretches between them."""
        slow: list[list[int]] = []
        for m in _NON_ASCII.finditer(text):
            if slow and m.start() < slow[-1][1]:  # inside the previous piece, which ends at a cut after it
                continue
            hi = _next_cut(text, m.end())
            floor = slow[-1][1] if slow else 0
            lo = _last_cut(text, floor, m.start())
            if slow and lo == floor:
                slow[-1][1] = hi
            else:
                slow.append([lo, hi])
        pieces, pos = [], 0
        for lo, hi in slow:
            if pos < lo:
                pieces.append((pos, lo, True))
            pieces.append((lo, hi, False))
            pos = hi
        if pos < len(text):
            pieces.append((pos, len(text), True))
        return pieces

    def _mixed_ids(self, text: str) -> np.ndarray:
        """A document with non-ASCII characters: its ASCII pieces fast, the rest through HF, joined."""
        parts: list[bytes] = []
        slow: list[tuple[int, str, bytes]] = []  # (index in parts, piece + stand-in, stand-in ids)
        for start, end, fast in self._pieces(text):
            follow = "" if end == len(text) else (" x" if text[end] == " " else "x")
            tail = self._stand_in[follow]
            if fast:
                ids = self._ascii_ids(text[start:end] + follow)
                parts.append(ids[: len(ids) - len(tail)])
            else:
                piece = text[start:end] + follow
                if any(a in piece for a in self._added):  # an added token could match across the stand-in
                    return self._hf_ids([text])[0]
                slow.append((len(parts), piece, tail))
                parts.append(b"")
        for (i, _, tail), ids in zip(slow, self._hf_ids([piece for _, piece, _ in slow])):
            raw = ids.tobytes()
            if not raw.endswith(tail):
                return self._hf_ids([text])[0]  # the stand-in was not split off as expected: never guess
            parts[i] = raw[: len(raw) - len(tail)]
        return np.frombuffer(b"".join(parts), dtype=np.uint32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (no special tokens added), as uint32 arrays."""
        out: list[np.ndarray] = []
        for text in texts:
            if any(a in text for a in self._added):
                out.append(self._hf_ids([text])[0])
            elif text.isascii():
                out.append(np.frombuffer(self._ascii_ids(text), dtype=np.uint32))
            else:
                out.append(self._mixed_ids(text))
        return out
