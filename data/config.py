"""The `data:` block of a recipe: sources, tokenizer, shards and packing (pydantic v2, extra="forbid").

Every field carries a description: it is the recipe reference (docs/data.md is generated from the same
text by hand). Errors raised here name the field, the value and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: float | None = Field(
        None,
        gt=0,
        description="Share of this source in the training token stream, relative to the other sources' weights "
        "(e.g. 0.7 and 0.3). Leave unset on every source to use each document exactly once per epoch "
        "(natural proportions); set it on every source or on none.",
    )
    max_documents: int | None = Field(
        None, ge=1, description="Use only the first N non-empty documents of this source (quick runs, tests)."
    )


class PythonStdlibSource(_Source):
    """Every `.py` file of the running interpreter's standard library, one document per file."""

    type: Literal["python-stdlib"] = Field(description="Built-in corpus: the Python standard library sources.")


class FilesSource(_Source):
    """Local files read with Hugging Face `datasets` (jsonl, parquet, text, arrow)."""

    type: Literal["files"] = Field(description="Local files read with Hugging Face `datasets`.")
    paths: list[str] = Field(
        min_length=1,
        description="Files or glob patterns (`data/*.jsonl`, `corpus/**/*.parquet`); relative paths are taken "
        "from the working directory. Matched files are read in sorted order.",
    )
    format: Literal["auto", "jsonl", "parquet", "text", "arrow"] = Field(
        "auto",
        description="File format; `auto` picks it from the extension (.jsonl/.json, .parquet, .txt, .arrow). "
        "`text` makes every line a document.",
    )
    text_field: str = Field("text", description="Column (jsonl key) holding the document text.")


class HubSource(_Source):
    """A Hugging Face Hub dataset (needs network access at prepare time)."""

    type: Literal["hub"] = Field(description="A dataset from the Hugging Face Hub.")
    name: str = Field(description="Hub dataset name, e.g. `HuggingFaceFW/fineweb-edu`.")
    subset: str | None = Field(None, description="Dataset configuration (subset) name, if the dataset has several.")
    split: str = Field("train", description="Split to read.")
    revision: str | None = Field(
        None, description="Git revision (branch, tag or commit) to pin; recommended for reproducible shards."
    )
    streaming: bool = Field(
        True, description="Stream the dataset instead of downloading it whole first (use for large datasets)."
    )
    text_field: str = Field("text", description="Column holding the document text.")


SourceConfig = Annotated[Union[PythonStdlibSource, FilesSource, HubSource], Field(discriminator="type")]


class TrainTokenizerConfig(BaseModel):
    """Train a byte-level BPE on the recipe's sources when it is not in the cache yet."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(
        ge=260, le=1 << 22, description="Vocabulary size including the 3 special tokens (eos, bos, pad)."
    )
    max_train_bytes: int = Field(
        200_000_000,
        ge=1,
        description="Train on at most this much text, shared between the sources by weight (equally when "
        "unweighted), each read from its beginning (BPE statistics saturate long before a large corpus ends).",
    )
    min_frequency: int = Field(2, ge=1, description="A pair must occur at least this often to be merged.")


class TokenizerConfig(BaseModel):
    """Which tokenizer turns text into token ids: a local one (`path`) or one trained here (`train`)."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = Field(
        None,
        description="A local Hugging Face tokenizer: a `tokenizer.json` file or a directory that "
        "`transformers.AutoTokenizer.from_pretrained` loads.",
    )
    train: TrainTokenizerConfig | None = Field(
        None, description="Train a byte-level BPE on the sources instead (cached under `cache_dir`)."
    )
    add_bos: bool | None = Field(
        None,
        description="Start every document with the BOS token. Unset: as the tokenizer's own encoding does (Llama 3's "
        "`<|begin_of_text|>`, Mistral's `<s>`; none for Qwen, SmolLM, GPT-2 or a BPE trained here). Every document "
        "ends with EOS.",
    )
    eos_token: str | None = Field(
        None,
        description="EOS token string, for a bare tokenizer.json that does not declare one "
        "(e.g. `<|endoftext|>` or `</s>`).",
    )
    fast_encode: bool = Field(
        True,
        description="Encode GPT-2-style byte-level BPE tokenizers with slimtrain's exact fast path (ASCII text "
        "split in Python, words cached, BPE by the tokenizer's own model: the same ids as HF, ~4x faster); "
        "other tokenizers always use HF's encoder. `false` forces HF's encoder everywhere.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "TokenizerConfig":
        if (self.path is None) == (self.train is None):
            raise ValueError(
                "data.tokenizer: set exactly one of `path` (a local tokenizer.json or directory) or "
                "`train: {vocab_size: N}` (train a byte-level BPE on the sources); setting one in a recipe "
                "that extends another, or on the command line, replaces the other"
            )
        return self


class BucketsConfig(BaseModel):
    """Dataset decomposition (`data.packer: buckets`, Pouransari et al. 2024): documents cut into pieces whose
    lengths are powers of two from `min_len` to `data.seq_len` (the longest bucket), every optimizer step
    drawing rows of one length from one bucket, global_batch_size x seq_len / length of them, in the order
    a length curriculum gives."""

    model_config = ConfigDict(extra="forbid")

    min_len: int = Field(
        64,
        ge=1,
        description="The shortest bucket's row length, a power of two at most data.seq_len. A document's last "
        "piece shorter than this (its length mod min_len) is padded into a row of min_len or dropped (`remainder`).",
    )
    curriculum: Literal["grow", "short_to_long", "weighted"] = Field(
        "grow",
        description="Which bucket each step draws from, within each cycle: `grow` the paper's Grow-P2 (each step "
        "draws bucket i of B, shortest i = 0, with probability proportional to 2^(B-1-i) x its steps in the cycle, "
        "among the buckets with steps left, so short rows come early and long ones late), `short_to_long` every "
        "step of the shortest bucket first, then the next longer, `weighted` like grow with the odds `weights`. "
        "Every piece is used once per epoch whatever the curriculum.",
    )
    weights: list[float] | None = Field(
        None,
        description="`curriculum: weighted` only: the odds of each bucket, shortest first, one per length from "
        "min_len to data.seq_len (e.g. [1, 1, 1] for uniform sampling over three lengths); each above 0.",
    )
    cycles: int = Field(
        1,
        ge=1,
        description="Curriculum cycles per epoch: each bucket's steps are split into this many equal parts and "
        "the curriculum runs over each part in turn. Raise it for runs much shorter than an epoch (`slimtrain data "
        "stats RECIPE --global-batch-size G` prints an epoch's steps) so that they go through whole cycles.",
    )
    remainder: Literal["pad", "drop"] = Field(
        "pad",
        description="A document's last piece shorter than min_len: `pad` trains on it in a padded row of the "
        "shortest bucket (every token once per epoch), `drop` leaves it out (no padding at all).",
    )

    @field_validator("min_len")
    @classmethod
    def _power_of_two(cls, n: int) -> int:
        if n & (n - 1):
            raise ValueError(f"data.buckets.min_len={n} is not a power of two; use {_pow2_near(n)}")
        return n

    @model_validator(mode="after")
    def _weights_with_weighted(self) -> "BucketsConfig":
        if (self.curriculum == "weighted") != (self.weights is not None):
            raise ValueError(
                f"data.buckets.weights={self.weights} with data.buckets.curriculum={self.curriculum}: weights go with "
                "`curriculum: weighted` and only with it; set both or neither"
            )
        if self.weights is not None and min(self.weights, default=0.0) <= 0:
            raise ValueError(
                f"data.buckets.weights={self.weights}: every weight must be above 0 (a bucket with weight 0 would "
                "never be drawn before the others run out); to leave short lengths out raise data.buckets.min_len"
            )
        return self

    def lengths(self, seq_len: int) -> list[int]:
        """The buckets' row lengths, shortest first: min_len, 2 min_len, ..., seq_len."""
        return [self.min_len << k for k in range(max(0, (seq_len // self.min_len).bit_length()))]


def _pow2_near(n: int) -> str:
    lower = 1 << (n.bit_length() - 1)
    return f"{lower} or {lower * 2}"


class DataConfig(BaseModel):
    """Sources, tokenizer, token shards and packing: the `data:` block of a recipe."""

    model_config = ConfigDict(extra="forbid")

    sources: list[SourceConfig] = Field(
        min_length=1, description="Document sources, each chosen by `type:` (python-stdlib, files, hub)."
    )
    tokenizer: TokenizerConfig = Field(description="The tokenizer: a local path, or `train:` a byte-level BPE.")
    seq_len: int = Field(ge=2, description="Tokens per packed row (the model's training context length).")
    packer: str = Field(
        "bfd",
        description="How documents become rows, a registered packer (slimtrain.data.packing.PACKERS): `bfd` "
        "best-fit decreasing (cuts only documents longer than seq_len), `concat` concatenate-and-chunk (the "
        "common baseline), `pad` one document per row, `buckets` dataset decomposition (power-of-two pieces, "
        "rows of one length per step, a length curriculum: see `buckets`).",
    )
    buckets: BucketsConfig = Field(
        default_factory=BucketsConfig,
        description="Settings of `packer: buckets` (ignored by the other packers); seq_len is the longest bucket.",
    )
    val_packer: str | None = Field(
        None,
        description="Packer of the validation rows (of seq_len), a registered packer other than `buckets`. Unset: "
        "the training packer, or `bfd` when that is `buckets`. Set it to compare runs with different packers on "
        "the same held-out rows.",
    )
    cache_dir: Path = Field(
        Path(".cache/slimtrain/data"),
        description="Where token shards and trained tokenizers go. Each source gets a sub-directory named "
        "after a fingerprint of its files and tokenization settings, so recipes that share them share shards.",
    )
    val_fraction: float = Field(
        0.005,
        gt=0.0,
        lt=0.5,
        description="Fraction of documents held out for validation, chosen by a hash of the document text "
        "(stable across runs, machines and worker counts). Above 0: every run ends with an evaluation.",
    )
    num_workers: int | None = Field(
        None, ge=1, description="Tokenizer worker processes for prepare; unset = number of CPU cores, at most 8."
    )
    shard_size_mb: float = Field(
        16.0, gt=0, description="Megabytes of UTF-8 text tokenized into one shard (the unit of parallel work)."
    )
    token_dtype: Literal["auto", "uint16", "uint32"] = Field(
        "auto", description="On-disk token dtype; `auto` = uint16 when the vocabulary fits in 65536 ids, else uint32."
    )
    mask_cross_doc_labels: bool = Field(
        True,
        description="Ignore (-100) the label that would predict the first token of the next document from the "
        "last token (EOS) of the previous one in a packed row.",
    )
    pack_buffer_docs: int = Field(
        1_000_000,
        ge=1,
        description="Documents packed together per packing buffer; larger buffers pack tighter (bfd).",
    )
    verify_checksums: bool = Field(
        True,
        description="Check every shard's sha256 against the manifest when data is opened (reads all shards "
        "once); sizes are always checked. Turn off for very large corpora once verified.",
    )

    @field_validator("packer")
    @classmethod
    def _registered_packer(cls, name: str) -> str:
        from slimtrain.data.packing import PACKERS

        PACKERS.get(name)  # an unknown name fails with the registered ones and the nearest
        return name

    @field_validator("val_packer")
    @classmethod
    def _val_packer(cls, name: str | None) -> str | None:
        from slimtrain.data.packing import PACKERS

        if name is None:
            return None
        PACKERS.get(name)
        if name == "buckets":
            raise ValueError("data.val_packer=buckets: evaluation reads rows of data.seq_len; choose bfd, concat or "
                             "pad (or leave it unset: bfd for a buckets run)")
        return name

    @model_validator(mode="after")
    def _bucket_lengths(self) -> "DataConfig":
        if self.packer != "buckets":
            return self
        n = self.seq_len
        if n & (n - 1):
            raise ValueError(f"data.seq_len={n} is not a power of two, and data.packer=buckets makes it the longest "
                             f"bucket; set data.seq_len to {_pow2_near(n)}")
        if self.buckets.min_len > n:
            raise ValueError(f"data.buckets.min_len={self.buckets.min_len} is above data.seq_len={n}, the longest "
                             f"bucket; set data.buckets.min_len to at most {n}")
        lengths = self.buckets.lengths(n)
        if self.buckets.weights is not None and len(self.buckets.weights) != len(lengths):
            raise ValueError(f"data.buckets.weights has {len(self.buckets.weights)} entries but the buckets are "
                             f"{len(lengths)} lengths {lengths}; give one weight per length, shortest first")
        return self

    def resolved_val_packer(self) -> str:
        """The validation rows' packer: `val_packer`, else the training packer (`bfd` for `buckets`)."""
        return self.val_packer or ("bfd" if self.packer == "buckets" else self.packer)

    @model_validator(mode="after")
    def _weights_all_or_none(self) -> "DataConfig":
        given = [s.weight is not None for s in self.sources]
        if any(given) and not all(given):
            missing = [i for i, g in enumerate(given) if not g]
            raise ValueError(
                f"data.sources: weight is set on some sources but not on sources {missing}; set `weight` on every "
                "source (relative shares) or on none (each document once per epoch)"
            )
        return self

    def resolved_num_workers(self) -> int:
        """`num_workers`, or the CPU count capped at 8 when unset."""
        return self.num_workers or max(1, min(8, os.cpu_count() or 1))
