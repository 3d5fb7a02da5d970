"""Recipes: every shipped YAML validates; bad input fails with field path, value and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slimtrain.trainer.recipe.schema import RecipeError, load_recipe
from slimtrain.trainer.recipe.loading import dump_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_recipes_exist() -> None:
    assert {p.name for p in RECIPES} >= {"quickstart.yaml", "tiny-cpu.yaml", "qat-int4.yaml", "bitnet-b158.yaml",
                                         "mxfp4.yaml", "qat-int4-cpu.yaml", "bitnet-b158-cpu.yaml", "mxfp4-cpu.yaml",
                                         "moe-cpu.yaml", "moe-qwen-style.yaml", "moe-deepseek-style.yaml"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    again = load_recipe(_write(path.parent.parent / ".pytest_cache" / f"roundtrip-{path.name}", dump_recipe(recipe)))
    assert again == recipe  # the resolved recipe written next to checkpoints reloads to the same thing


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.stpes=3", "train.stpes: unknown key — did you mean 'steps'?"),
        ("data.packer=bdf", "data.packer: got 'bdf'"),
        ("data.packer=bdf", "did you mean 'bfd'?"),
        ("optim.schedule.type=linear", "'cosine', 'wsd' or 'constant'"),
        ("train.global_batch_size=abc", "train.global_batch_size: got 'abc'"),
        ("model.num_kv_heads=3", "model.num_kv_heads=3 must divide model.num_heads=4; choose one of [1, 2, 4]"),
        ("backend.zero_stage=4", "backend.zero_stage: got 4"),
        ("backend.zero_stag=1", "unknown key backend.zero_stag — did you mean 'zero_stage'?"),
        ("backend.type=deepsped", "unknown backend 'deepsped'; did you mean 'deepspeed'?"),
        ("backend.raw={gradient_clipping: 2}", "backend.raw sets ['gradient_clipping']"),
        ("data.seq_len=4096", "data.seq_len=4096 exceeds model.max_seq_len=64"),
        ("train.micro_batch_size=16", "train.micro_batch_size=16 exceeds train.global_batch_size=8"),
        ("bogus=1", "bogus: unknown key — valid keys:"),
        ("train.steps", "not of the form key.sub=value"),
        ("plugins=[{type: qat}]", "weights.group_size=32 does not divide the 176 input features of "
                                  "'layers.0.mlp.down_proj'; use one of [16]"),
        ("plugins=[{type: qat, weights: {format: int, bits: 1}}]", "plugins.0.weights: bits=1 is not supported"),
        ("plugins=[{type: qat, weights: {format: nvfp4, bits: 4}}]", "format 'nvfp4' fixes its own width"),
        ("plugins=[{type: qat, exclude: [head]}]", "exclude[0]='head' matches no module"),
        ("plugins=[{type: qat, weights: {group_size: 16}}] ; plugins.1.start_step=5",
         "plugins is a list of 1 items; index it with 0..0 (got '1')"),
        ("plugins=[] ; plugins.0.start_step=5", "plugins is an empty list; set it whole"),
        ("run.name.x=1", "'name' holds a value, not a block of keys"),
        ("plugins.0.start_step=5", "plugins is not set in the recipe, so there is no item 0 to change; "
                                   "set the whole list, e.g. plugins=[...]"),
        ("plugins=[{type: qat, exclude: [], weights: {group_size: 16}, activations: {format: int, bits: 8, "
         "granularity: tensor}}] ; train.loss_chunk_tokens=64",
         "plugins.0 (qat): lm_head now shares one input scale across tokens, so train.loss_chunk_tokens=64"),
        ("backend.zero_stage=3 ; train.compile=true", "train.compile=true with backend.zero_stage=3 is not supported"),
        ("data.sources.0.type=file", "data.sources.0.type: got 'file' — choose one of 'python-stdlib', 'files', "
                                     "'hub' (did you mean 'files'?)"),
        ("data.sources.0.max_docs=3", "data.sources.0.max_docs: unknown key — did you mean 'max_documents'?"),
        ("run.name=2024", "run.name: got 2024 — Input should be a valid string; YAML read the value as int: to mean "
                          "the text, quote it"),
        ("extends=other.yaml", "extends: is read from the recipe file before any override"),
        ("model.vocab_size=100", "model.vocab_size=100 is smaller than the tokenizer's "
                                 "data.tokenizer.train.vocab_size=512"),
        ("data.val_fraction=0", "data.val_fraction: got 0"),
    ],
)
def test_bad_recipes_say_what_to_fix(override: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPES[0].parent / "tiny-cpu.yaml", override.split(" ; "))
    assert expected in str(info.value)


def test_world_size_geometry_error_lists_valid_sizes() -> None:
    recipe = load_recipe(RECIPES[0].parent / "tiny-cpu.yaml")
    assert recipe.check_world(2) == 2
    with pytest.raises(RecipeError, match=r"use a multiple of 6, e.g. \[6, 12, 18, 24\]"):
        recipe.check_world(3)


def test_extends_merges_deeply_and_overrides_win(tmp_path: Path) -> None:
    base = RECIPES[0].parent / "tiny-cpu.yaml"
    child = _write(tmp_path / "child.yaml", yaml.safe_dump({"extends": str(base), "train": {"steps": 7}}))
    recipe = load_recipe(child, ["optim.lr=0.5"])
    assert recipe.train.steps == 7 and recipe.train.global_batch_size == 8  # merged, not replaced
    assert recipe.optim.lr == 0.5 and recipe.model.hidden_size == 64


def test_overrides_index_lists() -> None:
    recipe = load_recipe(RECIPES[0].parent / "qat-int4-cpu.yaml", ["plugins.0.weights.bits=2", "plugins.0.start_step=7"])
    assert recipe.plugins[0].weights.bits == 2 and recipe.plugins[0].start_step == 7
    assert recipe.plugins[0].weights.group_size == 32  # the rest of the item is kept


def test_chunked_loss_accepts_a_token_wise_quantized_head() -> None:
    recipe = load_recipe(RECIPES[0].parent / "tiny-cpu.yaml", [
        "plugins=[{type: qat, exclude: [], weights: {group_size: 16}, activations: {format: int, bits: 8, "
        "granularity: token}}]", "train.loss_chunk_tokens=64"])
    assert recipe.train.loss_chunk_tokens == 64


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(_write(tmp_path / "bad.yaml", "run: [unclosed"))


def test_docs_recipe_reference_is_current() -> None:
    from slimtrain.trainer.recipe.reference import recipe_reference

    doc = Path(__file__).resolve().parents[2] / "docs" / "recipe.md"
    assert doc.read_text() == recipe_reference(), "regenerate: slimtrain validate --reference > docs/recipe.md"


def test_yaml_rules_for_recipes(tmp_path: Path) -> None:
    tiny = (RECIPES[0].parent / "tiny-cpu.yaml").read_text()
    with pytest.raises(RecipeError, match="key 'model' appears twice in the same block"):
        load_recipe(_write(tmp_path / "dup.yaml", tiny + "model: {num_layers: 3}\n"))
    recipe = load_recipe(RECIPES[0].parent / "tiny-cpu.yaml", ["backend.raw={zero_optimization: {reduce_bucket_size: 5e7}}"])
    assert recipe.backend.raw["zero_optimization"]["reduce_bucket_size"] == 5e7  # a number, as written


def test_extends_errors_name_the_recipe_that_extends(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"child.yaml: extends: must be the path of one recipe file, got \[.a.yaml.\]"):
        load_recipe(_write(tmp_path / "child.yaml", "extends: [a.yaml]\n"))
    with pytest.raises(RecipeError, match=r"lost.yaml: extends: '.*nope.yaml', which does not exist; give a path "
                                          r"relative to"):
        load_recipe(_write(tmp_path / "lost.yaml", "extends: nope.yaml\n"))


def test_a_tokenizer_path_replaces_an_inherited_trained_one(tmp_path: Path) -> None:
    quickstart = RECIPES[0].parent / "quickstart.yaml"
    child = _write(tmp_path / "child.yaml", f"extends: {quickstart}\ndata: {{tokenizer: {{path: tok/}}}}\n")
    assert load_recipe(child).data.tokenizer.train is None
    recipe = load_recipe(quickstart, ["data.tokenizer.path=tok/"])
    assert str(recipe.data.tokenizer.path) == "tok" and recipe.data.tokenizer.train is None
    assert load_recipe(child, ["data.tokenizer.train={vocab_size: 300}"]).data.tokenizer.path is None
    assert load_recipe(child, ["data.tokenizer.train.vocab_size=300"]).data.tokenizer.path is None


def test_the_readme_recipe_validates(tmp_path: Path) -> None:
    readme = (RECIPES[0].parents[1] / "README.md").read_text()
    block = readme.split("```yaml\nextends: quickstart.yaml", 1)[1].split("```", 1)[0]
    child = _write(tmp_path / "readme.yaml", f"extends: {RECIPES[0].parent / 'quickstart.yaml'}" + block)
    recipe = load_recipe(child)
    assert recipe.model.hidden_size == 512 and recipe.data.tokenizer.path is not None


def test_validate_checks_the_world_a_plain_train_starts(tmp_path: Path) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "slimtrain.trainer.cli", "validate", str(RECIPES[0].parent / "quickstart.yaml")]
    proc = subprocess.run([*cmd, "train.global_batch_size=24"], capture_output=True, text=True)
    assert proc.returncode == 2 and "world size (2) = 16" in proc.stderr  # run.local_procs: 2
    proc = subprocess.run([*cmd, "--world-size", "0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "give a whole number of at least 1" in proc.stderr


def test_yaml_merge_keys_still_work_and_odd_keys_are_named(tmp_path: Path) -> None:
    from slimtrain.trainer.recipe.loading import parse_yaml

    assert parse_yaml("base: &b {x: 1}\nc: {<<: *b, y: 2}\n")["c"] == {"x": 1, "y": 2}
    with pytest.raises(RecipeError, match="line 1: a key must be a name, not a sequence"):
        parse_yaml("? [1, 2]\n: 3\n")


def test_a_source_kinds_own_keys_are_suggested() -> None:
    with pytest.raises(RecipeError, match=r"data.sources.0.path: unknown key — did you mean 'paths'\?"):
        load_recipe(RECIPES[0].parent / "tiny-cpu.yaml", ["data.sources=[{type: files, path: [a]}]"])
