"""`slimtrain make-checkpoint FAMILY OUT`: a small random-weight checkpoint of a released family, with a tokenizer in
that family's conventions, to try continued pretraining on a CPU (the CPU recipes in recipes/continue-*-cpu.yaml
start from these) and to test imports without downloading weights.

Each preset copies what its family's released checkpoints do that matters to an import: Llama 3.2's `llama3` RoPE
scaling, theta 500000, tied embeddings and `<|begin_of_text|>` BOS; SmolLM's tied Llama; Qwen2.5's q/k/v biases and
an embedding padded past the tokenizer (Qwen ships 151,936 rows for ~151,6xx tokens); Qwen3's q/k norms and a head
width independent of hidden/heads; Mistral's sliding window and `<s>` BOS. Weights are drawn by transformers' own
initialisation and saved in bf16, as released checkpoints are. The tokenizer is a byte-level BPE trained on a slice
of the Python standard library (no download), with the family's special tokens and a chat template.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Sizes shared by every preset: small enough for two CPU ranks, wide enough to train.
_TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048)
_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}")
_MISTRAL_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@dataclass(frozen=True)
class Preset:
    """One family's tiny checkpoint: the transformers classes, the config keys that make it that family, and its
    tokenizer's special tokens. pad_rows_to: the embedding rows are the tokenizer's size rounded up to this."""

    model_class: str
    config_class: str
    config: dict[str, Any]
    bos: str | None
    eos: str
    pad: str | None
    specials: tuple[str, ...] = ()
    chat_template: str | None = None
    pad_rows_to: int = 1
    add_bos: bool = field(default=False)


PRESETS = {
    "llama3": Preset("LlamaForCausalLM", "LlamaConfig", dict(
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        tie_word_embeddings=True, rms_norm_eps=1e-5, head_dim=32),
        bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
        specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), chat_template=_LLAMA3_CHAT, add_bos=True),
    "smollm": Preset("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=True, rms_norm_eps=1e-5,
                                                             rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 100000.0}),
                     bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>", specials=("<|endoftext|>",),
                     chat_template=_CHATML),
    "qwen2": Preset("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True, rms_norm_eps=1e-6,
                                                            rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 1000000.0}),
                    bos=None, eos="<|endoftext|>", pad="<|endoftext|>", specials=("<|im_start|>", "<|im_end|>"),
                    chat_template=_CHATML, pad_rows_to=64),
    "qwen3": Preset("Qwen3ForCausalLM", "Qwen3Config", dict(tie_word_embeddings=True, rms_norm_eps=1e-6, head_dim=48,
                                                            rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 1000000.0}),
                    bos=None, eos="<|endoftext|>", pad="<|endoftext|>", specials=("<|im_start|>", "<|im_end|>"),
                    chat_template=_CHATML, pad_rows_to=64),
    "mistral": Preset("MistralForCausalLM", "MistralConfig", dict(sliding_window=96, rms_norm_eps=1e-5,
                                                                  tie_word_embeddings=False),
                      bos="<s>", eos="</s>", pad=None, specials=("<unk>", "[INST]", "[/INST]"),
                      chat_template=_MISTRAL_CHAT, add_bos=True),
}


def _corpus(max_bytes: int) -> list[str]:
    """A slice of the standard library's sources, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, used = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        used += len(text)
        if used >= max_bytes:
            break
    return texts


def make_tokenizer(preset: Preset, vocab_size: int, out: Path) -> Any:
    """A byte-level BPE with `preset`'s special tokens (BOS added by its post-processor where the family adds one),
    saved in `out`; returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(t for t in (preset.eos, preset.bos, preset.pad, *preset.specials) if t))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(2_000_000), trainer)
    if preset.add_bos:
        bos_id = tok.token_to_id(preset.bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{preset.bos} $A", pair=f"{preset.bos} $A $B",
                                                           special_tokens=[(preset.bos, bos_id)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=preset.bos, eos_token=preset.eos,
                                 pad_token=preset.pad, additional_special_tokens=list(preset.specials))
    if preset.chat_template:
        hf.chat_template = preset.chat_template
    hf.save_pretrained(str(out))
    return hf


def make_checkpoint(family: str, out: Path, *, vocab_size: int = 4000, seed: int = 0) -> Path:
    """Write `family`'s tiny random checkpoint (bf16 safetensors, config.json, tokenizer) into `out` (created)."""
    import torch
    import transformers

    if family not in PRESETS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[family]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(preset, vocab_size, out)
    rows = -(-len(tokenizer) // preset.pad_rows_to) * preset.pad_rows_to
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = getattr(transformers, preset.config_class)(**_TINY, **preset.config, **ids, vocab_size=rows,
                                                        architectures=[preset.model_class])
    torch.manual_seed(seed)
    model = getattr(transformers, preset.model_class)(config)
    _perturb(model, seed)
    model.to(torch.bfloat16).save_pretrained(str(out))
    return out


def _perturb(model: Any, seed: int) -> None:
    """Nonzero biases and norm scales away from 1 (transformers initialises them to 0 and 1): an import that dropped
    or misplaced one would then change the logits, and the parity checks would see it."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            elif "norm" in name:
                param.copy_(1 + torch.randn(param.shape, generator=generator) * 0.1)


def add_parser(sub: Any) -> None:
    """The `make-checkpoint` sub-command."""
    p = sub.add_parser("make-checkpoint", help="write a small random-weight checkpoint of a released family "
                       "(llama3, smollm, qwen2, qwen3, mistral), with its tokenizer, for CPU continued pretraining")
    p.add_argument("family", choices=sorted(PRESETS))
    p.add_argument("out", help="output directory")
    p.add_argument("--vocab-size", type=int, default=4000, help="tokenizer vocabulary (BPE merges + specials)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    out = make_checkpoint(args.family, Path(args.out), vocab_size=args.vocab_size, seed=args.seed)
    config = json.loads((out / "config.json").read_text())
    print(f"{out}: {config['architectures'][0]}, {config['vocab_size']} embedding rows, "
          f"{config['num_hidden_layers']} layers of width {config['hidden_size']}")
    return 0
