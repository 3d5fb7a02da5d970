"""The varlen-style backends (`varlen`: torch's built-in kernels; `flash`: flash-attn or flash-attn-4).

Their kernels are CUDA-only, so on CPU the kernel call is replaced by a per-segment reference and
what is ours is tested: cu_seqlens, the flatten/unflatten, GQA, the causal fast path, the choice of
package and the keywords each torch version takes. The kernels themselves are compared with SDPA
on CUDA in `test_model_attention.py`.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from slimtrain.modules.transformer import Transformer
from slimtrain.modules.transformer.attention import bind_attention, check_backend
from slimtrain.modules.transformer.attention import flash as flash_mod
from slimtrain.modules.transformer.attention import varlen as varlen_mod

from attention_helpers import random_layout, with_backend


def reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    """Causal attention of each cu_seqlens segment on its own: [T, H, D] in, [T, H, D] out."""
    assert cu.dtype == torch.int32 and int(cu[-1]) == q.shape[0]
    assert max_len >= int((cu[1:] - cu[:-1]).max())  # an upper bound (see varlen_mask)
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        ks, vs = (t.repeat_interleave(groups, dim=0) for t in (ks, vs))
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1)
    return out


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, s = q.shape[:2]
    cu = torch.arange(0, b * s + 1, s, dtype=torch.int32)
    flat = reference_varlen(*(t.reshape(b * s, *t.shape[2:]) for t in (q, k, v)), cu, s)
    return flat.view(b, s, *flat.shape[1:])


@pytest.fixture
def cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Both backends on CPU with the reference in place of their CUDA kernels; records the calls."""
    calls: list[str] = []

    def varlen(*args: Any) -> torch.Tensor:
        calls.append("varlen")
        return reference_varlen(*args)

    def dense(*args: Any) -> torch.Tensor:
        calls.append("dense")
        return _dense_reference(*args)

    monkeypatch.setattr(varlen_mod, "_varlen_call", lambda window=None: varlen)
    monkeypatch.setattr(flash_mod, "_kernels_for", lambda device: (dense, varlen))
    return calls


@pytest.mark.parametrize("backend", ["varlen", "flash"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_packed_rows_equal_eager_on_real_tokens(make_model, cpu_kernels, backend: str, kv_heads: int) -> None:
    eager = make_model(attention="eager", num_kv_heads=kv_heads)
    twin = Transformer(eager.cfg.model_copy(update={"attention": "sdpa"}))  # built where check_backend passes
    twin.load_state_dict(eager.state_dict())
    twin.cfg = twin.cfg.model_copy(update={"attention": backend})
    gen = torch.Generator().manual_seed(kv_heads)
    doc_ids, position_ids = random_layout(4, 40, gen)
    ids = torch.randint(0, eager.cfg.vocab_size, doc_ids.shape, generator=gen)
    with torch.no_grad():
        ref = eager(ids, position_ids=position_ids, doc_ids=doc_ids).logits
        out = twin.eval()(ids, position_ids=position_ids, doc_ids=doc_ids).logits
    real = doc_ids != -1  # a padding run is one segment here: only real tokens must agree
    assert (ref - out)[real].abs().max() <= 1e-5
    assert cpu_kernels and set(cpu_kernels) == {"varlen"}


@pytest.mark.parametrize("backend", ["varlen", "flex"])
def test_single_document_rows_skip_the_masked_kernel(make_model, cpu_kernels, monkeypatch, backend: str) -> None:
    from slimtrain.modules.transformer.attention import flex as flex_mod

    monkeypatch.setattr(flex_mod, "_kernels", lambda compiled: pytest.fail("flex kernels used for causal rows"))
    for doc_ids in (None, torch.zeros(2, 16, dtype=torch.long), torch.full((2, 16), 5)):
        assert bind_attention(backend, doc_ids, 16, torch.device("cpu"), torch.float32).mask is None
    eager = make_model(attention="eager")
    other = with_backend(eager, "sdpa")
    other.cfg = other.cfg.model_copy(update={"attention": backend})
    ids = torch.randint(0, eager.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (eager(ids).logits - other(ids, doc_ids=torch.zeros_like(ids)).logits).abs().max() <= 1e-5
    assert cpu_kernels == []  # SDPA's causal kernel, not the varlen one


def test_flex_refuses_to_train_on_cpu_with_the_fix(make_model, packed) -> None:
    model = make_model(attention="flex").train()
    doc_ids, position_ids = packed([5, 7], 16)
    ids = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"'flex' has no backward on cpu.*choose attention 'sdpa'"):
        model(ids, position_ids=position_ids[None], doc_ids=doc_ids[None])


@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_compiled_blocks_run_the_varlen_backends(make_model, cpu_kernels, backend: str) -> None:
    """train.compile compiles the blocks; the backends' kernel choice stays outside them (prepare)."""
    eager = make_model(attention="eager")
    twin = with_backend(eager, "sdpa")
    twin.cfg = twin.cfg.model_copy(update={"attention": backend})
    twin.compile_blocks(backend="eager")  # Dynamo's tracing without inductor's codegen: fast, same graphs
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # new layouts: new cu_seqlens lengths and max lengths
        doc_ids, position_ids = random_layout(3, 40, gen)
        ids = torch.randint(0, eager.cfg.vocab_size, doc_ids.shape, generator=gen)
        with torch.no_grad():
            ref = eager(ids, position_ids=position_ids, doc_ids=doc_ids).logits
            out = twin(ids, position_ids=position_ids, doc_ids=doc_ids).logits
        real = doc_ids != -1
        assert (ref - out)[real].abs().max() <= 1e-5
    assert "varlen" in cpu_kernels


@pytest.mark.parametrize("backend", ["varlen", "flash", "sdpa", "flex"])
def test_a_layout_found_on_the_host_is_not_found_again(make_model, cpu_kernels, monkeypatch, backend: str) -> None:
    """The trainer hands the model `Documents` checked on the host (`Batch.to`): the forward uses
    those answers, so on a GPU it never waits to learn whether rows are packed or where documents start."""
    from slimtrain.core import documents as documents_mod
    from slimtrain.core.documents import Documents

    eager = make_model(attention="eager")
    twin = with_backend(eager, "sdpa")
    twin.cfg = twin.cfg.model_copy(update={"attention": backend})
    gen = torch.Generator().manual_seed(11)
    doc_ids, position_ids = random_layout(3, 32, gen)
    ids = torch.randint(0, eager.cfg.vocab_size, doc_ids.shape, generator=gen)
    docs = Documents.checked_on_host(doc_ids)
    assert docs.single is False and docs.varlen is not None
    for name in ("single_document_rows", "cu_seqlens"):  # asking the tensor again now fails the test
        monkeypatch.setattr(documents_mod, name, lambda *a, name=name: pytest.fail(f"{name} recomputed"))
    with torch.no_grad():
        ref = eager(ids, position_ids=position_ids, doc_ids=doc_ids).logits
        out = twin(ids, position_ids=position_ids, doc_ids=docs).logits
    real = doc_ids != -1
    assert (ref - out)[real].abs().max() <= 1e-5
    with pytest.raises(BaseException, match="single_document_rows recomputed"):
        twin(ids, position_ids=position_ids, doc_ids=doc_ids)  # a bare tensor is asked (the check can fail)


def test_flash_runs_single_document_rows_on_its_dense_kernel(cpu_kernels) -> None:
    q = torch.randn(2, 16, 4, 8)
    kv = torch.randn(2, 16, 2, 8)
    bound = bind_attention("flash", torch.zeros(2, 16, dtype=torch.long), 16, torch.device("cpu"), torch.float32)
    bound(q, kv, kv)
    assert cpu_kernels == ["dense"]


def test_varlen_refuses_cpu_with_the_fix() -> None:
    call = varlen_mod._varlen_call()
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    q = torch.randn(16, 4, 8)
    with pytest.raises(RuntimeError, match=r"model.attention='varlen' runs on CUDA only, got cpu; choose attention 'sdpa'"):
        call(q, q, q, cu, 11)


def test_varlen_without_torch_support_fails_at_build_with_a_fix(make_model, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(varlen_mod, "varlen_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"'varlen' needs torch>=2.10.*choose attention 'flex' or 'sdpa'"):
        check_backend("varlen")
    with pytest.raises(RuntimeError, match="torch>=2.10"):
        make_model(attention="varlen")


def _fake_varlen_attn(params: str):
    """A stand-in for torch's varlen_attn with the keyword-only parameters of one torch version."""
    seen: dict[str, Any] = {}
    namespace: dict[str, Any] = {"seen": seen}
    exec(
        f"def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, {params}):\n"
        "    seen.update({k: v for k, v in locals().items() if k not in ('query', 'key', 'value', 'seen')})\n"
        "    return query\n",
        namespace,
    )
    return namespace["varlen_attn"], seen


@pytest.mark.parametrize(
    "params,expected",
    [
        ("is_causal=False, return_aux=None", {"is_causal": True}),  # torch 2.10
        ("return_aux=None, scale=None, window_size=(-1, -1)", {"window_size": (-1, 0)}),
        ("return_aux=None, window_size=(-1, -1), enable_gqa=False", {"window_size": (-1, 0), "enable_gqa": True}),
    ],
)
def test_varlen_speaks_each_torch_versions_keywords(monkeypatch: pytest.MonkeyPatch, params: str, expected: dict) -> None:
    import torch.nn.attention.varlen as torch_varlen

    fake, seen = _fake_varlen_attn(params)
    monkeypatch.setattr(torch_varlen, "varlen_attn", fake)
    monkeypatch.setattr(varlen_mod, "require_cuda_half", lambda q, backend: None)
    varlen_mod._varlen_call.cache_clear()
    try:
        q, kv = torch.randn(16, 4, 8), torch.randn(16, 2, 8)
        cu = torch.tensor([0, 16], dtype=torch.int32)
        varlen_mod._varlen_call()(q, kv, kv, cu, 16)
    finally:
        varlen_mod._varlen_call.cache_clear()
    assert {k: seen[k] for k in expected} == expected
    assert seen["cu_seq_q"] is cu and seen["max_q"] == seen["max_k"] == 16


def test_varlen_call_binds_to_this_torchs_varlen_attn(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.nn.attention.varlen as torch_varlen

    real = torch_varlen.varlen_attn
    calls: list[tuple] = []

    def recorder(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((args, kwargs))
        return args[0]

    recorder.__signature__ = inspect.signature(real)  # what _varlen_call reads its keywords from
    monkeypatch.setattr(torch_varlen, "varlen_attn", recorder)
    monkeypatch.setattr(varlen_mod, "require_cuda_half", lambda q, backend: None)
    varlen_mod._varlen_call.cache_clear()
    try:
        q, kv = torch.randn(16, 4, 8), torch.randn(16, 2, 8)
        varlen_mod._varlen_call()(q, kv, kv, torch.tensor([0, 16], dtype=torch.int32), 16)
    finally:
        varlen_mod._varlen_call.cache_clear()
    (args, kwargs), = calls
    inspect.signature(real).bind(*args, **kwargs)  # raises TypeError on a keyword this torch does not take


@pytest.mark.parametrize(
    "installed,major,forced,expected",
    [
        ({"fa2"}, 9, None, "fa2"),
        ({"fa4"}, 9, None, "fa4"),
        ({"fa2", "fa4"}, 9, None, "fa4"),  # Hopper: FA4's kernels
        ({"fa2", "fa4"}, 8, None, "fa2"),  # Ampere: FA2's (FA4 trains on Hopper and newer only)
        ({"fa2", "fa4"}, 9, "fa2", "fa2"),
    ],
)
def test_flash_picks_its_package(monkeypatch: pytest.MonkeyPatch, installed: set, major: int, forced, expected: str) -> None:
    monkeypatch.setattr(flash_mod, "_installed", lambda impl: impl in installed)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    if forced:
        monkeypatch.setenv("SLIMTRAIN_FLASH", forced)
    else:
        monkeypatch.delenv("SLIMTRAIN_FLASH", raising=False)
    flash_mod.check_flash_available()
    assert flash_mod.flash_impl(torch.device("cuda", 0)) == expected
    # `auto` takes FA2 only: FA4's gradients disagreed with SDPA's on an H100 (flash.py, _FA4_GRADIENTS)
    assert flash_mod.flash_usable(torch.device("cuda", 0)) == (expected == "fa2")


@pytest.mark.parametrize("installed,forced", [({"fa4"}, None), ({"fa2", "fa4"}, "fa4")])
def test_flash_refuses_fa4_below_hopper_with_the_fix(monkeypatch: pytest.MonkeyPatch, installed: set, forced) -> None:
    monkeypatch.setattr(flash_mod, "_installed", lambda impl: impl in installed)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setenv("SLIMTRAIN_FLASH", forced or "")
    with pytest.raises(RuntimeError, match=r"flash-attn-4, whose backward needs Hopper or newer, on NVIDIA A100; "
                                           r"install flash-attn \(FA2\) or choose attention 'varlen' or 'flex'"):
        flash_mod.flash_impl(torch.device("cuda", 0))
    assert not flash_mod.flash_usable(torch.device("cuda", 0))  # so `auto` falls back to varlen or flex


def test_flash_refuses_a_forced_package_that_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash_mod, "_installed", lambda impl: impl == "fa2")
    monkeypatch.setenv("SLIMTRAIN_FLASH", "fa4")
    with pytest.raises(RuntimeError, match=r"SLIMTRAIN_FLASH='fa4'.*installed: \['fa2'\]"):
        flash_mod.check_flash_available()


def test_choosing_fa4_warns_that_its_gradients_disagreed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen on an H100: FA4's forward matched SDPA's, its gradients did not; `flash` with FA4 says so."""
    import sys
    import types

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = cute.flash_attn_varlen_func = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    with pytest.warns(UserWarning, match="flash-attn-4: on an H100 .* its forward matched SDPA's but its parameter "
                                         "gradients did not.*choose attention 'varlen'"):
        flash_mod._kernels.__wrapped__("fa4")
