"""The `draft` plugin's recipe block: which draft heads, how they train, how they are evaluated.

Every bad combination that can be seen without the model fails here; those that need the model's depth or
vocabulary (layer ids, draft vocabulary) fail in the plugin's `configure`, still before launch.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slimtrain.modules.plugin import PluginConfig


class _Head(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    loss_weight: float = Field(1.0, ge=0, description="Weight of this head's loss next to the language-modelling "
                               "loss (DeepSeek-V3's lambda for mtp; Medusa-2's heads coefficient).")
    loss_weight_schedule: list[tuple[int, float]] = Field(
        default_factory=list, description="Piecewise-constant weight over optimizer steps: [[step, weight], ...], "
        "each weight holding from its step on (e.g. [[0, 0.3], [8000, 0.1]] as DeepSeek-V3 anneals lambda); "
        "empty: loss_weight throughout.")
    decay: float = Field(1.0, gt=0, le=1, description="Draft position k (1-based) weighs decay^(k-1) within the "
                         "head's loss (Medusa-2 0.8, EAGLE-3 0.8); 1.0 weighs every position alike.")
    detach_base: bool = Field(
        False, description="Joint mode: the model's hidden states reach this head detached, so its loss trains the "
        "head and not the model's layers (Megatron's mtp_detach_heads); only the embedding and output head it "
        "shares (mtp's, and the token embeddings hydra and eagle3 read) still get its gradient. E.g. joint MTP "
        "shaping the model while Medusa heads follow it. A frozen base detaches every head.")

    @model_validator(mode="after")
    def _check_schedule(self) -> "_Head":
        steps = [s for s, _ in self.loss_weight_schedule]
        if steps != sorted(set(steps)) or any(s < 0 for s in steps):
            raise ValueError(f"loss_weight_schedule steps {steps} must be distinct, >= 0 and increasing")
        if any(w < 0 for _, w in self.loss_weight_schedule):
            raise ValueError("loss_weight_schedule weights must be >= 0")
        return self

    def weight_at(self, step: int) -> float:
        """The loss weight at optimizer step `step` (1-based)."""
        weight = self.loss_weight
        for start, w in self.loss_weight_schedule:
            if step >= start:
                weight = w
        return weight


class MTPHead(_Head):
    """DeepSeek-V3 multi-token prediction: `depth` sequential modules, module k predicting token t+k+1 from the
    previous depth's hidden state and the embedding of token t+k (shared embedding and output head)."""

    kind: Literal["mtp"] = Field(description="Head kind.")
    depth: int = Field(1, ge=1, description="Sequential MTP modules D (each one decoder block): draft tokens per step.")
    loss_weight: float = Field(0.3, ge=0, description="lambda: the MTP loss is lambda/D x the sum of the D modules' "
                               "losses (DeepSeek-V3: 0.3, then 0.1 late in training).")


class MedusaHead(_Head):
    """Medusa: `num_heads` independent heads on the last hidden state, head k predicting token t+k+1."""

    kind: Literal["medusa"] = Field(description="Head kind.")
    num_heads: int = Field(3, ge=1, description="Draft positions (Medusa heads).")
    num_layers: int = Field(1, ge=1, description="Residual blocks per head (x + SiLU(Linear(x)), zero-initialised).")
    loss_weight: float = Field(0.2, ge=0, description="Medusa-2's heads coefficient (0.2); with a frozen base any "
                               "positive value trains the same heads up to the learning rate.")
    decay: float = Field(0.8, gt=0, le=1, description="Head k weighs decay^(k-1) (Medusa-2: 0.8).")


class HydraHead(_Head):
    """Hydra: like Medusa, but head k also reads the embeddings of the k tokens drafted before it."""

    kind: Literal["hydra"] = Field(description="Head kind.")
    num_heads: int = Field(3, ge=1, description="Draft positions (Hydra heads).")
    num_layers: int = Field(1, ge=1, description="Residual blocks per head; the first projects (k+1)H to H.")
    loss_weight: float = Field(0.2, ge=0, description="Weight of the heads' loss.")
    decay: float = Field(0.8, gt=0, le=1, description="Head k weighs decay^(k-1).")


class Eagle3Head(_Head):
    """EAGLE-3: one decoder layer over the fused hidden states of three base layers and the next token's
    embedding, trained by unrolling its own drafts (training-time test), optionally over a reduced vocabulary."""

    kind: Literal["eagle3"] = Field(description="Head kind.")
    loss_weight: float = Field(0.2, ge=0, description="Weight of the unrolled steps' loss. It matters in joint mode, "
                               "where the heads' losses reach the model through the hidden states it fuses (at 1.0 "
                               "with Medusa and Hydra heads beside it, the quickstart model's eval loss rose 0.31 "
                               "nats); a frozen base trains the same head at any positive weight up to the "
                               "learning rate.")
    layers: list[int] | None = Field(
        None, description="The base layers whose incoming hidden states are fused (the state entering layer k, "
        "HF's hidden_states[k]; distinct, in 1 .. num_layers - 1); null: vLLM's default 2, L/2, L-3, or three "
        "evenly spaced layers where those are not distinct (fewer than 8 layers).")
    steps: int = Field(7, ge=1, description="Draft steps unrolled in training (EAGLE-3's test-time length 7) and "
                       "drafted per round in decoding.")
    decay: float = Field(0.8, gt=0, le=1, description="Step k weighs decay^(k-1) (EAGLE-3: 0.8; ModelOpt 0.9).")
    draft_vocab_size: int | None = Field(
        None, ge=1, description="Size of the draft's output vocabulary: the most frequent tokens of the training "
        "corpus (d2t/t2d maps in the export); null: the whole vocabulary.")

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The fused layers for a model of `num_layers` layers."""
        if self.layers is not None:
            return tuple(self.layers)
        ids = (2, num_layers // 2, num_layers - 3)
        if len(set(ids)) == 3 and min(ids) >= 1:
            return ids
        # speculators and vLLM refuse repeated layers: spread three over 1 .. L-1 (repeats only below 4 layers)
        last = num_layers - 1
        return tuple(max(1, round(1 + i * (last - 1) / 2)) for i in range(3))


HeadConfig = Annotated[Union[MTPHead, MedusaHead, HydraHead, Eagle3Head], Field(discriminator="kind")]


class DraftConfig(PluginConfig):
    """Draft heads trained with the model, for lossless speculative decoding (docs/draft.md)."""

    type: Literal["draft"] = Field(description="Plugin name.")
    heads: list[HeadConfig] = Field(min_length=1, description="The draft heads, at most one of each kind.")
    mode: Literal["joint", "frozen"] = Field(
        "joint", description="joint: the base model trains with the heads (compression-aware pretraining). frozen: "
        "the base model's parameters are frozen and only the heads train (branch from a dense checkpoint).")
    targets: Literal["labels", "self_distill"] = Field(
        "labels", description="labels: heads learn the data's next tokens. self_distill: heads learn the base "
        "model's own next-token distribution at the position they draft (soft cross-entropy), what a serving "
        "engine's verification accepts.")
    lr_scale: float = Field(1.0, gt=0, description="Learning-rate multiplier of the heads' parameters (Medusa-2 "
                            "trains heads at 4x the base's rate).")
    eval_prompts: int = Field(4, ge=0, description="Held-out prompts per rank decoded speculatively at every "
                              "evaluation to measure acceptance per draft position and tau; 0 skips it.")
    eval_prompt_tokens: int = Field(32, ge=1, description="Tokens of each evaluation prompt: the start of the "
                                    "first document of a held-out row (shorter when that document is).")
    eval_rounds: int = Field(16, ge=1, description="Draft-and-verify rounds per evaluation prompt (a fixed count, "
                             "so every rank runs the same number of forwards).")

    @model_validator(mode="after")
    def _check(self) -> "DraftConfig":
        kinds = [h.kind for h in self.heads]
        repeated = sorted({k for k in kinds if kinds.count(k) > 1})
        if repeated:
            raise ValueError(f"heads lists kind {repeated[0]!r} more than once; give one head of each kind (raise "
                             "its depth or num_heads instead)")
        return self

    def head(self, kind: str) -> _Head | None:
        """The head of `kind`, if the recipe has one."""
        return next((h for h in self.heads if h.kind == kind), None)
