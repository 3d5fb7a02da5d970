"""EAGLE-3: one decoder layer drafting from the fused hidden states of three base layers.

At position t the layer reads the embedding of token t + 1 and a hidden state: at the first draft step the
base's hidden states entering three layers (default 2, L/2, L-3 as vLLM's), concatenated and reduced by
`fc` (3H -> H); at later steps its own previous output. Its attention takes [norm(embedding), norm(hidden)]
(2H) into q, k, v. Training unrolls `steps` draft steps (training-time test): at step j the query of
position t stands for position t + j and attends to the first step's keys up to t (real features) and to
its own chain's keys of steps 1..j, exactly as it will in decoding. An optional reduced draft vocabulary
(`d2t`, `t2d`, from the corpus's token frequencies) shrinks the output head.

Whatever the base's family, the layer is the `speculators` format's Llama layer (`draft_layer_config`): no biases,
no q/k norms, full attention; it shares the base's shapes and RoPE (scaling included), since it attends at the
base's positions and serving engines build its rotary embedding from the same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtrain.core.masks import document_causal_mask
from slimtrain.modules.transformer.attention.base import repeat_kv
from slimtrain.modules.transformer.config import ModelConfig
from slimtrain.modules.transformer.kv_cache import KVCache
from slimtrain.modules.transformer.layers import MLP, RMSNorm
from slimtrain.modules.transformer.rope import apply_rope, rope_for

from .base import BaseStep, BaseView, DraftOutput
from .targets import shifted_tokens


def draft_layer_config(cfg: ModelConfig) -> ModelConfig:
    """The EAGLE-3 layer's config for a base of config `cfg`: the base's shapes, norm epsilon and RoPE, without the
    family options the format's layer cannot hold (its `transformer_layer_config` is a bias-free Llama layer, which
    vLLM and speculators build for every target family: a qwen2 base's q/k/v biases or a llama base's MLP biases
    would be trained here and lost on export)."""
    return cfg.model_copy(update={"architecture": "llama", "qkv_bias": False, "o_bias": False, "mlp_bias": False,
                                  "qk_norm": False, "sliding_window": None, "sliding_window_layers": None})


class Eagle3Attention(nn.Module):
    """Grouped-query attention whose q, k, v read 2H features and whose output is H wide."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.head_dim = cfg.dim_per_head
        h = cfg.hidden_size
        self.q_proj = nn.Linear(2 * h, cfg.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, h, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class Eagle3Layer(nn.Module):
    """The draft's decoder layer, named as the `speculators` format names it (`layers.0.*`)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Eagle3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(draft_layer_config(cfg))

    def inputs(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """[norm(embedding), norm(hidden)]: 2H (the residual keeps the un-normed hidden: norm_before_residual false)."""
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)

    def finish(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The layer's output from its hidden input and the attention's [B, S, heads, dim] result."""
        h = hidden + self.self_attn.o_proj(attended.flatten(2))
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend) -> torch.Tensor:
        q, k, v = self.self_attn.qkv(self.inputs(embeds, hidden), cos, sin)
        return self.finish(hidden, attend(q, k, v))


class Eagle3Head(nn.Module):
    """`fc` (3H -> H), `layer`, `norm`, `lm_head` [draft V, H]; buffers `d2t` [draft V] (target id = draft id +
    d2t) and `t2d` [V] (whether a target id is in the draft vocabulary)."""

    kind = "eagle3"

    def __init__(self, cfg, layers: tuple[int, int, int], steps: int, draft_vocab: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.aux_layers = tuple(layers)
        self.steps = steps
        self.fc = nn.Linear(len(layers) * h, h, bias=False)
        self.layer = Eagle3Layer(cfg)
        self.norm = RMSNorm(h, cfg.norm_eps)
        self.lm_head = nn.Linear(h, draft_vocab, bias=False)
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.int64))
        self.register_buffer("t2d", torch.ones(cfg.vocab_size, dtype=torch.bool))

    @property
    def positions(self) -> int:
        return self.steps

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        """The base layers whose outputs the drafter needs: the one before each fused layer."""
        return tuple(sorted({k - 1 for k in self.aux_layers}))

    def target_ids(self) -> torch.Tensor:
        """The target vocabulary id of every draft id [draft V]."""
        return torch.arange(len(self.d2t), device=self.d2t.device) + self.d2t

    @torch.no_grad()
    def set_vocabulary(self, counts: torch.Tensor | None, lm_head: torch.Tensor) -> None:
        """The draft vocabulary: the most frequent target ids (all of them when it is the whole vocabulary; the
        lowest ids when no counts are known), in id order; the output head starts as their rows of `lm_head`."""
        size, vocab = len(self.d2t), len(self.t2d)
        if size == vocab:
            ids = torch.arange(vocab)
        else:
            ranking = torch.arange(vocab) if counts is None else torch.sort(counts.cpu(), descending=True, stable=True).indices
            ids = ranking[:size].sort().values
        self.d2t.copy_(ids - torch.arange(size))
        self.t2d.zero_()
        self.t2d[ids.to(self.t2d.device)] = True
        self.lm_head.weight.copy_(lm_head[ids.to(lm_head.device)])

    def fused(self, layer_hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        """fc of the hidden states entering the aux layers (outputs of the layers before them)."""
        return self.fc(torch.cat([layer_hidden[k - 1] for k in self.aux_layers], dim=-1))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits from the layer's output."""
        return self.lm_head(self.norm(h))

    def draft_outputs(self, base: BaseView) -> list[DraftOutput]:
        model, layer = base.model, self.layer
        cfg = model.cfg
        hidden = self.fused(base.layer_hidden)
        allowed = document_causal_mask(base.doc_ids)  # [B, 1, S, S]: the first step's keys
        eye = torch.eye(hidden.shape[1], dtype=torch.bool, device=hidden.device).expand_as(allowed)
        keys, values, outputs = [], [], []
        for j in range(self.steps):
            positions = base.position_ids + j
            cos, sin = rope_for(cfg, positions, hidden.dtype)
            embeds = model.embed(shifted_tokens(base.input_ids, base.doc_ids, j + 1))
            q, k, v = layer.self_attn.qkv(layer.inputs(embeds, hidden), cos, sin)
            keys.append(k)
            values.append(v)
            mask = torch.cat([allowed, *[eye] * j], dim=-1)  # step i >= 1: only the same position's own chain
            hidden = layer.finish(hidden, _attend(q, torch.cat(keys, 1), torch.cat(values, 1), mask))
            outputs.append(DraftOutput(j + 1, hidden, self.project, vocab=self.target_ids()))
        return outputs

    def drafter(self, model: nn.Module) -> "Eagle3Drafter":
        return Eagle3Drafter(self, model)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA in the [B, S, heads, dim] layout over keys of any length, with a boolean mask [B, 1, S, keys]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask)
    return out.transpose(1, 2)


class Eagle3Drafter:
    """Decoding with the layer's own KV cache: the accepted positions are cached with their real fused features,
    each round's draft steps are appended after them and forgotten once the round has drafted."""

    def __init__(self, head: Eagle3Head, model: nn.Module) -> None:
        self.head, self.model = head, model
        self.tokens: list[int] = []
        self.features: list[torch.Tensor] = []  # fused features of accepted positions not cached yet
        self.cache: KVCache | None = None

    def start(self, first_token: int, max_len: int) -> None:
        self.tokens = [first_token]
        self.features = []
        self.cache = KVCache.for_layers([self.head.layer], 1, max_len + self.head.steps)

    def observe(self, step: BaseStep) -> None:
        self.tokens.extend(step.next_tokens)
        self.features.append(self.head.fused(step.layer_hidden))

    def _step(self, tokens: list[int], hidden: torch.Tensor, start: int) -> torch.Tensor:
        """Run the layer on `tokens`' embeddings and `hidden` [m, H] at positions start.., through the cache."""
        cfg, device = self.model.cfg, hidden.device
        positions = torch.arange(start, start + len(tokens), device=device)[None]
        cos, sin = rope_for(cfg, positions, hidden.dtype)
        bound = self.cache.bind(len(tokens))
        out = self.head.layer(self.model.embed(torch.tensor([tokens], device=device)), hidden[None], cos, sin,
                              bound.layer(0))
        self.cache.commit(len(tokens))
        return out[0]

    def _draft(self, h: torch.Tensor) -> int:
        return int(self.head.target_ids()[self.head.project(h).argmax()])

    def chain(self, k: int) -> list[int]:
        n, start = len(self.tokens), self.cache.length
        features = torch.cat(self.features)
        self.features = []
        # Accepted positions start .. n-2 with real features; position t reads the embedding of token t + 1.
        out = self._step(self.tokens[start + 1:n], features, start)
        drafts = [self._draft(out[-1])]
        hidden = out[-1:]
        for j in range(1, k):
            hidden = self._step([drafts[-1]], hidden, n - 2 + j)
            drafts.append(self._draft(hidden[-1]))
        self.cache.truncate(n - 1)
        return drafts

    def children(self, path: list[int], width: int) -> list[int]:
        raise ValueError("eagle3 heads draft chains here: tree verification is for medusa and hydra heads")
