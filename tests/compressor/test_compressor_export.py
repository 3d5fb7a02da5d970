"""The compressor's serving export: the plain directory holds the decoder only; `compressor/` reloads bitwise
without the recipe; the serving path (our embeddings into transformers' `generate(inputs_embeds=...)` of the
exported decoder) decodes the tokens our model decodes from its own compressed context; `slimtrain compress`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from slimtrain.modules.compressor import ContextCompressor, Spans
from slimtrain.modules.compressor.evaluation import greedy_after
from slimtrain.modules.compressor.export import compress_text, load_compressor
from slimtrain.modules.compressor.recipe import CompressorConfig
from slimtrain.modules.plugin import ExportContext
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.trainer.compress import cmd_compress, load_decoder
from slimtrain.trainer.errors import CheckpointError, SlimtrainError
from slimtrain.trainer.export.hf import write_hf_dir

# init_std 0.1: logits far from uniform, so greedy decoding has no near-ties (and fp64 throughout besides).
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                  max_seq_len=128, init_std=0.1)
BLOCK = {"type": "compressor", "encoder": {"source": "truncate", "layers": 2}, "pooling_factor": 4,
         "context_tokens": 16, "continuation_tokens": 16}
UNPOOLED = {k: v for k, v in BLOCK.items() if k != "pooling_factor"}
WORDS = [f"w{i}" for i in range(CFG.vocab_size - 1)] + ["<unk>"]  # the test tokenizer: word i is token i


def build(block: dict | CompressorConfig) -> tuple[PluginStack, Transformer]:
    """A tiny fp64 decoder with a compressor whose every parameter is moved off its start (task embeddings at
    ones, encoder equal to the decoder's layers: a reload that mixed them up would still pass)."""
    stack = PluginStack.from_configs([validate_plugin_config(block)])
    model = Transformer(stack.configure(CFG))
    model.init_weights(0)
    stack.apply(model)
    stack.init_weights(model, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.compressor.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return stack, model.double().eval()


def export(stack: PluginStack, model: Transformer, out: Path, tokenizer_dir: Path | None = None) -> ExportContext:
    ctx = stack.export(dict(model.state_dict()), CFG, 0)  # the plugin's hook adds the compressor/ variant
    assert [v.name for v in ctx.variants] == ["compressor"]
    write_hf_dir(ctx.state, CFG, out, tokenizer_dir=tokenizer_dir, ids={}, dtype=torch.float64, plugins=stack,
                 plugin_export=ctx)
    return ctx


def word_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer over WORDS, saved where AutoTokenizer loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Transformer]:
    root = tmp_path_factory.mktemp("compressor-export")
    stack, model = build(BLOCK)
    export(stack, model, root / "hf", word_tokenizer(root / "tok"))
    return root / "hf", model


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(0, CFG.vocab_size - 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_the_plain_directory_holds_the_decoder_only(exported) -> None:
    from safetensors.torch import load_file

    out, model = exported
    names = {n for f in out.glob("*.safetensors") for n in load_file(str(f))}
    assert names and all(n.startswith(("model.", "lm_head.")) for n in names)
    assert len(names) == sum(1 for n in model.state_dict() if not n.startswith("compressor."))
    on_disk = {n for f in (out / "compressor").glob("*.safetensors") for n in load_file(str(f))}
    assert on_disk == set(model.compressor.state_dict())
    assert {"encoder.layers.0.attn.q_proj.weight", "projectors.main.down.weight",
            "projectors.main.cont_embed"} <= on_disk
    readme = (out / "compressor" / "README.md").read_text()
    assert "slimtrain compress" in readme and 'llm.generate({"prompt_embeds"' in readme
    assert "enable_prompt_embeds=True" in readme and "compressor/" in (out / "README.md").read_text()


def test_the_compressor_reloads_bitwise_without_the_recipe(exported) -> None:
    out, model = exported
    config = json.loads((out / "compressor" / "config.json").read_text())
    assert config["pooling_factor"] == 4 and config["task_vectors"] is True and config["context_tokens"] == 16
    assert config["decoder"] == {"hidden_size": 32, "vocab_size": 64, "path": ".."}
    assert config["encoder_model"]["num_layers"] == 2 and config["projectors"] == {"main": 32}
    loaded = load_compressor(out / "compressor")
    assert isinstance(loaded, ContextCompressor) and loaded.encoder.embed.weight.dtype == torch.float64
    for (name, p), q in zip(loaded.state_dict().items(), model.compressor.state_dict().values()):
        assert torch.equal(p, q), name
    spans = Spans.from_lists([ids(2, 13), ids(3, 5)])
    for task in ("cont", "rec", None):
        assert torch.equal(loaded.compress(spans, task).vectors, model.compressor.compress(spans, task).vectors)
    assert load_compressor(out / "compressor", dtype=torch.float32).encoder.embed.weight.dtype == torch.float32


@pytest.mark.parametrize("before,after", [(0, 0), (0, 4), (3, 5)])
def test_served_embeddings_generate_what_our_model_generates(exported, before: int, after: int) -> None:
    """The whole serving path: export -> load_compressor -> compress_text -> transformers generate."""
    from transformers import LlamaForCausalLM

    out, model = exported
    context, prefix, prompt, steps = ids(4, 15), ids(5, before), ids(6, after), 12
    with torch.no_grad():
        vectors = model.compressor.compress(Spans.from_lists([context]), "cont").vectors  # 4 vectors + <Cont>
        ours = torch.cat([model.embed(torch.tensor(prefix, dtype=torch.long)), vectors,
                          model.embed(torch.tensor(prompt, dtype=torch.long))])
        want = greedy_after(model, ours, steps)
    served = compress_text(load_compressor(out / "compressor"), model, context, prefix, prompt)
    assert served.shape == (before + 5 + after, CFG.hidden_size) and torch.equal(served, ours)
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float64, attn_implementation="eager").eval()
    got = hf.generate(inputs_embeds=served[None], max_new_tokens=steps, do_sample=False)
    assert got.shape == (1, steps)  # transformers returns the new tokens only when given embeddings alone
    assert got[0].tolist() == want.tolist()


@pytest.mark.parametrize("block", [
    {"pooling": "memory", "num_memory_tokens": 3},
    {"vectors_per_span": 2, "task_vectors": False, "reconstruction_fraction": 0.0, "pooled_layers": 2},
    {"encoder": {"source": "separate", "hidden_size": 24, "num_layers": 1, "num_heads": 2, "intermediate_size": 48,
                 "max_seq_len": 40}, "projector_bottleneck": 8, "final_norm": False},
], ids=["memory", "count-no-tasks", "separate"])
def test_every_pooling_and_encoder_round_trips(tmp_path: Path, block: dict) -> None:
    """config.json rebuilds each kind (fields of the other pooling left out: the config refuses them)."""
    # Validated here rather than by validate_plugin_config: its unknown-key check reads a discriminated union as its
    # first member (TruncatedEncoder) and refuses a separate encoder's keys (a registry bug, reported).
    stack, model = build(CompressorConfig.model_validate({**UNPOOLED, **block}))
    export(stack, model, tmp_path / "hf")
    loaded = load_compressor(tmp_path / "hf" / "compressor")
    spans = Spans.from_lists([ids(7, 11), ids(8, 3)])
    task = "cont" if stack.plugins[0].cfg.task_vectors else None
    assert torch.equal(loaded.compress(spans, task).vectors, model.compressor.compress(spans, task).vectors)


def test_export_refuses_a_state_without_the_compressor_the_recipe_builds() -> None:
    stack, model = build(BLOCK)
    with pytest.raises(ValueError, match="missing .*projectors.main"):
        stack.export({n: t for n, t in model.state_dict().items() if "projectors" not in n}, CFG, 0)


def test_compress_text_refuses_bad_input(exported) -> None:
    out, model = exported
    loaded = load_compressor(out / "compressor")
    with pytest.raises(ValueError, match="token id 64, outside the decoder's vocabulary of 64"):
        compress_text(loaded, model, [1, 64])
    with pytest.raises(ValueError, match="context_ids is empty"):
        compress_text(loaded, model, [])
    with pytest.raises(ValueError, match="max_seq_len=128"):
        compress_text(loaded, model, ids(8, 129))
    wider = Transformer(CFG.model_copy(update={"hidden_size": 48}))  # a decoder the projector does not write for
    with pytest.raises(ValueError, match="writes 32-wide vectors but the decoder is 48 wide"):
        compress_text(loaded, wider.double(), [1, 2, 3])


def _args(out: Path, text: Path, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{"export": str(out), "text": str(text), "out": str(text.with_suffix(".pt")),
                                 "prompt": "", "prefix": "", "task": None, "generate": 0, "decoder": "main",
                                 "decoder_path": "", **changes})


def test_the_compress_command(exported, tmp_path: Path, capsys) -> None:
    out, _ = exported
    context, prompt = ids(9, 20), ids(10, 3)
    text = tmp_path / "context.txt"
    text.write_text(" ".join(WORDS[i] for i in context))
    prompt_text = " ".join(WORDS[i] for i in prompt)
    assert cmd_compress(_args(out, text, prompt=prompt_text, generate=6)) == 0
    stdout, stderr = capsys.readouterr()
    assert "has 20 tokens" in stderr and "compressing its last 16" in stderr  # context_tokens 16
    assert "16 context tokens -> 4 vectors + 1 <Cont> vector (4.00x compression)" in stdout
    saved = torch.load(text.with_suffix(".pt"))
    decoder = load_decoder(out)
    want = compress_text(load_compressor(out / "compressor", dtype=torch.float32), decoder, context[-16:], [], prompt)
    assert saved.shape == (4 + 1 + 3, CFG.hidden_size) and torch.equal(saved, want)
    with torch.no_grad():
        continuation = greedy_after(decoder, want, 6).tolist()
    assert stdout.strip().splitlines()[-1] == " ".join(WORDS[i] for i in continuation)


def test_the_compress_command_refuses_an_export_without_a_compressor(exported, tmp_path: Path) -> None:
    out, _ = exported
    text = tmp_path / "context.txt"
    text.write_text("w1 w2 w3")
    with pytest.raises(CheckpointError, match="has no compressor/ directory"):
        cmd_compress(_args(tmp_path, text))
    stack, model = build({**UNPOOLED, "vectors_per_span": 2, "task_vectors": False, "reconstruction_fraction": 0.0})
    plain = tmp_path / "no-tasks"
    export(stack, model, plain, out)  # out: the first export's tokenizer files
    with pytest.raises(SlimtrainError, match="trained without task vectors"):
        cmd_compress(_args(plain, text, task="rec"))
