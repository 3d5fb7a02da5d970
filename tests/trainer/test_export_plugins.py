"""Export and import through plugins: a plugin's own tensors under its own HF names (its `hf_adapter()`) with
its config keys, the architecture a plugin chooses, `--verify` with every plugin applied, `init_from_hf` back
into a plugin-applied model bit for bit, the refusals, and `slimtrain export --verify` reading a checkpoint once."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from pydantic import Field
from torch import nn

from slimtrain.modules.hf_adapters import ADAPTERS, get_adapter, register_adapter
from slimtrain.modules.plugin import HFAdapter, Plugin, PluginConfig, WeightInit
from slimtrain.modules.plugin_registry import register_plugin, validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig
from slimtrain.trainer.backends.build import ModelInit, build_model
from slimtrain.trainer.errors import CheckpointError, RecipeError
from slimtrain.trainer.export.hf import read_hf_config, write_hf_dir
from slimtrain.trainer.export.importer import load_hf_into
from slimtrain.trainer.export.verify import compare_logits

REPO = Path(__file__).resolve().parents[2]
MODEL = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
CFG = ModelConfig(vocab_size=40, **MODEL)
IDS = {"bos_id": None, "eos_id": 0, "pad_id": 1}
HEAD, ORPHAN, GREEDY, ARCH = "export-test-head", "export-test-orphan", "export-test-greedy", "export-test-arch"


# -- the test plugins ------------------------------------------------------------------------------------------

class HeadConfig(PluginConfig):
    """A small extra head (a draft head's shape) whose tensors the plugin's own adapter exports."""

    type: Literal["export-test-head"] = Field(description="Plugin name.")
    width: int = Field(8, gt=0, description="Hidden width of the head.")


def _head_to_hf(state: dict, cfg: ModelConfig) -> dict:
    return {"mtp." + k.removeprefix("extra_head."): v for k, v in state.items()}


def _head_from_hf(hf: dict, cfg: ModelConfig) -> dict:
    return {"extra_head." + k.removeprefix("mtp."): v for k, v in hf.items() if k.startswith("mtp.")}


@register_plugin(HEAD, HeadConfig)
class HeadPlugin(Plugin):
    order = 60

    def apply(self, model: nn.Module) -> None:
        h, w = model.cfg.hidden_size, self.cfg.width
        model.extra_head = nn.Sequential(nn.Linear(h, w), nn.SiLU(), nn.Linear(w, h, bias=False))

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        for name, p in model.extra_head.named_parameters():
            if f"extra_head.{name}" not in init.imported:
                p.copy_(torch.randn(p.shape, generator=init.generator) * 0.02)

    def hf_adapter(self) -> HFAdapter:
        return HFAdapter(owns=lambda name: name.startswith("extra_head."), to_hf=_head_to_hf, from_hf=_head_from_hf,
                         config=lambda cfg: {"mtp_width": self.cfg.width})


class OrphanConfig(PluginConfig):
    type: Literal["export-test-orphan"] = Field(description="Plugin name.")


@register_plugin(ORPHAN, OrphanConfig)
class OrphanPlugin(Plugin):
    """Adds a tensor and no adapter for it."""

    def apply(self, model: nn.Module) -> None:
        model.orphan = nn.Linear(4, 4, bias=False)

    def init_weights(self, model: nn.Module, init: WeightInit) -> None:
        model.orphan.weight.zero_()


class GreedyConfig(PluginConfig):
    type: Literal["export-test-greedy"] = Field(description="Plugin name.")


@register_plugin(GREEDY, GreedyConfig)
class GreedyPlugin(Plugin):
    """Claims the head's tensors too."""

    def hf_adapter(self) -> HFAdapter:
        return HFAdapter(owns=lambda name: name.startswith("extra_head."), to_hf=_head_to_hf, from_hf=_head_from_hf)


class ArchConfig(PluginConfig):
    type: Literal["export-test-arch"] = Field(description="Plugin name.")
    architecture: str = Field("export-test-llama", description="Architecture adapter the model exports as.")


@register_plugin(ARCH, ArchConfig)
class ArchPlugin(Plugin):
    def hf_architecture(self, model_cfg: ModelConfig) -> str | None:
        return self.cfg.architecture


def _marked_llama_config(cfg: ModelConfig, **kw):
    config = get_adapter("llama").hf_config(cfg, **kw)
    config.export_test_marker = True
    return config


if "export-test-llama" not in ADAPTERS:  # a plugin module registers the architecture it exports as, at import
    register_adapter("export-test-llama", replace(get_adapter("llama"), hf_config=_marked_llama_config))


def stack(*types: str) -> PluginStack:
    """Fresh plugin instances (a plugin keeps the modules it applied to)."""
    configs = {HEAD: HeadConfig, ORPHAN: OrphanConfig, GREEDY: GreedyConfig, ARCH: ArchConfig}
    return PluginStack.from_configs([configs[t](type=t) for t in types])


def built(plugins: PluginStack, seed: int = 0, init_from_hf: Path | None = None) -> nn.Module:
    """The model as a run builds it: meta -> plugins apply -> materialise -> init (or import) -> plugins init."""
    return build_model(CFG, plugins, ModelInit(seed=seed, init_from_hf=init_from_hf), torch.device("cpu"))


def export(model: nn.Module, plugins: PluginStack, out: Path, step: int = 5) -> Path:
    ctx = plugins.export(model.state_dict(), CFG, step=step)
    return write_hf_dir(ctx.state, CFG, out, tokenizer_dir=None, ids=IDS, plugins=plugins, plugin_export=ctx)


# -- export, verify, import ------------------------------------------------------------------------------------

def test_a_plugins_tensors_leave_under_its_names_and_verify_with_it_applied(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    plugins = stack(HEAD)
    model = built(plugins)
    out = export(model, plugins, tmp_path / "hf")
    saved = load_file(out / "model.safetensors")
    assert {k for k in saved if k.startswith("mtp.")} == {"mtp.0.weight", "mtp.0.bias", "mtp.2.weight"}
    assert not any(k.startswith("extra_head.") for k in saved)
    assert torch.equal(saved["mtp.2.weight"], model.extra_head[2].weight)
    config = read_hf_config(out)
    assert config["mtp_width"] == 8 and config["architectures"] == ["LlamaForCausalLM"]
    # --verify's model: every plugin applied, the trained state loaded (the head's tensors included)
    assert compare_logits(out, model.state_dict(), CFG, plugins=stack(HEAD), step=5) <= 1e-4


def test_init_from_hf_brings_a_plugin_export_back_bit_for_bit(tmp_path: Path) -> None:
    model = built(stack(HEAD), seed=0)
    out = export(model, stack(HEAD), tmp_path / "hf")
    back = built(stack(HEAD), seed=1, init_from_hf=out)  # another seed: only the import can make them equal
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    fresh = built(stack(HEAD), seed=2)
    filled = load_hf_into(fresh, CFG, out, stack(HEAD))
    assert {"extra_head.0.weight", "extra_head.0.bias", "extra_head.2.weight", "embed.weight"} <= filled


def test_a_dense_export_imports_into_a_plugin_model_which_initialises_its_own(tmp_path: Path) -> None:
    dense = built(PluginStack(), seed=0)
    out = export(dense, PluginStack(), tmp_path / "hf")
    model = built(stack(HEAD), seed=1, init_from_hf=out)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.state_dict().items())
    assert model.extra_head[0].weight.abs().sum() > 0  # the plugin initialised what the directory lacks


def test_a_tensor_no_adapter_claims_is_refused_on_export_and_on_import(tmp_path: Path) -> None:
    plugins = stack(ORPHAN)
    with pytest.raises(CheckpointError, match=r"no adapter claims: \['orphan.weight'\]"):
        export(built(plugins), plugins, tmp_path / "orphan")
    assert not (tmp_path / "orphan").exists() and not (tmp_path / "orphan.partial").exists()
    out = export(built(stack(HEAD)), stack(HEAD), tmp_path / "hf")
    with pytest.raises(RecipeError, match=r"directory holds tensors that no adapter claims: \['mtp.0.bias', "
                                          r"'mtp.0.weight', 'mtp.2.weight'\]"):
        built(PluginStack(), init_from_hf=out)  # the recipe lacks the plugin that wrote them
    narrower = PluginStack.from_configs([HeadConfig(type=HEAD, width=4)])
    with pytest.raises(RecipeError, match="the recipe's plugins give mtp_width=4 but config.json has 8"):
        built(narrower, init_from_hf=out)  # the plugin's adapter config key is checked before any tensor


def test_a_tensor_claimed_twice_is_refused(tmp_path: Path) -> None:
    plugins = stack(HEAD, GREEDY)
    with pytest.raises(CheckpointError, match=r"tensor 'extra_head.0.weight' is owned by the hf_adapter\(\) of "
                                              rf"plugins \['{GREEDY}', '{HEAD}'\]"):  # composition order
        export(built(plugins), plugins, tmp_path / "twice")
    out = export(built(stack(HEAD)), stack(HEAD), tmp_path / "hf")
    with pytest.raises(RecipeError, match="claimed twice"):
        built(stack(HEAD, GREEDY), init_from_hf=out)


def test_a_plugin_chooses_the_architecture(tmp_path: Path) -> None:
    out = export(built(stack(ARCH)), stack(ARCH), tmp_path / "hf")
    assert read_hf_config(out)["export_test_marker"] is True
    plugins = PluginStack.from_configs([ArchConfig(type=ARCH, architecture="qwen3_moe")])
    with pytest.raises(CheckpointError, match="architecture 'qwen3_moe' has no adapter"):
        export(built(plugins), plugins, tmp_path / "moe")
    assert not (tmp_path / "moe").exists()


# -- `slimtrain export --verify` on a checkpoint ------------------------------------------------------------------

def fake_checkpoint(run: Path, state: dict[str, torch.Tensor], plugins: list[dict], step: int) -> Path:
    """A complete ZeRO-0 fp32 checkpoint directory holding `state`, as `save_checkpoint` lays it out."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = run / "checkpoints" / f"step_{step:08d}"
    (path / "ds").mkdir(parents=True)
    torch.save({"module": state}, path / "ds" / "mp_rank_00_model_states.pt")
    recipe = yaml.safe_load((REPO / "recipes" / "tiny-cpu.yaml").read_text())
    recipe.update(model=MODEL, plugins=plugins)
    recipe["backend"]["zero_stage"] = 0
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "tokens_seen": 0, "tokenizer": IDS,
                                                         "model_config": CFG.model_dump(mode="json")}))
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(CFG.vocab_size)}, unk_token="w2"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w2").save_pretrained(path / "tokenizer")
    files = {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}
    (path / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
    return path


def test_export_verify_reads_the_checkpoint_once_and_checks_with_the_plugins(tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import load_file

    import slimtrain.trainer.export.consolidate as consolidate
    from slimtrain.trainer.cli import main

    calls = {"validate_recipe": 0, "consolidate": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(consolidate, name, counted(name, getattr(consolidate, name)))
    model = built(stack(HEAD))
    fake_checkpoint(tmp_path / "run", model.state_dict(), [{"type": HEAD}], step=5)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--verify"]) == 0
    assert calls == {"validate_recipe": 1, "consolidate": 1}
    assert "mtp.0.weight" in load_file(tmp_path / "hf" / "model.safetensors")
    # and it tells: the same export against another run's checkpoint is far off
    from slimtrain.trainer.export.verify import verify_export

    fake_checkpoint(tmp_path / "other", built(stack(HEAD), seed=1).state_dict(), [{"type": HEAD}], step=5)
    assert verify_export(tmp_path / "hf", consolidate.load_checkpoint_for_export(tmp_path / "other")) > 1e-2


def test_export_verify_holds_a_qat_checkpoint_to_the_trained_fake_quantized_model(tmp_path: Path) -> None:
    """LSQ int4: the checkpoint holds raw weights and learned steps; the export their dequantized product."""
    from slimtrain.modules.plugin import PluginContext
    from slimtrain.trainer.cli import main

    block = {"type": "qat", "weights": {"format": "int", "bits": 4, "group_size": 32}, "estimator": "lsq"}
    plugins = PluginStack.from_configs([validate_plugin_config(block)])
    model = built(plugins)
    plugins.on_step_start(PluginContext(model=model, step=1))
    with torch.no_grad():
        model(torch.randint(0, CFG.vocab_size, (1, 8)))  # the first quantized forward calibrates the steps
        for name, p in model.named_parameters():
            if name.endswith("weight_step_gain"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)  # as if learned
    fake_checkpoint(tmp_path / "run", model.state_dict(), [block], step=4)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf"), "--verify"]) == 0

