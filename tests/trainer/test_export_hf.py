"""Export to Hugging Face: logits parity through transformers' own loader, ZeRO-3 == ZeRO-0, import, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.modules.transformer.generate import greedy_generate
from slimtrain.trainer.errors import CheckpointError
from slimtrain.trainer.export.hf import export_checkpoint, write_hf_dir
from slimtrain.trainer.export.verify import compare_logits
from train_helpers import run_train

CONFIGS = {
    "gqa-untied": dict(vocab_size=250, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2),
    "mha-tied-theta": dict(vocab_size=123, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                           tie_embeddings=True, rope_theta=500000.0),
    "mqa-headdim": dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                        num_kv_heads=1, head_dim=24, rope_theta=1e6),
}
IDS = {"bos_id": None, "eos_id": 0, "pad_id": 1}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_dir_matches_our_logits_and_greedy_tokens(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(max_seq_len=64, **CONFIGS[name])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    out = write_hf_dir(model.state_dict(), cfg, tmp_path / "hf", tokenizer_dir=None, ids=IDS)
    assert compare_logits(out, model.state_dict(), cfg) <= 1e-4
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = torch.randint(2, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    ours = greedy_generate(model, prompt, 32)
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert torch.equal(ours[0, -32:], theirs[0, -32:])


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_export_equals_zero0_and_zero2_exports_and_import_roundtrips(tmp_path: Path, data_cache: Path) -> None:
    z3 = tmp_path / "z3"
    proc = run_train(z3, data_cache, ["backend.zero_stage=3", "train.steps=3", "checkpoint.every=3"])
    assert proc.returncode == 0, proc.stdout
    e3 = export_checkpoint(z3, tmp_path / "e3")
    # ZeRO-0 and ZeRO-2 runs initialised from that export with a learning rate too small to change an
    # fp32 weight write checkpoints holding the very same weights through the other save paths.
    from safetensors.torch import load_file

    reference = load_file(e3 / "model.safetensors")
    for stage in (0, 2):
        run = tmp_path / f"z{stage}"
        proc = run_train(run, data_cache, [f"backend.zero_stage={stage}", "train.steps=1", "checkpoint.every=1",
                                           f"checkpoint.init_from_hf={e3}", "optim.lr=1e-30"])
        assert proc.returncode == 0, proc.stdout
        exported = load_file(export_checkpoint(run, tmp_path / f"e{stage}") / "model.safetensors")
        assert exported.keys() == reference.keys()
        assert all(torch.equal(exported[k], reference[k]) for k in reference), stage
    from slimtrain.trainer.cli import main

    assert main(["export", str(z3), str(tmp_path / "e3-bf16"), "--dtype", "bf16", "--verify"]) == 0
    generation = json.loads((e3 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == json.loads((e3 / "config.json").read_text())["eos_token_id"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (e3 / name).is_file(), name
    card = (e3 / "README.md").read_text()
    assert "| step | 3 of 3 |" in card and "eval_loss" in card and "zero_stage: 3" in card
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(e3)
    assert tok.decode(tok("def f(x):\n    return x", add_special_tokens=False).input_ids) == "def f(x):\n    return x"
    assert json.loads((e3 / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.slow
def test_a_zero0_bf16_export_carries_the_fp32_masters(tmp_path: Path, data_cache: Path) -> None:
    """ZeRO-0 in bf16 keeps bf16 weights in the module and the fp32 masters in its optimizer state."""
    from safetensors.torch import load_file

    from slimtrain.trainer.export.consolidate import resolve_checkpoint

    proc = run_train(tmp_path / "run", data_cache, ["backend.zero_stage=0", "backend.precision=bf16", "train.steps=3",
                                                    "checkpoint.every=3", "optim.lr=1e-2"], nproc=1)
    assert proc.returncode == 0, proc.stdout
    exported = load_file(export_checkpoint(tmp_path / "run", tmp_path / "hf") / "model.safetensors")
    saved = torch.load(next((resolve_checkpoint(tmp_path / "run") / "ds").glob("mp_rank_*_model_states.pt")),
                       map_location="cpu", weights_only=False)
    module = saved["module"]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert module["layers.0.attn.q_proj.weight"].dtype == torch.bfloat16
    assert not torch.equal(exported[q], exported[q].bfloat16().float())  # more than bf16 holds: the masters
    assert torch.equal(exported[q].bfloat16(), module["layers.0.attn.q_proj.weight"])  # whose rounding is the module


def test_verify_holds_bf16_exports_to_the_fp32_tolerance(tmp_path: Path) -> None:
    cfg = ModelConfig(max_seq_len=64, **CONFIGS["gqa-untied"])
    torch.manual_seed(0)
    model, other = Transformer(cfg).eval(), Transformer(cfg).eval()
    out = write_hf_dir(model.state_dict(), cfg, tmp_path / "hf", tokenizer_dir=None, ids=IDS, dtype=torch.bfloat16)
    assert compare_logits(out, model.state_dict(), cfg, dtype=torch.bfloat16) <= 1e-4
    assert compare_logits(out, other.state_dict(), cfg, dtype=torch.bfloat16) > 1e-2  # other weights: caught


def test_init_from_hf_refuses_what_the_decoder_would_compute_otherwise(tmp_path: Path) -> None:
    from slimtrain.trainer.errors import RecipeError
    from slimtrain.trainer.export.importer import check_hf_config

    cfg = ModelConfig(max_seq_len=64, **CONFIGS["gqa-untied"])
    out = write_hf_dir(Transformer(cfg).state_dict(), cfg, tmp_path / "hf", tokenizer_dir=None, ids=IDS)
    check_hf_config(out, cfg)  # its own export matches
    config = json.loads((out / "config.json").read_text())
    for change, message in (
        ({"rope_theta": 500000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
         "model.rope_theta=10000.0 but config.json's rope_theta gives 500000.0"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 32.0}},
         "model.rope_scaling=None but config.json's rope_parameters gives {'type': 'llama3', 'factor': 32.0"),
        ({"rms_norm_eps": 1e-6}, "model.norm_eps=1e-05 but config.json's rms_norm_eps gives 1e-06"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}, "rope_type='longrope'"),
        ({"attention_bias": True}, "model.qkv_bias=False but config.json's attention_bias gives True"),
    ):
        (out / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(RecipeError, match=re.escape(message)):
            check_hf_config(out, cfg)


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="does not exist"):
        export_checkpoint(tmp_path / "missing", out)
    incomplete = tmp_path / "run" / "checkpoints" / "step_00000010"
    (incomplete / "ds").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="incomplete: no manifest.json"):
        export_checkpoint(incomplete, out)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="pass --overwrite"):
        export_checkpoint(incomplete, out)
    assert (out / "keep.txt").read_text() == "user data"
    with pytest.raises(CheckpointError, match="--dtype 'int4' is not supported"):
        export_checkpoint(incomplete, tmp_path / "y", dtype="int4")
    assert not (tmp_path / "y").exists()
    # An architecture with no adapter (chosen by a plugin): test_export_plugins.py


def test_large_exports_are_sharded_with_an_index_that_loads(tmp_path: Path, monkeypatch) -> None:
    import slimtrain.trainer.export.hf as hf_module
    from slimtrain.trainer.export.importer import read_hf_state
    from slimtrain.modules.transformer.hf_llama import from_hf

    monkeypatch.setattr(hf_module, "MAX_SHARD_SIZE", "64KB")  # the real threshold is 5GB
    cfg = ModelConfig(max_seq_len=64, **CONFIGS["gqa-untied"])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    out = write_hf_dir(model.state_dict(), cfg, tmp_path / "hf", tokenizer_dir=None, ids=IDS)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and not (out / "model.safetensors").exists()
    assert compare_logits(out, model.state_dict(), cfg) <= 1e-4
    back = from_hf(read_hf_state(out), cfg)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
