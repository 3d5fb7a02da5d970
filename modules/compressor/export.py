"""The compressor's serving export: a standalone `compressor/` directory beside the decoder's plain Hugging Face
export, its reload (`load_compressor`), and the decoder-ready embeddings a serving engine takes (`compress_text`).

    OUT/              the decoder alone (its family's class for a dense one: LlamaForCausalLM, Qwen3ForCausalLM,
                      ...): no compressor tensor is left in it
    OUT/compressor/   model.safetensors: our names under the compressor (`encoder.embed.weight`,
                      `encoder.layers.{i}.attn.q_proj.weight`, `projectors.{decoder}.down.weight`, ... and the
                      `<Rec>` / `<Cont>` embeddings `projectors.{decoder}.rec_embed` / `cont_embed`, in encoder
                      space); config.json: everything needed to rebuild it without the recipe.

No serving engine loads an ARC-style encoder (ARC itself saves its own layout, export-formats.md 3): engines take
the encoder's output instead, as prompt embeddings (vLLM `{"prompt_embeds": [seq, hidden]}`, transformers
`generate(inputs_embeds=...)`), which `compress_text` builds and `slimtrain compress` writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from slimtrain.modules.plugin import ExportContext, ExportVariant, StateDict
from slimtrain.modules.transformer import ModelConfig, Transformer

from .compressor import MAIN, ContextCompressor
from .config import CompressorModelConfig, encoder_model_config
from .projector import Task
from .recipe import CompressorConfig
from .spans import Spans

PREFIX = "compressor."
VARIANT = "compressor"
FORMAT = "slimtrain_compressor"
FORMAT_VERSION = 1
# Model-side fields that apply to one pooling only: the config refuses them under the other (they are dropped
# from config.json rather than written with their unused defaults).
_MEAN_ONLY = ("pooling_factor", "vectors_per_span", "pooled_layers")
_MEMORY_ONLY = ("num_memory_tokens",)

README = """**compressor/**: the context compressor (encoder, projector and `<Rec>`/`<Cont>` embeddings) in slimtrain's
own layout, for the decoder in the parent directory. config.json says how to rebuild it;
`slimtrain.modules.compressor.export.load_compressor(path)` does.

Compress a context into the embeddings the decoder reads (a `[seq, hidden]` tensor: the prompt's token
embeddings with the compressed vectors spliced in, written with `torch.save`):

    slimtrain compress EXPORT_DIR --text context.txt --prompt "The next part" --out compressed.pt --generate 32

The layout is the one the compressor trained on: the context's vectors, then its `<Cont>` (or `<Rec>`) vector
when it trained with task vectors, then the prompt's tokens, at positions 0, 1, ... Serve the parent directory
with vLLM (prompt embeddings must be enabled; the file is fp32: cast it to the dtype
the model is served in):

    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model="EXPORT_DIR", dtype="bfloat16", enable_prompt_embeds=True)
    embeds = torch.load("compressed.pt").to(torch.bfloat16)  # [seq_len, hidden_size]
    out = llm.generate({"prompt_embeds": embeds}, SamplingParams(temperature=0, max_tokens=32))

(`vllm serve EXPORT_DIR --enable-prompt-embeds` takes them in the Completions API.) With transformers:
`AutoModelForCausalLM.from_pretrained(EXPORT_DIR).generate(inputs_embeds=embeds[None], max_new_tokens=32,
do_sample=False)` returns the new tokens only.
"""


def export_compressor(cfg: CompressorConfig, ctx: ExportContext) -> None:
    """Take every compressor tensor out of the plain export and add the standalone `compressor/` variant."""
    own = {n.removeprefix(PREFIX): ctx.state.pop(n) for n in [n for n in ctx.state if n.startswith(PREFIX)]}
    expected = set(ctx.model.compressor.state_dict()) if hasattr(ctx.model, "compressor") else set()
    if set(own) != expected:  # a state from another model than the skeleton: refuse rather than write half of it
        missing, extra = sorted(expected - set(own)), sorted(set(own) - expected)
        raise ValueError(f"the checkpoint's compressor tensors do not match the compressor the recipe builds "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}); export with the recipe it was trained with")
    config = compressor_config(cfg, ctx.model_cfg, own)

    def tensors(hf_state: StateDict, hf_to_ours: dict[str, str]) -> StateDict:
        like = hf_state["model.norm.weight"]  # the export's dtype
        return {n: t.detach().to(like.dtype).clone() for n, t in own.items()}

    def keys(hf_to_ours: dict[str, str]) -> dict[str, Any]:
        return config

    ctx.variants.append(ExportVariant(VARIANT, tensors, keys, README, standalone=True))
    ctx.notes.append(f"context compressor: {VARIANT}/ holds the encoder and projector (pooling {_pooling(cfg)}); "
                     "`slimtrain compress` turns a context into prompt embeddings for this model (see its README)")


def compressor_config(cfg: CompressorConfig, decoder: ModelConfig, own: StateDict) -> dict[str, Any]:
    """The variant's config.json: the model-side config, the encoder's architecture, the decoders' widths, and
    what the training examples looked like (the serving layout must match them)."""
    fields = set(CompressorModelConfig.model_fields) - set(_MEMORY_ONLY if cfg.pooling == "mean" else _MEAN_ONLY)
    model_side = cfg.model_dump(mode="json", include=fields)
    encoder = encoder_model_config(cfg, decoder)
    projectors = {n.split(".")[1]: int(t.shape[0]) for n, t in own.items()
                  if n.startswith("projectors.") and n.endswith(".up.weight")}
    memory = cfg.num_memory_tokens if cfg.pooling == "memory" else 0
    return {
        "model_type": FORMAT, "format_version": FORMAT_VERSION, "compressor": model_side,
        "encoder_model": encoder.model_dump(mode="json"),
        "decoder": {"hidden_size": decoder.hidden_size, "vocab_size": decoder.vocab_size, "path": ".."},
        "projectors": projectors, "pooling_factor": cfg.factor, "task_vectors": cfg.task_vectors,
        "context_tokens": cfg.context_tokens, "continuation_tokens": cfg.continuation_tokens,
        "prefix_tokens": cfg.prefix_tokens,
        "max_context_tokens": encoder.max_seq_len - memory,
        "layout": "decoder input = [uncompressed prefix, up to prefix_tokens] + [the span's vectors] + [<Cont> or "
                  "<Rec> vector if task_vectors] + [prompt after], positions 0.. from its start",
    }


def _pooling(cfg: CompressorModelConfig) -> str:
    if cfg.pooling == "memory":
        return f"{cfg.num_memory_tokens} memory tokens per span"
    return f"factor {cfg.factor}" if cfg.factor is not None else f"{cfg.vectors_per_span} vectors per span"


# -- reload ------------------------------------------------------------------------------------------------


def read_compressor_config(directory: Path | str) -> dict[str, Any]:
    """The `compressor/` variant's config.json, checked to be one this code writes."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: point at the compressor/ directory of an export of a run trained "
                                "with the compressor plugin")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a slimtrain compressor export (model_type {config.get('model_type')!r}, "
                         f"format_version {config.get('format_version')!r}; expected {FORMAT!r}, {FORMAT_VERSION})")
    return config


def load_compressor(directory: Path | str, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> ContextCompressor:
    """The `compressor/` directory of an export as our `ContextCompressor` (eval mode), loaded strictly.

    dtype: None keeps the saved tensors' dtype (the export's); the module is built in fp32 first, so the values
    are the saved ones exactly in either case."""
    directory = Path(directory)
    config = read_compressor_config(directory)
    cfg = CompressorModelConfig.model_validate(config["compressor"])
    encoder = ModelConfig.model_validate(config["encoder_model"])
    # The encoder's own config stands in for the decoder's: a truncated encoder is the decoder's architecture cut
    # to its layers (so it truncates to itself), a separate one reads only its vocabulary.
    compressor = ContextCompressor(cfg, encoder, decoders=config["projectors"])
    if compressor.encoder.model_cfg != encoder:
        raise ValueError(f"{directory}/config.json: the encoder rebuilt from `compressor` differs from "
                         "`encoder_model`; the file was edited or written by another version")
    state = _read_safetensors(directory)
    compressor.load_state_dict(state, strict=True)
    saved = next(t.dtype for t in state.values() if t.is_floating_point())
    return compressor.to(device=device, dtype=dtype or saved).eval()


def _read_safetensors(directory: Path) -> StateDict:
    """Every tensor of the directory's .safetensors files (one file or shards)."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no .safetensors file; point at the compressor/ directory of an "
                                "export")
    return {name: tensor for f in files for name, tensor in load_file(str(f)).items()}


# -- serving -----------------------------------------------------------------------------------------------


@torch.no_grad()
def compress_text(compressor: ContextCompressor, decoder: Transformer, context_ids: Sequence[int],
                  prompt_ids_before: Sequence[int] = (), prompt_ids_after: Sequence[int] = (),
                  task: Task | None = "cont", decoder_name: str = MAIN) -> torch.Tensor:
    """[seq, hidden]: the decoder-ready embeddings of a context and its surrounding prompt.

    The token embeddings of `prompt_ids_before`, then the compressed vectors of `context_ids` (one span) with the
    `task` vector after them, then the token embeddings of `prompt_ids_after`; read by the decoder at positions
    0 .. seq-1: the layout of a training example, whose prefix (up to the recipe's `prefix_tokens`, 0 by default)
    is the same document's tokens before the span. task: "cont" or "rec" for
    a compressor trained with task vectors (config.json `task_vectors`), None for one trained without.
    In the decoder's dtype and on its device (vLLM's `prompt_embeds`, transformers' `inputs_embeds[0]`).
    """
    weight = decoder.embed.weight
    vocab = weight.shape[0]
    for name, ids in (("context_ids", context_ids), ("prompt_ids_before", prompt_ids_before),
                      ("prompt_ids_after", prompt_ids_after)):
        bad = [i for i in ids if not 0 <= int(i) < vocab]
        if bad:
            raise ValueError(f"{name} holds token id {bad[0]}, outside the decoder's vocabulary of {vocab}; tokenize "
                             "with the export's own tokenizer")
    if not len(context_ids):
        raise ValueError("context_ids is empty: give at least one context token to compress")
    spans = Spans.from_lists([list(context_ids)], device=compressor.encoder.embed.weight.device)
    vectors = compressor.compress(spans, task, decoder_name).vectors
    if vectors.shape[-1] != weight.shape[1]:
        raise ValueError(f"the compressor's projector {decoder_name!r} writes {vectors.shape[-1]}-wide vectors but the "
                         f"decoder is {weight.shape[1]} wide; load the decoder of the same export")

    def embed(ids: Sequence[int]) -> torch.Tensor:
        return decoder.embed(torch.tensor(list(ids), dtype=torch.long, device=weight.device))

    return torch.cat([embed(prompt_ids_before), vectors.to(device=weight.device, dtype=weight.dtype),
                      embed(prompt_ids_after)])
