"""Typed errors of the data pipeline. Each message names the file or field, the bad value and the fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input or state (a source, a tokenizer, shards, a loader state) the user can act on."""


class SourceError(DataError):
    """A source cannot be read: missing files, invalid UTF-8, a missing text field."""


class TokenizerError(DataError):
    """A tokenizer cannot be loaded, trained or used with the recipe (no EOS, vocab too large for the dtype)."""


class ShardError(DataError):
    """Token shards on disk are missing, truncated, corrupted or were built for other settings."""


class LoaderStateError(DataError):
    """A loader state cannot be restored into this loader (other data, packer or sequence length)."""
