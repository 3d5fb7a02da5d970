"""Tokenizer training/loading, the `slimtrain data` commands, the python-stdlib source and the config schema."""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

import pytest
import yaml
from data_helpers import make_docs, write_jsonl
from pydantic import BaseModel, ValidationError

from slimtrain.data.cli import add_commands
from slimtrain.data.config import DataConfig, PythonStdlibSource
from slimtrain.data.errors import TokenizerError
from slimtrain.data.sources import open_source, stdlib_files
from slimtrain.data.tokenizer import load_tokenizer

TRICKY = "def f(x):\n\treturn x  # naïve café — 東京 🙂\r\n\x00\u200b  trailing  "


def test_trained_bpe_round_trips_and_loads_with_autotokenizer(tokenizer_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(hf) == 320 and hf.eos_token == "<|endoftext|>" and hf.pad_token == "<|pad|>"
    assert hf.decode(hf.encode(TRICKY, add_special_tokens=False)) == TRICKY
    info = load_tokenizer(tokenizer_dir, cache_dir=tmp_path)
    assert (info.vocab_size, info.eos_id, info.bos_id, info.pad_id) == (320, 0, 1, 2)
    assert AutoTokenizer.from_pretrained(str(info.tokenizer_dir)).encode(TRICKY) == info.encode(TRICKY)


def test_bare_tokenizer_json_without_eos_needs_eos_token(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.add_tokens(["hello"])
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"declares no EOS token; set `data.tokenizer.eos_token`"):
        load_tokenizer(tmp_path / "tokenizer.json", cache_dir=tmp_path / "c")
    assert load_tokenizer(tmp_path / "tokenizer.json", cache_dir=tmp_path / "c", eos_token="hello").eos_id == 0
    with pytest.raises(TokenizerError, match=r"does not exist.*train"):
        load_tokenizer(tmp_path / "missing", cache_dir=tmp_path / "c")


def _cli(argv: list[str]) -> int:
    def load_data_config(recipe: str, overrides: list[str]) -> DataConfig:
        data = yaml.safe_load(Path(recipe).read_text())["data"]
        for item in overrides:  # `data.a=b` on top-level data fields, enough for these tests
            key, value = item.split("=", 1)
            data[key.removeprefix("data.")] = yaml.safe_load(value)
        return DataConfig(**data)

    parser = argparse.ArgumentParser(prog="slimtrain data")
    add_commands(parser.add_subparsers(dest="cmd", required=True), load_data_config)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_tokenizer_then_prepare_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_jsonl(tmp_path / "c" / "a.jsonl", [{"body": t} for t in make_docs(120)])
    out = tmp_path / "tok"
    assert _cli(["tokenizer", "--source", str(tmp_path / "c" / "*.jsonl"), "--text-field", "body",
                 "--vocab-size", "300", "--no-progress", str(out)]) == 0
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(out))) == 300
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {
        "sources": [{"type": "files", "paths": [str(corpus)], "text_field": "body"}],
        "tokenizer": {"path": str(out)}, "seq_len": 64, "cache_dir": str(tmp_path / "cache"), "num_workers": 1,
    }}))
    assert _cli(["prepare", str(recipe), "data.seq_len=32", "--no-progress"]) == 0
    assert "120 docs" in capsys.readouterr().out
    assert _cli(["stats", str(recipe), "--json", "--no-progress"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["packing"]["utilization"] > 0.9 and stats["counts"]["documents"] == 120


def test_python_stdlib_source_is_sorted_complete_and_subsettable() -> None:
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and "os.py" in rel and "json/__init__.py" in rel
    assert not any("site-packages" in r or "dist-packages" in r for r in rel)
    src = open_source(PythonStdlibSource(type="python-stdlib", max_documents=5), 0)
    docs = list(src.documents())
    assert docs == list(src.documents())
    expected = []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            expected.append(text)
    assert docs == expected[:5]


def _walk_fields(model: type[BaseModel], path: str = "data") -> list[str]:
    missing = []
    for name, field in model.model_fields.items():
        if not field.description:
            missing.append(f"{path}.{name}")
        for arg in getattr(field.annotation, "__args__", ()) + (field.annotation,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                missing += _walk_fields(arg, f"{path}.{name}")
    return missing


def test_every_config_field_has_a_description() -> None:
    from slimtrain.data.config import FilesSource, HubSource

    assert _walk_fields(DataConfig) + _walk_fields(FilesSource) + _walk_fields(HubSource) == []


def test_config_errors_name_field_and_fix() -> None:
    base = {"sources": [{"type": "python-stdlib"}], "seq_len": 64}
    with pytest.raises(ValidationError, match=r"set exactly one of `path`.*`train"):
        DataConfig(**base, tokenizer={})
    with pytest.raises(ValidationError, match=r"weight is set on some sources but not on sources \[1\]"):
        DataConfig(sources=[{"type": "python-stdlib", "weight": 1}, {"type": "python-stdlib"}], seq_len=8,
                   tokenizer={"train": {"vocab_size": 300}})
    with pytest.raises(ValidationError, match=r"packer"):
        DataConfig(**base, tokenizer={"train": {"vocab_size": 300}}, packer="bdf")
    with pytest.raises(ValidationError, match=r"sources\.0\.python-stdlib\.text_field"):
        DataConfig(sources=[{"type": "python-stdlib", "text_field": "x"}], seq_len=8,
                   tokenizer={"train": {"vocab_size": 300}})
