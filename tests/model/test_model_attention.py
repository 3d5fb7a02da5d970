"""Attention backends: packing invariance, agreement with the eager reference, padding, GQA."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from slimtrain.modules.transformer.attention import bind_attention, resolve_backend
from slimtrain.modules.transformer.attention.base import is_plain_causal
from slimtrain.modules.transformer.attention.flash import flash_attn_available, flash_impl, flash_usable
from slimtrain.modules.transformer.attention.varlen import varlen_available

from attention_helpers import random_layout as _random_layout, with_backend as _with_backend

CPU_BACKENDS = ["eager", "sdpa", "flex"]  # flex runs uncompiled on CPU: a slow but exact reference


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_documents_equal_documents_run_alone(make_model, packed, backend: str) -> None:
    model = make_model(attention=backend)
    lengths, seq_len = [11, 23, 7], 48  # 7 slots of trailing padding
    doc_ids, position_ids = packed(lengths, seq_len)
    ids = torch.randint(0, model.cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, position_ids=position_ids[None], doc_ids=doc_ids[None]).logits[0]
        start = 0
        for n in lengths:
            alone = model(ids[:, start : start + n]).logits[0]
            assert (logits[start : start + n] - alone).abs().max() <= 1e-5
            start += n
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_backends_equal_eager_on_random_layouts(make_model, backend: str, kv_heads: int) -> None:
    eager = make_model(attention="eager", num_kv_heads=kv_heads)
    other = _with_backend(eager, backend)
    gen = torch.Generator().manual_seed(kv_heads)
    doc_ids, position_ids = _random_layout(4, 40, gen)
    ids = torch.randint(0, eager.cfg.vocab_size, doc_ids.shape, generator=gen)
    with torch.no_grad():
        ref = eager(ids, position_ids=position_ids, doc_ids=doc_ids).logits
        out = other(ids, position_ids=position_ids, doc_ids=doc_ids).logits
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()  # the all-padding row included
    assert (ref - out).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_padding_rows_give_finite_logits_and_gradients(make_model, backend: str) -> None:
    model = make_model(attention=backend).train()
    doc_ids = torch.tensor([[0, 0, 0, -1, -1, -1], [-1] * 6])
    ids = torch.zeros_like(doc_ids)
    out = model(ids, doc_ids=doc_ids).logits
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_single_document_rows_take_the_causal_fast_path(make_model) -> None:
    from slimtrain.core.documents import Documents

    assert is_plain_causal(None) and is_plain_causal(Documents(torch.zeros(2, 8, dtype=torch.long)))
    assert not is_plain_causal(Documents(torch.tensor([[0, 0, 1, 1]])))
    assert not is_plain_causal(Documents(torch.tensor([[0, 0, 0, -1]])))
    assert not is_plain_causal(Documents(torch.zeros(2, 8, dtype=torch.long), single=False))  # the host's word
    bound = bind_attention("sdpa", torch.full((2, 8), 3), 8, torch.device("cpu"), torch.float32)
    assert bound.mask is None  # no mask tensor: SDPA may use its causal kernels
    model = make_model(attention="sdpa")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids, doc_ids=torch.zeros_like(ids)).logits)


def test_documents_do_not_see_each_other(make_model, packed) -> None:
    model = make_model(attention="sdpa")
    doc_ids, position_ids = packed([8, 8], 16)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, :8] = (changed[0, :8] + 1) % model.cfg.vocab_size  # rewrite document 0 only
    with torch.no_grad():
        a = model(ids, position_ids=position_ids[None], doc_ids=doc_ids[None]).logits
        b = model(changed, position_ids=position_ids[None], doc_ids=doc_ids[None]).logits
    assert torch.equal(a[0, 8:], b[0, 8:])
    assert not torch.equal(a[0, :8], b[0, :8])


def test_auto_picks_sdpa_on_cpu() -> None:
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert resolve_backend("eager", torch.device("cpu"), torch.float32) == "eager"


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed")
def test_flash_without_flash_attn_fails_at_build_with_a_fix(make_model) -> None:
    with pytest.raises(RuntimeError, match="flash-attn.*'sdpa'"):
        make_model(attention="flash")


# --- GPU: the fast backends against SDPA in bf16 -------------------------------------------------

# bf16 keeps 8 bits of mantissa; logits of this tiny model are O(1), and different kernels
# accumulate in different orders, so a few bf16 ulps (~0.03 at |x|~2) separate correct backends.
BF16_TOL = 5e-2


# (kv_heads, head_dim, seq_len): tiny heads and a short row (flex's small-query path), then a
# realistic head width over more than one 128-token block.
CUDA_SHAPES = [(1, 16, 64), (4, 16, 64), (2, 64, 320)]


def _cuda_inputs(vocab: int, seq_len: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    doc_ids, position_ids = _random_layout(4, seq_len, gen)
    ids = torch.randint(0, vocab, doc_ids.shape, generator=gen)
    return ids.cuda(), position_ids.cuda(), doc_ids.cuda()


def _compare_on_cuda(make_model, backend: str, kv_heads: int, head_dim: int, seq_len: int) -> None:
    sdpa = make_model(attention="sdpa", num_kv_heads=kv_heads, head_dim=head_dim, max_seq_len=seq_len, init_std=0.1)
    sdpa = sdpa.to("cuda", torch.bfloat16)
    other = _with_backend(sdpa, backend)
    ids, position_ids, doc_ids = _cuda_inputs(sdpa.cfg.vocab_size, seq_len)
    real = doc_ids != -1  # flash treats a padding run as one sequence: compare real tokens only
    with torch.no_grad():
        for docs, pos in ((doc_ids, position_ids), (None, None)):
            ref = sdpa(ids, position_ids=pos, doc_ids=docs).logits.float()
            out = other(ids, position_ids=pos, doc_ids=docs).logits.float()
            assert torch.isfinite(out).all()
            keep = real if docs is not None else torch.ones_like(real)
            assert (ref - out)[keep].abs().max() <= BF16_TOL


def _fused(backend: str) -> Any:
    """`backend` as a test parameter, skipped where it cannot run."""
    marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    if backend == "flash":
        marks.append(pytest.mark.skipif(not flash_attn_available(), reason="needs flash-attn or flash-attn-4"))
    if backend == "varlen":
        marks.append(pytest.mark.skipif(not varlen_available(), reason="needs torch>=2.10"))
    return pytest.param(backend, marks=marks)


FUSED = [_fused(b) for b in ("flex", "varlen", "flash")]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kv_heads,head_dim,seq_len", CUDA_SHAPES)
def test_fused_backends_equal_sdpa_on_cuda_bf16(make_model, backend: str, kv_heads: int, head_dim: int, seq_len: int) -> None:
    _compare_on_cuda(make_model, backend, kv_heads, head_dim, seq_len)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backends_train_like_sdpa_on_cuda(make_model, backend: str, request: pytest.FixtureRequest) -> None:
    """Same parameter gradients as SDPA (loss on real tokens), within bf16 noise; q shorter than one block."""
    if backend == "flash" and flash_impl(torch.device("cuda")) == "fa4":  # seen on an H100; auto leaves FA4 out
        request.applymarker(pytest.mark.xfail(reason="flash-attn-4 4.0.0b36 gradients disagree with SDPA's"))
    sdpa = make_model(attention="sdpa", init_std=0.1).to("cuda", torch.bfloat16).train()
    other = _with_backend(sdpa, backend).train()
    ids, position_ids, doc_ids = _cuda_inputs(sdpa.cfg.vocab_size)
    real = doc_ids != -1
    grads = []
    for model in (sdpa, other):
        logits = model(ids, position_ids=position_ids, doc_ids=doc_ids).logits.float()
        torch.nn.functional.cross_entropy(logits[real], ids[real].roll(1)).backward()
        grads.append([p.grad.float() for p in model.parameters()])
    for ref, got in zip(*grads):
        assert torch.isfinite(got).all()
        assert (got - ref).norm() <= 3e-2 * ref.norm() + 1e-6


@pytest.mark.parametrize("flash, varlen, sm80, dtype, expected", [
    (True, True, True, torch.bfloat16, "flash"), (False, True, True, torch.bfloat16, "varlen"),
    (False, True, False, torch.bfloat16, "flex"), (False, False, True, torch.bfloat16, "flex"),
    (True, True, True, torch.float32, "flex"),
])
def test_auto_order_on_cuda(monkeypatch: pytest.MonkeyPatch, flash: bool, varlen: bool, sm80: bool,
                            dtype: torch.dtype, expected: str) -> None:
    """FA2, then torch's varlen (8% faster than flex in the 1B step on an H100; Ampere or newer), then
    flex; the first two in bf16/fp16 only."""
    import slimtrain.modules.transformer.attention as attention

    monkeypatch.setattr(attention, "flash_usable", lambda device: flash)
    monkeypatch.setattr(attention, "varlen_available", lambda: varlen)
    monkeypatch.setattr(attention, "_sm80_or_newer", lambda device: sm80)
    assert resolve_backend("auto", torch.device("cuda"), dtype) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_a_fused_backend_on_cuda() -> None:
    expected = "flash" if flash_usable(torch.device("cuda")) else "varlen" if varlen_available() else "flex"
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == expected
    assert resolve_backend("auto", torch.device("cuda"), torch.float32) == "flex"  # varlen/flash need half
