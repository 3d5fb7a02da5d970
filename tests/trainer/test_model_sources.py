"""`Plugin.model_sources`: a model a plugin reads weights from must have been trained with the run's tokenizer
(an export's tokenizer files, or a checkpoint's `tokenizer/`); the refusal names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimtrain.data.tokenizer import tokenizer_hash_of
from slimtrain.trainer.errors import RecipeError
from slimtrain.trainer.lifecycle.branch import check_model_sources


def save_tokenizer(directory: Path, words: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)
    return directory


def test_a_source_must_share_the_runs_tokenizer(tmp_path: Path) -> None:
    ours = save_tokenizer(tmp_path / "export", ["a", "b", "c"])
    now = tokenizer_hash_of(ours, "test")
    step = tmp_path / "run" / "step_00000010"
    save_tokenizer(step / "tokenizer", ["a", "b", "c"])
    check_model_sources([("plugins.x.path", ours), ("plugins.x.run", step)], now)  # an export, a checkpoint
    other = save_tokenizer(tmp_path / "other", ["a", "b", "d"])
    with pytest.raises(RecipeError, match=r"plugins.x.path='.*other' was trained with another tokenizer"):
        check_model_sources([("plugins.x.path", other)], now)
    (tmp_path / "bare").mkdir()
    with pytest.raises(RecipeError, match="holds no tokenizer"):
        check_model_sources([("plugins.x.path", tmp_path / "bare")], now)
