"""The plugin seam: the docs' example plugin registers, validates, composes in order, adds a logged loss term;
entry points load lazily; the recipe's errors name the plugin field."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from slimtrain.data.batch import Batch
from slimtrain.modules import plugin_registry as registry
from slimtrain.modules.plugin import Plugin, PluginConfig
from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.trainer.recipe.schema import RecipeError, load_recipe
from slimtrain.trainer.loss.lm import lm_loss, make_loss_fn

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def zloss() -> types.ModuleType:
    """docs/plugins.md's example, executed as a module (registers 'zloss' once per session)."""
    doc = (REPO / "docs" / "plugins.md").read_text()
    code = re.search(r"## A complete example.*?```python\n(.*?)```", doc, re.S).group(1)
    module = sys.modules.get("docs_zloss") or types.ModuleType("docs_zloss")
    if "docs_zloss" not in sys.modules:
        sys.modules["docs_zloss"] = module
        exec(compile(code, "docs/plugins.md", "exec"), module.__dict__)
    return module


def _batch(vocab: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    pos = torch.arange(12).expand(2, 12)
    return Batch(input_ids=ids, labels=labels, position_ids=pos, doc_ids=torch.zeros_like(ids))


def test_example_plugin_validates_composes_in_order_and_adds_its_loss(zloss) -> None:
    recipe = load_recipe(TINY, ["model.intermediate_size=192",
                                "plugins=[{type: zloss, weight: 0.5}, {type: qat, weights: {bits: 8}}]"])
    built = registry.build_plugins(recipe.plugins)
    assert [p.name for p in built] == ["qat", "zloss"]  # order 20 before 90, whatever the recipe's order
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    batch = _batch(50)
    plain, token_sum, terms = lm_loss(model, batch, 7.0)
    assert terms == {}
    loss, token_sum2, terms = make_loss_fn([built[1]])(model, batch, 7.0)
    assert torch.equal(token_sum, token_sum2) and set(terms) == {"zloss/z"}
    assert torch.equal(loss, plain + 0.5 * terms["zloss/z"])
    assert built[1].metrics(None) == {"zloss/last": float(terms["zloss/z"])}


def test_no_plugins_is_the_plain_loss_function() -> None:
    assert make_loss_fn([]) is lm_loss


@pytest.mark.parametrize("override, expected", [
    ("plugins=[{type: zlos}]", "plugins.0: unknown plugin 'zlos'; did you mean 'zloss'?"),
    ("plugins=[{type: zloss, wieght: 1}]", "plugins.0: unknown key wieght — did you mean 'weight'?"),
    ("plugins=[{type: zloss, weight: -1}]", "plugins.0.weight: got -1"),
    ("plugins=[{type: zloss}, {type: zloss}]", "listed more than once"),
    ("plugins=[{weight: 1}]", "plugins.0: a plugin is a mapping with a `type:` key"),
])
def test_bad_plugin_blocks_name_the_field(zloss, override: str, expected: str) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, [override])
    assert expected in str(info.value)


def test_a_plugin_that_reads_the_logits_is_refused_with_a_chunked_loss(zloss) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(TINY, ["plugins=[{type: zloss}]", "train.loss_chunk_tokens=32"])
    assert ("plugins.0 (zloss): its losses read the whole logits, which train.loss_chunk_tokens=32 never builds; "
            "set train.loss_chunk_tokens=0") in str(info.value)


class EntryConfig(PluginConfig):
    type: str = "from-entry-point"


def test_entry_points_are_loaded_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import EntryPoint
    from typing import Literal

    from pydantic import Field

    module = types.ModuleType("third_party_plugin")

    class Cfg(PluginConfig):
        type: Literal["third-party"] = Field(description="Plugin name.")

    class ThirdParty(Plugin):
        order = 70

    module.ENTRY = (Cfg, ThirdParty)
    monkeypatch.setitem(sys.modules, "third_party_plugin", module)
    seen = []

    def fake_entry_points(group: str):
        seen.append(group)
        return [EntryPoint(name="third-party", value="third_party_plugin:ENTRY", group=group)]

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    monkeypatch.setitem(registry._loaded, "entry_points", False)
    registry.lookup("qat")  # a built-in: entry points stay unread
    assert seen == []
    config_cls, plugin_cls = registry.lookup("third-party")
    assert seen == ["slimtrain.plugins"] and plugin_cls is ThirdParty and plugin_cls.name == "third-party"
    assert registry.validate_plugin_config({"type": "third-party"}) == Cfg(type="third-party")


def test_a_config_without_a_literal_type_cannot_register() -> None:
    with pytest.raises(TypeError, match="Literal"):
        registry.register_plugin("from-entry-point", EntryConfig)


def test_the_loop_and_assembly_name_no_plugin() -> None:
    names = registry.plugin_names()
    for rel in ("trainer/lifecycle/loop.py", "trainer/lifecycle/run.py", "trainer/loss/lm.py", "trainer/export/hf.py",
                "modules/plugin_stack.py", "trainer/export/consolidate.py"):
        text = (REPO / rel).read_text().lower()
        for name in names:
            assert not re.search(rf"\b{re.escape(name)}\b", text), (rel, name)
