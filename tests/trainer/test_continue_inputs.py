"""Continued pretraining from a released checkpoint's own files: its tokenizer's BOS/EOS conventions reach the token
shards, its chat template and special tokens reach the export, weights of any dtype and sharding import exactly,
pickle weights are refused, and a tokenizer larger than the embedding is refused before launch.

Everything is built here, without downloads: tiny byte-level BPEs in the conventions of Llama 3, Qwen, SmolLM and
Mistral, and tiny random models made by transformers next to them (embedding rows padded to a multiple of 64, as
Qwen pads its 151,665 tokens to 151,936 rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from slimtrain.modules.hf_adapters import get_adapter
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import Transformer
from slimtrain.modules.transformer.hf_config import model_config_from_hf
from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.export.importer import check_init_from_hf, import_hf, read_hf_state

TEXTS = [
    "def add(x, y):\n    return x + y\n",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "naïve café — 東京 🙂 tabs\tand  double  spaces\n\n",
    "import os\nprint(os.getcwd())  # where am I?\n",
    "class Point:\n    def __init__(self, x: float) -> None:\n        self.x = x\n",
] * 8
DOCS = ["Hello world!  Two spaces, a tab\tand 42 digits.", "def f():\n    return 'ünïcödé' + \"東京\"\n", "x"]
SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")  # Llama 3's pre-tokenizer regex
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] | trim }}<|eot_id|>{% endfor %}")
MISTRAL_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Hello! "}]

# Each family's tokenizer conventions. pre: "split" (Llama 3 / Qwen regex + byte level), "gpt2" (byte level, the
# exact fast path of data/fast_bpe.py), "spm" (Mistral's sentencepiece-style BPE with byte fallback).
# template_in: where the checkpoint keeps its chat template (transformers 5 writes chat_template.jinja; releases
# made with 4.x keep it in tokenizer_config.json). config: tokenizer_config.json keys a release has.
STYLES: dict[str, dict[str, Any]] = {
    "llama3": dict(pre="split", bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None, adds_bos=True,
                   extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], template=LLAMA3_CHAT,
                   template_in="jinja", config={}, model=("LlamaForCausalLM", "LlamaConfig",
                                                          {"tie_word_embeddings": True})),
    "qwen": dict(pre="split", bos=None, eos="<|endoftext|>", pad="<|endoftext|>", adds_bos=False,
                 extra=["<|im_start|>", "<|im_end|>"], template=CHATML, template_in="config",
                 config={"tokenizer_class": "Qwen2Tokenizer"}, model=("Qwen3ForCausalLM", "Qwen3Config", {})),
    "smollm": dict(pre="gpt2", bos="<|endoftext|>", eos="<|endoftext|>", pad=None, adds_bos=False,
                   extra=["<|im_start|>", "<|im_end|>"], template=CHATML, template_in="jinja", config={},
                   model=("LlamaForCausalLM", "LlamaConfig", {"tie_word_embeddings": True})),
    "mistral": dict(pre="spm", bos="<s>", eos="</s>", pad=None, adds_bos=True, extra=[], template=MISTRAL_CHAT,
                    template_in="config", config={"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                                  "add_eos_token": False},
                    model=("MistralForCausalLM", "MistralConfig", {"sliding_window": 32})),
}


def _bpe(style: dict[str, Any]) -> Any:
    """A small BPE trained on TEXTS in `style`'s conventions (BOS added by its post-processor where it adds one)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(dict.fromkeys(t for t in (style["eos"], style["bos"], style["pad"], *style["extra"]) if t))
    if style["pre"] == "spm":
        specials = ["<unk>", *specials, *(f"<0x{i:02X}>" for i in range(256))]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style["pre"] == "gpt2")
        tok.pre_tokenizer = (byte_level if style["pre"] == "gpt2" else
                             pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT), "isolated"), byte_level]))
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    if style["adds_bos"]:
        bos = style["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def write_tokenizer(style: dict[str, Any], out: Path) -> int:
    """`style`'s tokenizer saved in `out` as a release ships it; returns its size."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=_bpe(style), bos_token=style["bos"], eos_token=style["eos"],
                                 pad_token=style["pad"], unk_token="<unk>" if style["pre"] == "spm" else None,
                                 additional_special_tokens=style["extra"])
    hf.chat_template = style["template"]
    hf.save_pretrained(str(out))
    config_file = out / "tokenizer_config.json"
    config = {**json.loads(config_file.read_text()), **style["config"]}
    if style["template_in"] == "config":
        (out / "chat_template.jinja").unlink()
        config["chat_template"] = style["template"]
    config_file.write_text(json.dumps(config, indent=2))
    return len(hf)


def write_model(style: dict[str, Any], out: Path, rows: int, dtype: torch.dtype = torch.bfloat16,
                **save: Any) -> Path:
    """A tiny random model of `style`'s family with `rows` embedding rows, saved in `dtype` (releases are bf16)."""
    import transformers

    model_class, config_class, keys = style["model"]
    config = getattr(transformers, config_class)(
        vocab_size=rows, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, architectures=[model_class], **keys)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config)
    model.to(dtype).save_pretrained(str(out), **save)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every style's checkpoint directory: tokenizer + bf16 model with rows = tokenizer size rounded up to 64."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name, style in STYLES.items():
        size = write_tokenizer(style, root / name)
        write_model(style, root / name, rows=-(-size // 64) * 64)
        out[name] = root / name
    return out


def _auto(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _corpus(directory: Path) -> Path:
    """DOCS as a jsonl file in `directory` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    return corpus


def _prepare(tmp_path: Path, tokenizer: Path, **options: Any) -> Any:
    from slimtrain.data.config import DataConfig
    from slimtrain.data.pipeline import prepare

    corpus = _corpus(tmp_path)
    cfg = DataConfig(sources=[{"type": "files", "paths": [str(corpus)]}], seq_len=64, val_fraction=0.01,
                     num_workers=1, cache_dir=str(tmp_path / "cache"), tokenizer={"path": str(tokenizer), **options})
    return prepare(cfg, progress=False)


def _documents(prepared: Any) -> list[list[int]]:
    """Every document's token ids, both splits, sorted."""
    splits = (prepared.train, prepared.val)
    return sorted([int(t) for t in split.document(i)] for split in splits for i in range(len(split)))


@pytest.mark.parametrize("name", list(STYLES))
def test_documents_are_encoded_as_the_checkpoints_tokenizer_does_plus_eos(checkpoints, tmp_path, name) -> None:
    """The rule: the tokenizer's own encoding (BOS where it adds one), then EOS."""
    theirs = _auto(checkpoints[name])
    prepared = _prepare(tmp_path, checkpoints[name])
    expected = sorted(theirs(text)["input_ids"] + [theirs.eos_token_id] for text in DOCS)
    assert _documents(prepared) == expected
    tok = prepared.tokenizer
    assert tok.add_bos is STYLES[name]["adds_bos"] and tok.eos_id == theirs.eos_token_id
    assert all(doc[0] == theirs.bos_token_id for doc in expected) is STYLES[name]["adds_bos"]
    assert tok.vocab_size == len(theirs)


def test_the_recipe_overrides_the_tokenizers_bos_convention(checkpoints, tmp_path) -> None:
    from slimtrain.data.errors import TokenizerError

    theirs = _auto(checkpoints["llama3"])
    without = _prepare(tmp_path / "a", checkpoints["llama3"], add_bos=False)
    assert _documents(without) == sorted(theirs.encode(t, add_special_tokens=False) + [theirs.eos_token_id]
                                         for t in DOCS)
    with pytest.raises(TokenizerError, match="add_bos is true but the tokenizer has no BOS token"):
        _prepare(tmp_path / "b", checkpoints["qwen"], add_bos=True)


def _import(path: Path) -> tuple[Any, torch.nn.Module]:
    cfg = model_config_from_hf(json.loads((path / "config.json").read_text()), str(path))
    torch.manual_seed(1)
    model = Transformer(cfg)
    import_hf(model, cfg, path)
    return cfg, model


@pytest.mark.parametrize("name", ["llama3", "qwen", "mistral"])
def test_export_carries_the_chat_template_special_tokens_and_padded_rows(checkpoints, tmp_path, name) -> None:
    from slimtrain.data.tokenizer import load_tokenizer
    from slimtrain.trainer.export.hf import write_hf_dir

    source = checkpoints[name]
    info = load_tokenizer(source, cache_dir=tmp_path / "cache")
    cfg, model = _import(source)
    out = write_hf_dir(model.state_dict(), cfg, tmp_path / "export", tokenizer_dir=info.tokenizer_dir,
                       ids={"eos_id": info.eos_id, "bos_id": info.bos_id, "pad_id": info.pad_id})
    theirs, ours = _auto(source), _auto(out)
    assert ours.chat_template == theirs.chat_template == STYLES[name]["template"]  # byte for byte
    assert ours.apply_chat_template(MESSAGES, tokenize=False) == theirs.apply_chat_template(MESSAGES, tokenize=False)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "all_special_tokens"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.get_vocab() == theirs.get_vocab()
    assert [ours(d)["input_ids"] for d in DOCS] == [theirs(d)["input_ids"] for d in DOCS]
    # The padded rows load and export unchanged (the tokenizer is smaller than the embedding).
    rows = json.loads((source / "config.json").read_text())["vocab_size"]
    assert len(theirs) < rows and cfg.vocab_size == rows
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    exported, released = read_hf_state(out), read_hf_state(source)
    assert exported["model.embed_tokens.weight"].shape[0] == rows
    for key, value in released.items():
        assert torch.equal(exported[key], value.float()), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_become_equal_fp32_masters(checkpoints, tmp_path, dtype) -> None:
    path = write_model(STYLES["qwen"], tmp_path / "ckpt", rows=128, dtype=dtype)
    cfg, model = _import(path)
    hf_state = read_hf_state(path)
    assert {t.dtype for t in hf_state.values()} == {dtype}
    expected = get_adapter(cfg.architecture).from_hf(hf_state, cfg)
    ours = model.state_dict()
    assert set(expected) <= set(ours)
    for key, value in expected.items():
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], value.float()), key
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_sharded_checkpoint_imports_as_the_unsharded_one(tmp_path) -> None:
    style = STYLES["qwen"]
    whole = write_model(style, tmp_path / "whole", rows=128)
    sharded = write_model(style, tmp_path / "sharded", rows=128, max_shard_size="50KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert not (sharded / "model.safetensors").exists() and len(set(index["weight_map"].values())) > 2
    a, b = read_hf_state(whole), read_hf_state(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = read_hf_state(sharded, meta=True)
    assert {k: (t.shape, t.dtype) for k, t in meta.items()} == {k: (t.shape, t.dtype) for k, t in a.items()}
    (_, x), (_, y) = _import(whole), _import(sharded)
    assert all(torch.equal(x.state_dict()[k], v) for k, v in y.state_dict().items())


@pytest.mark.parametrize("layout", ["single", "index"])
def test_pickle_only_weights_are_refused_and_never_loaded(tmp_path, monkeypatch, layout) -> None:
    path = write_model(STYLES["qwen"], tmp_path / "ckpt", rows=128)
    state = read_hf_state(path)
    for f in path.glob("model*.safetensors*"):
        f.unlink()
    if layout == "single":
        torch.save(state, path / "pytorch_model.bin")
        named = "pytorch_model.bin"
    else:
        torch.save(state, path / "pytorch_model-00001-of-00001.bin")
        weight_map = {k: "pytorch_model-00001-of-00001.bin" for k in state}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        named = "pytorch_model.bin.index.json"

    def no_pickle(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a checkpoint's pickle was loaded")

    monkeypatch.setattr(torch, "load", no_pickle)
    cfg = model_config_from_hf(json.loads((path / "config.json").read_text()))
    attempts = (lambda: check_init_from_hf(path, cfg, PluginStack()), lambda: import_hf(Transformer(cfg), cfg, path))
    for attempt in attempts:
        with pytest.raises(RecipeError) as err:
            attempt()
        message = str(err.value)
        assert named in message and str(path) in message
        assert "save_pretrained(dir, safe_serialization=True)" in message and "never loads" in message


def _recipe(tmp_path: Path, checkpoint: Path, tokenizer: Path) -> Path:
    """A one-step recipe continuing from `checkpoint` (its model block written out) with `tokenizer`."""
    corpus = _corpus(tmp_path)
    model = model_config_from_hf(json.loads((checkpoint / "config.json").read_text()))
    recipe = {
        "run": {"name": "continue", "output_dir": str(tmp_path / "run")},
        "model": model.model_dump(mode="json", exclude_none=True),
        "data": {"sources": [{"type": "files", "paths": [str(corpus)]}], "tokenizer": {"path": str(tokenizer)},
                 "seq_len": 32, "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 1, "global_batch_size": 2, "micro_batch_size": 1},
        "backend": {"type": "deepspeed", "zero_stage": 0, "precision": "fp32"},
        "checkpoint": {"init_from_hf": str(checkpoint)},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_launch(checkpoints, tmp_path, capsys) -> None:
    from slimtrain.trainer.cli import _check_before_launch, main
    from slimtrain.trainer.recipe.schema import load_recipe

    source = checkpoints["qwen"]
    rows = json.loads((source / "config.json").read_text())["vocab_size"]
    # The checkpoint's own tokenizer, smaller than its padded embedding, passes.
    _check_before_launch(load_recipe(str(_recipe(tmp_path / "own", source, source)), []), 1)
    bigger = _auto(source)
    bigger.add_tokens([f"<extra_{i}>" for i in range(rows - len(bigger) + 5)])
    bigger.save_pretrained(str(tmp_path / "bigger"))
    assert main(["train", str(_recipe(tmp_path, source, tmp_path / "bigger")), "--nproc", "1"]) == 2
    err = capsys.readouterr().err
    assert f"gives {rows + 5} tokens" in err and f"has {rows} embedding rows" in err
    assert f"data.tokenizer.path: {str(source)!r}" in err  # the fix: the checkpoint's own tokenizer
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()

