"""Continued pretraining as a new user runs it: `slimtrain make-checkpoint` writes a family's small checkpoint, a recipe
without a model block takes the model from its config.json (a disagreeing field is refused naming both sides), and
2 gloo ranks train it at lr 0 and export a directory that transformers loads with the original's logits and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from slimtrain.trainer.errors import RecipeError  # noqa: E402
from slimtrain.trainer.random_checkpoint import make_checkpoint  # noqa: E402
from slimtrain.trainer.recipe.schema import load_recipe  # noqa: E402

from train_helpers import REPO  # noqa: E402

RECIPE = """
run: {{name: continue, output_dir: {out}, seed: 0}}
{model}
data:
  sources: [{{type: python-stdlib, max_documents: 200}}]
  tokenizer: {{path: {ckpt}}}
  seq_len: 64
  val_fraction: 0.05
  cache_dir: {cache}
train: {{steps: 2, global_batch_size: 4, micro_batch_size: 2}}
optim: {{lr: {lr}, weight_decay: 0.1}}
backend: {{type: deepspeed, zero_stage: 2, precision: fp32}}
checkpoint: {{every: 2, init_from_hf: {ckpt}}}
eval: {{every: 0, batches: 1}}
logging: {{progress: false, plot: false}}
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: make_checkpoint(family, root / family, vocab_size=600) for family in ("qwen2", "llama3")}


def _recipe(tmp_path: Path, ckpt: Path, model: str = "", lr: float = 0.0) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "run", ckpt=ckpt, cache=tmp_path / "cache", model=model, lr=lr))
    return path


def test_the_model_block_comes_from_the_checkpoint(checkpoints, tmp_path: Path) -> None:
    config = json.loads((checkpoints["qwen2"] / "config.json").read_text())
    model = load_recipe(_recipe(tmp_path, checkpoints["qwen2"])).model
    assert (model.architecture, model.hidden_size, model.num_layers, model.qkv_bias, model.tie_embeddings) == (
        "qwen2", config["hidden_size"], config["num_hidden_layers"], True, True)
    assert model.vocab_size == config["vocab_size"] > len(transformers.AutoTokenizer.from_pretrained(
        str(checkpoints["qwen2"])))  # the padded rows, not the tokenizer's size
    agreeing = "model: {hidden_size: %d, attention: eager, vocab_size: null}" % config["hidden_size"]
    assert load_recipe(_recipe(tmp_path, checkpoints["qwen2"], agreeing)).model.attention == "eager"


def test_a_disagreeing_model_field_is_refused_naming_both_sides(checkpoints, tmp_path: Path) -> None:
    path = _recipe(tmp_path, checkpoints["llama3"], "model: {hidden_size: 64, tie_embeddings: false}")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    for expected in ("the recipe's model block disagrees with the checkpoint",
                     "model.hidden_size=64 but config.json's hidden_size gives 128",
                     "model.tie_embeddings=False but config.json's tie_word_embeddings gives True",
                     "remove these fields from the model block"):
        assert expected in message, message


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_train_at_lr_0_then_export_gives_the_original_logits(checkpoints, tmp_path: Path, family: str) -> None:
    import subprocess
    import sys

    ckpt = checkpoints[family]
    recipe = _recipe(tmp_path, ckpt)
    train = subprocess.run([sys.executable, "-m", "slimtrain.trainer.cli", "train", str(recipe), "--nproc=2"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    out = tmp_path / "export"
    export = subprocess.run([sys.executable, "-m", "slimtrain.trainer.cli", "export", str(tmp_path / "run"), str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stdout[-3000:] + export.stderr[-3000:]
    original = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(exported).__name__ == type(original).__name__
    assert exported.config.vocab_size == original.config.vocab_size  # padded rows kept
    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (exported(ids).logits - original(ids).logits).abs().max() <= 1e-5
    theirs = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    ours = transformers.AutoTokenizer.from_pretrained(str(out))
    assert ours.chat_template == theirs.chat_template
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
    text = "def f(x):\n    return x + 1\n"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
