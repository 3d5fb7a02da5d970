"""The `compressor` plugin's recipe block: the model side (config.py) plus how it trains and what it is fed."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slimtrain.modules.plugin import PluginConfig

from .config import CompressorModelConfig


class ExtraDecoder(BaseModel):
    """One more decoder the encoder learns to serve (ARC's multi-decoder training), always frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Its projector's key (`projectors.<name>` in the export), the suffix of its "
                      "metrics and loss term, and `slimtrain compress --decoder <name>`.")
    path: str = Field(description="A local Hugging Face directory of a dense LlamaForCausalLM, MistralForCausalLM, "
                      "Qwen2ForCausalLM or Qwen3ForCausalLM (an export of one of our runs, or a released "
                      "checkpoint) trained with the data's tokenizer.")


class CompressorConfig(PluginConfig, CompressorModelConfig):
    """An ARC-Encoder-style context compressor trained with (or for) the decoder (docs/compressor.md)."""

    type: Literal["compressor"] = Field(description="Plugin name.")
    decoder: Literal["frozen", "joint"] = Field(
        "frozen", description="frozen: the decoder's parameters never change, only the encoder and projector train "
        "(ARC-Encoder's setting: the stock decoder serves the vectors unchanged; branch from a trained run). joint: "
        "the decoder trains with them and learns to read compressed context while it is pretrained.")
    context_tokens: int = Field(64, ge=1, description="C: the longest context span an example compresses (shorter "
                                "at the end of a document).")
    continuation_tokens: int = Field(64, ge=2, description="T: the longest continuation an example's decoder "
                                     "predicts after the compressed context (the same document's next tokens).")
    min_context_tokens: int = Field(8, ge=1, description="A document segment with fewer tokens left than this plus "
                                    "two gives no further example.")
    prefix_tokens: int = Field(0, ge=0, description="Continuation examples read up to this many uncompressed tokens "
                               "of the same document before the compressed span (ARC's optional prefix; the length "
                               "drawn per example in [0, prefix_tokens]); 0: none. Never a target.")
    reconstruction_fraction: float = Field(
        0.2, ge=0, le=1, description="Share of examples whose target is the context itself (decoder reads the "
        "vectors and <Rec>, then rewrites the span; ARC: 20 %); the others continue it after <Cont>.")
    task_vectors: bool = Field(
        True, description="A learned <Rec> or <Cont> vector after each compressed span says which task follows "
        "(ARC-Encoder); false: none, the first target token is predicted from the last compressed vector (needs "
        "reconstruction_fraction 0: nothing would tell the two tasks apart).")
    lr_scale: float = Field(1.0, gt=0, description="Learning-rate multiplier of the encoder (ARC: 1e-5).")
    projector_lr_scale: float = Field(1.0, gt=0, description="Learning-rate multiplier of the projector and its "
                                      "<Rec>/<Cont> embeddings (ARC: 5e-5, five times the encoder's).")
    decoders: list[ExtraDecoder] = Field(
        default_factory=list, description="More decoders for the same encoder, each with its own projector and "
        "<Rec>/<Cont> embeddings (ARC-Encoder's multi-decoder training). Each step draws one decoder uniformly, the "
        "run's own (named main) included, and the compressor learns through it; every evaluation measures them all.")
    eval_exact_match: int = Field(4, ge=0, description="Held-out reconstruction examples per rank decoded greedily "
                                  "at every evaluation for the exact-match rate (0 skips it).")

    @model_validator(mode="after")
    def _check_lengths(self) -> "CompressorConfig":
        if self.min_context_tokens > self.context_tokens:
            raise ValueError(f"min_context_tokens={self.min_context_tokens} exceeds context_tokens="
                             f"{self.context_tokens}; lower it to at most {self.context_tokens}")
        names = [d.name for d in self.decoders]
        if "main" in names or len(set(names)) < len(names):
            raise ValueError(f"decoders names {names} must be distinct and not 'main' (the run's own decoder's "
                             "name); rename them")
        if not self.task_vectors and self.reconstruction_fraction:
            raise ValueError(f"reconstruction_fraction={self.reconstruction_fraction} with task_vectors: false: "
                             "without <Rec>/<Cont> the decoder cannot tell a reconstruction from a continuation; set "
                             "reconstruction_fraction: 0 or task_vectors: true")
        return self
