"""Tokenizers: load any local Hugging Face tokenizer, or train a byte-level BPE with HF `tokenizers`.

Whatever the origin, the tokenizer is normalised into a directory written by `save_pretrained`
(`TokenizerInfo.tokenizer_dir`), which `transformers.AutoTokenizer` loads and export copies. Nothing in it is
changed but an EOS token the recipe names (`data.tokenizer.eos_token`): its special tokens, added tokens and chat
template (`chat_template.jinja`, or `chat_template` in tokenizer_config.json) reach the export as they were.

How a document becomes token ids (the convention a released checkpoint was trained with, e.g. for continued
pretraining from its own tokenizer):
- its text is encoded without special tokens, then
- BOS is prepended when the tokenizer's own encoding adds one (`tokenizer(text)` starts with `bos_token`: Llama 3's
  `<|begin_of_text|>` and Mistral's `<s>`, added by tokenizer.json's post-processor or `add_bos_token`), and not
  otherwise (Qwen2/2.5/3 have no BOS; SmolLM, GPT-2 and the BPE trained here do not add theirs).
  `data.tokenizer.add_bos: true/false` overrides;
- EOS (`eos_token`: Llama 3 base `<|end_of_text|>`, Qwen and SmolLM `<|endoftext|>`, Mistral `</s>`) is always
  appended, whether or not the tokenizer appends one: it is what separates packed documents. An instruct
  checkpoint's eos_token is its end-of-turn (`<|eot_id|>`, `<|im_end|>`); set `data.tokenizer.eos_token` to the
  base model's end-of-text for plain documents.
- Padding uses `pad_token`, else EOS (padding is masked out of the loss; the tokenizer is not given a pad token).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from slimtrain.data.errors import TokenizerError

EOS, BOS, PAD = "<|endoftext|>", "<|bos|>", "<|pad|>"
# Special tokens a bare tokenizer.json commonly uses for end-of-document, most specific first.
_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|im_end|>")


@dataclass(frozen=True)
class TokenizerInfo:
    """A loaded tokenizer and the ids the pipeline needs."""

    hf: "object"  # transformers.PreTrainedTokenizerFast (typed loosely: importing transformers is slow)
    tokenizer_dir: Path
    hash: str
    eos_id: int
    bos_id: int | None
    pad_id: int
    add_bos: bool = False  # whether every document starts with BOS (resolved: see the module docstring)

    @property
    def vocab_size(self) -> int:
        """Number of ids including added special tokens (what the embedding table must hold)."""
        return len(self.hf)  # type: ignore[arg-type]

    def to_json(self) -> str:
        """The fast tokenizer serialised, for worker processes."""
        return self.hf.backend_tokenizer.to_str()  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""
        return self.hf.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens included."""
        return self.hf.decode(list(ids))  # type: ignore[attr-defined]


def tokenizer_hash(hf: object) -> str:
    """sha256 of the serialised tokenizer and its special tokens: equal hashes give equal token ids."""
    h = hashlib.sha256(hf.backend_tokenizer.to_str().encode())  # type: ignore[attr-defined]
    # A missing pad token counts as EOS (the pipeline pads with it): the hashes of tokenizers saved when the pad token
    # was set to EOS, and of the caches and checkpoints that recorded them, stay what they were.
    pad = hf.pad_token if hf.pad_token is not None else hf.eos_token  # type: ignore[attr-defined]
    h.update(repr((hf.eos_token, hf.bos_token, pad)).encode())  # type: ignore[attr-defined]
    return h.hexdigest()


def tokenizer_hash_of(path: Path, where: str) -> str:
    """`tokenizer_hash` of the tokenizer saved at `path` (a tokenizer directory or tokenizer.json)."""
    return tokenizer_hash(_load_hf(path, where))


def check_tokenizer_path(path: Path, where: str) -> None:
    """TokenizerError when the local tokenizer `path` does not exist."""
    if not path.exists():
        raise TokenizerError(
            f"{where}: {str(path)!r} does not exist; point it at a tokenizer.json or a tokenizer directory, or use "
            "`train: {vocab_size: N}` (or `slimtrain data tokenizer`) to train one"
        )


def _load_hf(path: Path, where: str) -> object:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    check_tokenizer_path(path, where)
    if path.is_dir() and not (path / "tokenizer_config.json").exists() and (path / "tokenizer.json").exists():
        path = path / "tokenizer.json"
    try:
        if path.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except Exception as e:
        raise TokenizerError(f"{where}: cannot load a tokenizer from {str(path)!r}: {e}") from e
    if not getattr(hf, "is_fast", False):
        raise TokenizerError(
            f"{where}: {str(path)!r} holds a slow (Python) tokenizer; save it with a tokenizer.json "
            "(`AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(dir)`)"
        )
    return hf


def _resolve_eos(hf: object, eos_token: str | None, where: str) -> int:
    if eos_token is not None:
        hf.eos_token = eos_token  # type: ignore[attr-defined]
    elif hf.eos_token is None:  # type: ignore[attr-defined]
        vocab = hf.get_vocab()  # type: ignore[attr-defined]
        found = next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if found is None:
            raise TokenizerError(
                f"{where}: the tokenizer declares no EOS token; set `data.tokenizer.eos_token` to the token "
                "that ends a document (e.g. '<|endoftext|>' or '</s>')"
            )
        hf.eos_token = found  # type: ignore[attr-defined]
    eos_id = hf.convert_tokens_to_ids(hf.eos_token)  # type: ignore[attr-defined]
    if eos_id is None or hf.convert_ids_to_tokens(eos_id) != hf.eos_token:  # type: ignore[attr-defined]
        raise TokenizerError(
            f"{where}: EOS token {hf.eos_token!r} is not in the vocabulary; set `data.tokenizer.eos_token` "  # type: ignore[attr-defined]
            "to a token that is"
        )
    return int(eos_id)


def tokenizer_size(path: Path, where: str = "data.tokenizer.path") -> int:
    """Number of ids (added tokens included) of the local tokenizer at `path`, without caching a copy."""
    return len(_load_hf(Path(path).expanduser(), where))  # type: ignore[arg-type]


def tokenizer_adds_bos(hf: object) -> bool:
    """Whether the tokenizer's own encoding (special tokens on, as the model was trained) starts a text with BOS."""
    bos_id = hf.bos_token_id  # type: ignore[attr-defined]
    if bos_id is None:
        return False
    probe = "a"  # any text: a post-processor or add_bos_token adds BOS to every one
    plain = hf.encode(probe, add_special_tokens=False)  # type: ignore[attr-defined]
    full = hf.encode(probe, add_special_tokens=True)  # type: ignore[attr-defined]
    return full[:1] == [bos_id] and plain[:1] != [bos_id]


def _resolve_add_bos(hf: object, add_bos: bool | None, where: str) -> bool:
    """`add_bos` as the recipe sets it, else (None) the tokenizer's own convention (`tokenizer_adds_bos`)."""
    if add_bos is None:
        return tokenizer_adds_bos(hf)
    if add_bos and hf.bos_token_id is None:  # type: ignore[attr-defined]
        raise TokenizerError(
            f"{where}: data.tokenizer.add_bos is true but the tokenizer has no BOS token; set add_bos: false "
            "(or leave it unset: the tokenizer's own convention) or use a tokenizer that declares bos_token"
        )
    return add_bos


def load_tokenizer(
    path: Path, *, cache_dir: Path, eos_token: str | None = None, add_bos: bool | None = None,
    where: str = "data.tokenizer.path",
) -> TokenizerInfo:
    """Load a local tokenizer and save a normalised copy under `cache_dir/tokenizers/<hash>`.

    `add_bos`: None follows the tokenizer (BOS when its own encoding adds one), True/False forces it."""
    hf = _load_hf(Path(path).expanduser(), where)
    eos_id = _resolve_eos(hf, eos_token, where)
    starts_with_bos = _resolve_add_bos(hf, add_bos, where)
    # A tokenizer without a pad token keeps none (its export is the checkpoint's); padding is masked out, EOS will do.
    pad_id = hf.pad_token_id if hf.pad_token is not None else eos_id  # type: ignore[attr-defined]
    bos_id = hf.bos_token_id  # type: ignore[attr-defined]
    digest = tokenizer_hash(hf)
    out = Path(cache_dir) / "tokenizers" / digest[:16]
    if not (out / "tokenizer.json").exists():
        _atomic_save(hf, out)
    return TokenizerInfo(hf=hf, tokenizer_dir=out, hash=digest, eos_id=eos_id, bos_id=bos_id, pad_id=int(pad_id),
                         add_bos=starts_with_bos)


def _atomic_save(hf: object, out: Path) -> None:
    """save_pretrained into a temporary sibling, then rename: an interrupted save leaves no half directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf.save_pretrained(str(tmp))  # type: ignore[attr-defined]
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "tokenizer.json").exists():  # lost a race with another process: theirs is equal
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _capped(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    used = 0
    for text in texts:
        if used >= max_bytes:
            return
        yield text
        used += len(text)


def train_bpe(
    texts: Iterable[str], vocab_size: int, out_dir: Path, *, min_frequency: int = 2, max_bytes: int = 200_000_000,
    progress: bool = True,
) -> Path:
    """Train a byte-level BPE (EOS, BOS, PAD specials) and save it where AutoTokenizer loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + 3:
        raise TokenizerError(f"vocab_size={vocab_size} is below 259 (256 bytes + 3 specials); raise --vocab-size")
    tok = Tokenizer(models.BPE())
    # Byte-level: every string is representable, and decode(encode(x)) == x exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(_capped(texts, max_bytes), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=BOS, pad_token=PAD)
    out_dir = Path(out_dir)
    _atomic_save(hf, out_dir)
    return out_dir
