"""Document sources: the built-in `python-stdlib` corpus, local files and Hub datasets via HF `datasets`.

A `DocumentSource` yields the non-empty documents of one recipe source in a deterministic order and
counts what it skipped. `check()` validates the input before any shard is written (files exist, UTF-8,
text field present), so bad input fails fast and leaves nothing behind.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any, Iterator

from slimtrain.data.config import FilesSource, HubSource, PythonStdlibSource, SourceConfig
from slimtrain.data.errors import SourceError

_FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow"}
_BUILDER = {"jsonl": "json", "parquet": "parquet", "text": "text", "arrow": "arrow"}
_BATCH = 1024  # rows per `datasets` batch: amortises per-row Python overhead


class DocumentSource:
    """One recipe source. `documents()` yields non-empty texts; `skipped` counts the rest by reason."""

    def __init__(self, cfg: SourceConfig, index: int) -> None:
        self.cfg = cfg
        self.where = f"data.sources[{index}]"
        self.skipped: dict[str, int] = {"empty": 0, "undecodable": 0}

    @property
    def label(self) -> str:
        """A short human name (used in directory names and stats)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Hex digest that changes whenever the documents could change."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise SourceError for input that cannot be read, before any work starts."""

    def approx_chars(self) -> int | None:
        """About how many characters the source holds (for progress bars), None when unknown."""
        return None

    def _raw(self) -> Iterator[Any]:
        raise NotImplementedError

    def documents(self) -> Iterator[str]:
        """Non-empty documents in a deterministic order, at most `max_documents` of them."""
        self.skipped = {"empty": 0, "undecodable": 0}
        limit = self.cfg.max_documents
        produced = 0
        for text in self._raw():
            if text is None or not text or text.isspace():
                self.skipped["empty"] += 1  # an empty document would only add a lone EOS
                continue
            yield text
            produced += 1
            if limit is not None and produced >= limit:
                return


def digest(parts: Any) -> str:
    """Hex sha256 of `parts` serialised as canonical JSON: the fingerprint of a set of settings."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def stdlib_files() -> tuple[Path, ...]:
    """Every `.py` file of this interpreter's standard library (no site/dist-packages), sorted by path."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages")]  # never walk installed packages
        rel = os.path.relpath(directory, root)
        found += [(Path(rel, f).as_posix() if rel != "." else f, os.path.join(directory, f)) for f in files
                  if f.endswith(".py")]
    return tuple(Path(path) for _, path in sorted(found))


class StdlibSource(DocumentSource):
    """The interpreter's standard library sources: real, varied, present on every machine."""

    @property
    def label(self) -> str:
        return "python-stdlib"

    def fingerprint(self) -> str:
        files = stdlib_files()
        return digest([sys.version, [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]])

    def approx_chars(self) -> int | None:
        return sum(p.stat().st_size for p in stdlib_files())

    def _raw(self) -> Iterator[str]:
        for path in stdlib_files():
            try:
                yield path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                self.skipped["undecodable"] += 1  # a few test fixtures are latin-1 on purpose


def resolve_paths(patterns: list[str], where: str) -> list[Path]:
    """Files matched by `patterns` (paths or globs), sorted and de-duplicated; an unmatched pattern is an error."""
    files: set[Path] = set()
    for pattern in patterns:
        matched = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
        matched = [p for p in matched if p.is_file()]
        if not matched:
            raise SourceError(
                f"{where}.paths: {pattern!r} matches no file (working directory {os.getcwd()}); "
                "fix the path or glob, or remove it from `paths`"
            )
        files.update(p.resolve() for p in matched)
    return sorted(files)


def check_utf8(path: Path, where: str) -> None:
    """Raise SourceError naming the line and byte of the first invalid UTF-8 sequence in `path`."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(
                    f"{path}: line {lineno}, byte {e.start + 1} is not valid UTF-8 ({line[e.start:e.start + 1]!r}) "
                    f"in {where}; re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or remove it "
                    "from `paths`"
                ) from None


def _missing_field(what: str, field: str, columns: list[str], where: str) -> SourceError:
    return SourceError(
        f"{what}: has no field {field!r} ({where}.text_field); the fields that exist are {sorted(columns)}; "
        f"set `text_field` to one of them"
    )


class FilesDocumentSource(DocumentSource):
    """Local jsonl / parquet / text / arrow files, read one at a time so errors name the file."""

    cfg: FilesSource

    @property
    def label(self) -> str:
        return Path(self.cfg.paths[0].split("*")[0] or "files").stem or "files"

    def files(self) -> list[Path]:
        return resolve_paths(self.cfg.paths, self.where)

    def format_of(self, path: Path) -> str:
        if self.cfg.format != "auto":
            return self.cfg.format
        fmt = _FORMAT_BY_SUFFIX.get(path.suffix.lower())
        if fmt is None:
            raise SourceError(
                f"{path}: cannot tell the format from the extension {path.suffix!r} ({self.where}.format is auto); "
                f"set `format` to one of jsonl, parquet, text, arrow"
            )
        return fmt

    def fingerprint(self) -> str:
        files = self.files()
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns, self.format_of(p)) for p in files]
        return digest([stats, self.cfg.text_field])

    def approx_chars(self) -> int | None:
        return sum(p.stat().st_size for p in self.files())

    def _open(self, path: Path) -> Any:
        import datasets  # heavy import: only when a file source is used

        datasets.disable_progress_bars()
        return datasets.load_dataset(
            _BUILDER[self.format_of(path)], data_files=[str(path)], split="train", streaming=True
        )

    def _field(self, path: Path) -> str:
        return "text" if self.format_of(path) == "text" else self.cfg.text_field

    def check(self) -> None:
        for path in self.files():
            if self.format_of(path) in ("jsonl", "text"):
                check_utf8(path, self.where)
            columns = self._open(path).column_names
            field = self._field(path)
            if columns is not None and field not in columns:
                raise _missing_field(str(path), field, columns, self.where)

    def _raw(self) -> Iterator[Any]:
        for path in self.files():
            field = self._field(path)
            try:
                for batch in self._open(path).select_columns([field]).iter(batch_size=_BATCH):
                    yield from _texts(batch[field], path, field)
            except SourceError:
                raise
            except Exception as e:  # datasets/pyarrow parse errors do not name the file
                raise SourceError(f"{path}: cannot be read as {self.format_of(path)} ({e}); fix or remove the file") from e


def _texts(values: list[Any], what: Any, field: str) -> Iterator[Any]:
    for value in values:
        if value is not None and not isinstance(value, str):
            raise SourceError(
                f"{what}: field {field!r} holds {type(value).__name__}, not text; point `text_field` at a "
                "string column"
            )
        yield value


class HubDocumentSource(DocumentSource):
    """A Hub dataset via `datasets.load_dataset`, streamed when `streaming` is set."""

    cfg: HubSource

    @property
    def label(self) -> str:
        return self.cfg.name.replace("/", "--")

    def fingerprint(self) -> str:
        c = self.cfg
        return digest([c.name, c.subset, c.split, c.revision, c.text_field])

    def _open(self) -> Any:
        import datasets

        c = self.cfg
        try:
            return datasets.load_dataset(c.name, c.subset, split=c.split, revision=c.revision, streaming=c.streaming)
        except Exception as e:
            raise SourceError(
                f"{self.where}: cannot load Hub dataset {c.name!r} (subset={c.subset!r}, split={c.split!r}): {e}; "
                "check the name, subset and split, and that this machine is online (or use a `files` source)"
            ) from e

    def check(self) -> None:
        columns = self._open().column_names
        if columns is not None and self.cfg.text_field not in columns:
            raise _missing_field(f"Hub dataset {self.cfg.name!r}", self.cfg.text_field, columns, self.where)

    def _raw(self) -> Iterator[Any]:
        field = self.cfg.text_field
        for batch in self._open().select_columns([field]).iter(batch_size=_BATCH):
            yield from _texts(batch[field], f"Hub dataset {self.cfg.name!r}", field)


def open_source(cfg: SourceConfig, index: int) -> DocumentSource:
    """The DocumentSource for one recipe source config."""
    if isinstance(cfg, PythonStdlibSource):
        return StdlibSource(cfg, index)
    if isinstance(cfg, FilesSource):
        return FilesDocumentSource(cfg, index)
    if isinstance(cfg, HubSource):
        return HubDocumentSource(cfg, index)
    raise TypeError(f"unknown source config {type(cfg).__name__}")
