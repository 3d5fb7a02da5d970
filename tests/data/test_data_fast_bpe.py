"""The fast byte-level BPE path gives exactly HF's ids: on real source files, on adversarial text, in prepare."""

from __future__ import annotations

import json
import random

import pytest

from slimtrain.data.fast_bpe import FastByteLevelEncoder, supports
from slimtrain.data.sources import stdlib_files
# Characters whose class differs between regex engines or that sit at the edges of \s, \p{L}, \p{N}:
# ASCII controls 0x1c-0x1f (Python's str.isspace says yes, Unicode White_Space says no), NEL, NBSP,
# line/paragraph separators, ideographic space, non-ASCII digits and letters, combining marks, emoji.
ODD = ["\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\xa0", "\u2028", "\u2029", "\u3000", "\u200b", "\ufeff", "é", "ß",
       "ǅ", "١", "½", "²", "Ⅻ", "中", "文", "\u0301", "😀", "\U0001f3fd", "Ω", "µ", "ﬁ", "\ud7ff"]
PIECES = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "''", "' ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n",
          "\x0b", "\x0c", "def", " x", "x", "123", " 45", "_", "__init__", "#", "(", ")", "<|endoftext|>", "<|pad|>",
          "<|bos", "|>", "0x1F", "a1b2", "\n    ", "\nA", "\n9", "\n ", "\n\t"]


def _pairs(tok, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    fast = FastByteLevelEncoder(tok).encode_batch(texts)
    hf = tok.encode_batch_fast(texts, add_special_tokens=False)
    return [(f.tolist(), h.ids) for f, h in zip(fast, hf)]


@pytest.fixture(scope="module")
def stdlib_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A 1,000-token byte-level BPE trained by slimtrain on standard-library files with non-ASCII text in them."""
    from tokenizers import Tokenizer

    from slimtrain.data.tokenizer import train_bpe

    docs = [f.read_text(errors="replace") for f in stdlib_files()[::25]]
    out = train_bpe(docs, 1000, tmp_path_factory.mktemp("tok") / "bpe", progress=False)
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def test_trained_tokenizer_takes_the_fast_path(stdlib_tokenizer) -> None:
    assert supports(stdlib_tokenizer.to_str())


def test_equal_to_hf_on_standard_library_files(stdlib_tokenizer) -> None:
    texts = [f.read_text(errors="replace") for f in stdlib_files()]
    mixed = [t for t in texts if not t.isascii()]  # every file with non-ASCII text, plus a sample of the others
    sample = mixed + [t for t in texts if t.isascii()][::20]
    assert len(mixed) > 20
    for i, (fast, hf) in enumerate(_pairs(stdlib_tokenizer, sample)):
        assert fast == hf, f"document {i} differs"
    # Only the stretches around non-ASCII characters go through HF, not whole documents.
    encoder = FastByteLevelEncoder(stdlib_tokenizer)
    slow = sum(end - start for t in mixed for start, end, fast in encoder._pieces(t) if not fast)
    assert slow < 0.1 * sum(map(len, mixed))


def test_equal_to_hf_on_adversarial_text(stdlib_tokenizer) -> None:
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(128)] + ODD + PIECES * 3
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    texts += ["", "\n", " ", "x", "\nx", "é\nx", "é\n", "\né", "a\n\nb é", "  \nfoo é", "<|endoftext|>x é\nA"]
    for text, (fast, hf) in zip(texts, _pairs(stdlib_tokenizer, texts)):
        assert fast == hf, f"{text!r}: fast {fast} != HF {hf}"


def test_equal_to_hf_on_long_text_with_rare_cut_points(stdlib_tokenizer) -> None:
    """Non-ASCII characters thousands of characters away from the nearest cut point (a newline or an indent
    before a letter): the backward search for a cut runs over several windows."""
    rng = random.Random(1)
    common = ["abc", "(", ")", ",", "1", "'s", "x=y", "é", "中", ".", "-", "  "]
    rare = ["\nA", "\n    b", "\t9", "\xa0", "\n", " c"]
    texts = ["".join(rng.choice(rare) if rng.random() < 0.002 else rng.choice(common)
                     for _ in range(rng.randint(500, 4000))) for _ in range(150)]
    for text, (fast, hf) in zip(texts, _pairs(stdlib_tokenizer, texts)):
        assert fast == hf


def test_other_tokenizer_shapes_use_hf(stdlib_tokenizer) -> None:
    spec = json.loads(stdlib_tokenizer.to_str())
    changed = [
        {**spec, "normalizer": {"type": "NFC"}},
        {**spec, "pre_tokenizer": {**spec["pre_tokenizer"], "add_prefix_space": True}},
        {**spec, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
            {**spec["pre_tokenizer"], "use_regex": False}]}},
        {**spec, "model": {**spec["model"], "dropout": 0.1}},
    ]
    assert not any(supports(json.dumps(s)) for s in changed)


def test_prepare_writes_the_same_shards_either_way(data_config) -> None:
    from slimtrain.data.pipeline import prepare

    def shard_checksums(fast: bool) -> tuple[str, str, int]:
        cfg = data_config(cache_dir=data_config().cache_dir / str(fast))
        cfg = cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"fast_encode": fast})})
        prepared = prepare(cfg, progress=False)
        return prepared.train.fingerprint, prepared.val.fingerprint, prepared.train.num_tokens

    assert shard_checksums(True) == shard_checksums(False)


def test_added_token_that_could_match_the_stand_in(stdlib_tokenizer) -> None:
    """An added token "x" that strips the whitespace before it: it must not swallow a cut piece's newline."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(stdlib_tokenizer.to_str())
    tok.add_tokens([AddedToken("x", lstrip=True), AddedToken("\nq", special=True)])
    texts = ["é\nA", "é\tfoo bar", "é\n    foo", "中\nq é\nA", "plain x text é\nA"]
    for text, (fast, hf) in zip(texts, _pairs(tok, texts)):
        assert fast == hf, text


def test_truncation_and_padding_are_switched_off_in_prepare(stdlib_tokenizer) -> None:
    """A tokenizer.json saved with truncation or padding must not cut or pad documents."""
    from tokenizers import Tokenizer

    from slimtrain.data import encode

    text = "def f(x):\n    return x + 1  # é\n" * 20
    full = stdlib_tokenizer.encode(text, add_special_tokens=False).ids
    tok = Tokenizer.from_str(stdlib_tokenizer.to_str())
    tok.enable_truncation(max_length=8)
    tok.enable_padding(length=4096, pad_id=0)
    assert not supports(tok.to_str())
    for fast in (True, False):
        encode.init_worker(tok.to_str(), single_thread=False)
        assert list(encode.encode_ids([text], fast)[0]) == full


def test_long_non_ascii_text_without_cut_points_is_linear(stdlib_tokenizer) -> None:
    """No cut point in 300k characters of mixed text: one HF piece, found in one forward scan (this hung
    for minutes when every non-ASCII run searched to the end of the text)."""
    import time

    text = " ".join(["中文a"] * 100_000)
    encoder = FastByteLevelEncoder(stdlib_tokenizer)
    start = time.perf_counter()
    assert encoder._pieces(text) == [(0, len(text), False)]
    assert time.perf_counter() - start < 5.0
