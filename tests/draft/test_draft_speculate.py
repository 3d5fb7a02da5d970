"""Speculative decoding is lossless for every head kind (chains, and trees for medusa and hydra), drafts what
the training forward predicts, and the MTP forward equals an independent reimplementation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomise, tiny_model

from slimtrain.modules.draft.base import BaseView
from slimtrain.modules.draft.eagle3 import Eagle3Head
from slimtrain.modules.draft.hydra import HydraHeads
from slimtrain.modules.draft.medusa import MedusaHeads
from slimtrain.modules.draft.mtp import MTPHeads
from slimtrain.modules.draft.speculate import SpeculativeDecoder
from slimtrain.modules.transformer.generate import greedy_generate


def _heads(model, kind: str, seed: int):
    cfg = model.cfg
    head = {"medusa": lambda: MedusaHeads(cfg.hidden_size, cfg.vocab_size, 3, 1),
            "hydra": lambda: HydraHeads(cfg.hidden_size, cfg.vocab_size, 3, 2),
            "mtp": lambda: MTPHeads(cfg, 2),
            "eagle3": lambda: Eagle3Head(cfg, (1, 2, 2), steps=3, draft_vocab=cfg.vocab_size)}[kind]().double()
    return randomise(head, seed)


class Oracle:
    """Drafts the reference continuation itself: every draft is accepted."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.reference, self.seen = reference[0].tolist(), 0

    def start(self, first_token: int, max_len: int) -> None:
        pass

    def observe(self, step) -> None:
        self.seen += len(step.next_tokens)

    def chain(self, k: int) -> list[int]:
        return self.reference[self.seen + 1: self.seen + 1 + k]

    def children(self, path: list[int], width: int) -> list[int]:
        return [self.reference[self.seen + 1 + len(path)]] * width


@pytest.mark.parametrize("kind,widths", [("medusa", None), ("medusa", [3, 2, 1]), ("hydra", None), ("hydra", [2, 2, 2]),
                                         ("mtp", None), ("eagle3", None)])
def test_speculative_output_is_plain_greedy(kind: str, widths) -> None:
    model = tiny_model(seed=1)
    for seed in range(3):
        prompt = torch.randint(0, 61, (1, 5 + 3 * seed), generator=torch.Generator().manual_seed(seed))
        head = _heads(model, kind, seed)
        want = greedy_generate(model, prompt, 30)
        decoder = SpeculativeDecoder(model, head.drafter(model), head.positions, widths,
                                     hidden_layers=getattr(head, "hidden_layers", ()))
        got, stats = decoder.generate(prompt, 30)
        assert torch.equal(got, want)
        assert stats.tokens >= 29 and 1.0 <= stats.tau <= head.positions + 1


def test_accepted_drafts_count_per_position_and_tau() -> None:
    model = tiny_model(seed=2)
    prompt = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(3))
    want = greedy_generate(model, prompt, 40)
    got, stats = SpeculativeDecoder(model, Oracle(want), draft_tokens=3).generate(prompt, rounds=5)
    assert torch.equal(got, want[:, : 6 + 1 + 5 * 4]) and stats.tau == 4.0 and stats.acceptance() == [1.0] * 3
    got, stats = SpeculativeDecoder(model, Oracle(want), tree_widths=[2, 3]).generate(prompt, max_new_tokens=10)
    assert torch.equal(got, want[:, :16]) and stats.acceptance() == [1.0, 1.0]


def test_eos_and_budget_cut_the_output() -> None:
    model = tiny_model(seed=2)
    prompt = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(3))
    want = greedy_generate(model, prompt, 40)
    eos = int(want[0, 6 + 4])
    got, _ = SpeculativeDecoder(model, Oracle(want), draft_tokens=3).generate(prompt, max_new_tokens=40, eos_id=eos)
    assert got[0, 6:].tolist().index(eos) == got.shape[1] - 7  # stops at the first eos
    with pytest.raises(ValueError, match="one sequence"):
        SpeculativeDecoder(model, Oracle(want)).generate(prompt.repeat(2, 1), 4)


def test_mtp_drafts_equal_the_training_forward() -> None:
    """Each depth's draft equals the training forward's argmax at the last accepted position, run on the
    accepted tokens followed by the drafts (which stand in for the tokens not known yet)."""
    model = tiny_model(seed=4)
    heads = _heads(model, "mtp", 5)
    prompt = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(6))
    drafter = heads.drafter(model)
    decoder = SpeculativeDecoder(model, drafter, draft_tokens=2)
    tokens, _ = decoder.generate(prompt, rounds=4)
    drafts = drafter.chain(2)  # the next round's drafts, from the state the rounds left
    ids = torch.cat([tokens, torch.tensor([drafts])], dim=1)
    n = tokens.shape[1]
    out = model(ids)
    zeros = torch.zeros_like(ids)
    view = BaseView(model, ids, zeros, torch.arange(ids.shape[1])[None], None, out.hidden_states, out.last_hidden)
    predicted = [int(o.project(o.features[0, n - 2]).argmax()) for o in heads.draft_outputs(view)]
    assert predicted == drafts


def test_mtp_forward_equals_an_independent_reimplementation() -> None:
    model = tiny_model(seed=7)
    heads = _heads(model, "mtp", 8)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(9))
    out = model(ids)
    zeros = torch.zeros_like(ids)
    positions = torch.arange(12).expand(2, 12)
    view = BaseView(model, ids, zeros, positions, None, out.hidden_states, out.last_hidden)
    got = [o.project(o.features) for o in heads.draft_outputs(view)]

    def rms(x, w):  # statistics in fp32, as the model's RMSNorm (and HF Llama's) takes them
        x32 = x.float()
        return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + model.cfg.norm_eps)).to(x.dtype)

    h = out.hidden_states  # the base's final normed hidden state
    for k, module in enumerate(heads.depths, start=1):
        nxt = torch.zeros_like(ids)
        nxt[:, : 12 - k] = ids[:, k:]
        x = torch.cat([rms(model.embed(nxt), module.enorm.weight), rms(h, module.hnorm.weight)], -1) @ module.eh_proj.weight.T
        h = x + _attention(rms(x, module.block.input_norm.weight), module.block.attn, model.cfg)
        a = module.block
        u = rms(h, a.post_attn_norm.weight)
        h = h + (F.silu(u @ a.mlp.gate_proj.weight.T) * (u @ a.mlp.up_proj.weight.T)) @ a.mlp.down_proj.weight.T
        h = rms(h, module.norm.weight)  # the next depth reads the normed state
        want = h @ model.lm_head.weight.T
        torch.testing.assert_close(got[k - 1], want, atol=1e-10, rtol=0)


def _attention(x, attn, cfg):
    """Causal GQA attention with RoPE, written out (RoPE angles in fp32 as the model computes them)."""
    b, s, _ = x.shape
    hd = cfg.dim_per_head
    q = (x @ attn.q_proj.weight.T).view(b, s, -1, hd)
    k = (x @ attn.k_proj.weight.T).view(b, s, -1, hd)
    v = (x @ attn.v_proj.weight.T).view(b, s, -1, hd)
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2) / hd)  # in fp32, as the model takes its angles
    ang = torch.cat([torch.arange(s)[:, None] * inv] * 2, -1)
    cos, sin = ang.cos().double()[:, None], ang.sin().double()[:, None]
    rot = lambda t: t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin  # noqa: E731
    q, k = rot(q), rot(k)
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / hd**0.5
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, -1)
    return out @ attn.o_proj.weight.T


def _eagle(model, seed: int, draft_vocab: int) -> Eagle3Head:
    head = randomise(Eagle3Head(model.cfg, (1, 2, 2), steps=3, draft_vocab=draft_vocab).double(), seed)
    counts = torch.arange(model.cfg.vocab_size, dtype=torch.float64).flip(0)  # low ids the most frequent
    head.set_vocabulary(counts, randomise(torch.nn.Linear(32, model.cfg.vocab_size).double(), seed).weight)
    return head


@pytest.mark.parametrize("draft_vocab", [61, 40])
def test_eagle3_drafts_equal_the_unrolled_training_forward(draft_vocab: int) -> None:
    """Step j of the training-time-test unroll at the last accepted position drafts what decoding drafts there,
    with the reduced vocabulary mapped back to target ids; and decoding stays lossless."""
    model = tiny_model(seed=10)
    head = _eagle(model, 11, draft_vocab)
    assert head.t2d.sum() == draft_vocab and head.target_ids().max() < draft_vocab  # the most frequent ids
    prompt = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(12))
    drafter = head.drafter(model)
    decoder = SpeculativeDecoder(model, drafter, draft_tokens=3, hidden_layers=head.hidden_layers)
    tokens, _ = decoder.generate(prompt, rounds=4)
    assert torch.equal(tokens, greedy_generate(model, prompt, tokens.shape[1] - 9))
    drafts = drafter.chain(3)
    ids = torch.cat([tokens, torch.tensor([drafts])], dim=1)
    n = tokens.shape[1]
    out = model(ids, hidden_layers=head.hidden_layers)
    zeros = torch.zeros_like(ids)
    view = BaseView(model, ids, zeros, torch.arange(ids.shape[1])[None], None, out.hidden_states, out.last_hidden,
                    out.layer_hidden)
    predicted = [int(o.vocab[o.project(o.features[0, n - 2]).argmax()]) for o in head.draft_outputs(view)]
    assert predicted == drafts


def test_greedy_agreement_counts_the_tokens_greedy_decoding_would_choose() -> None:
    from slimtrain.modules.draft.evaluation import greedy_agreement

    model = tiny_model(seed=1)
    prompt = torch.randint(0, 61, (1, 7), generator=torch.Generator().manual_seed(0))
    head = _heads(model, "hydra", 0)
    got, _ = SpeculativeDecoder(model, head.drafter(model), head.positions).generate(prompt, 20)
    assert greedy_agreement(model, prompt.shape[1], got) == (20, 20)
    wrong = got.clone()
    wrong[0, -1] = (wrong[0, -1] + 1) % 61  # the last token is not the greedy choice after its prefix
    assert greedy_agreement(model, prompt.shape[1], wrong) == (19, 20)
    wrong[0, 10] = (wrong[0, 10] + 1) % 61  # an earlier one too (the tokens after it may then disagree as well)
    assert greedy_agreement(model, prompt.shape[1], wrong)[0] <= 18
