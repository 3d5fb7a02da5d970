"""train.loss_chunk_tokens: the chunked head + cross-entropy equals the plain one and never holds the logits whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtrain.data.batch import Batch
from slimtrain.modules.transformer import ModelConfig, Transformer
from slimtrain.trainer.loss.chunked import chunked_lm_loss_sum
from slimtrain.trainer.loss.lm import lm_loss, make_loss_fn


def _plain(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 8, 37, 74, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk: int) -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37))
    labels[0, :5] = -100  # ignored positions, in one chunk and across a chunk edge
    labels[1, 30:] = -100
    results = []
    for fn in (lambda: _plain(head, hidden, labels), lambda: chunked_lm_loss_sum(head, hidden, labels, chunk)):
        hidden.grad, head.weight.grad = None, None
        loss = fn()
        (loss * 0.37).backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    (l0, h0, w0), (l1, h1, w1) = results
    assert l1.dtype == torch.float32
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-7)


def test_bf16_head_gradient_with_a_few_chunks_is_as_accurate_as_plain() -> None:
    """In bf16 autograd sums the head's weight gradient over the chunks in bf16 (as for any weight used
    twice): with a few chunks per micro-batch that stays within the plain path's own rounding."""
    torch.manual_seed(0)
    head32 = nn.Linear(64, 512, bias=False)
    hidden32 = torch.randn(1024, 64)
    labels = torch.randint(0, 512, (1024,))
    _plain(head32, hidden32[None], labels[None]).backward()
    ref = head32.weight.grad.clone()
    errors = {}
    for chunk in (0, 512, 256):
        head = nn.Linear(64, 512, bias=False).to(torch.bfloat16)
        head.weight.data.copy_(head32.weight.data)
        hidden = hidden32.to(torch.bfloat16)
        loss = chunked_lm_loss_sum(head, hidden, labels, chunk) if chunk else _plain(head, hidden[None], labels[None])
        loss.backward()
        errors[chunk] = float((head.weight.grad.float() - ref).norm() / ref.norm())
    assert errors[512] <= 1.5 * errors[0] and errors[256] <= 2 * errors[0], errors


def test_lm_loss_with_chunks_matches_and_gives_plugins_no_logits() -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, max_seq_len=32, attention="sdpa"))
    ids = torch.randint(0, 97, (2, 24))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    batch = Batch(input_ids=ids, labels=labels, position_ids=torch.arange(24).expand(2, 24),
                  doc_ids=torch.zeros(2, 24, dtype=torch.long))
    plain_loss, plain_sum, _ = lm_loss(model, batch, 5.0)
    loss, token_sum, _ = make_loss_fn((), chunk_tokens=10)(model, batch, 5.0)
    torch.testing.assert_close(token_sum, plain_sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert model(ids, with_logits=False).logits is None
    with pytest.raises(ValueError, match="train.loss_chunk_tokens=-1"):
        chunked_lm_loss_sum(model.lm_head, torch.zeros(1, 32), torch.zeros(1, dtype=torch.long), -1)


PEAK = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from slimtrain.trainer.loss.chunked import chunked_lm_loss_sum
    import torch.nn.functional as F

    def status_kib(key):
        line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
        return int(line.split()[1])

    torch.manual_seed(0)
    tokens, vocab, width, chunk = 2048, 32768, 64, int(sys.argv[1])
    head = nn.Linear(width, vocab, bias=False)
    hidden = torch.randn(tokens, width, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    if chunk:  # a first small call imports what checkpointing needs, outside the measured peak
        chunked_lm_loss_sum(head, hidden[:chunk], labels[:chunk], chunk).backward()
    head.weight.grad = hidden.grad = None
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident size (VmHWM) to the current one
    before = status_kib("VmRSS")
    if chunk:
        loss = chunked_lm_loss_sum(head, hidden, labels, chunk)
    else:
        loss = F.cross_entropy(head(hidden).float(), labels, reduction="sum")
    loss.backward()
    print((status_kib("VmHWM") - before) // 1024)  # MiB above the starting point
""")


def test_chunks_lower_the_peak_memory_of_forward_and_backward() -> None:
    """Peak resident memory of one forward+backward of a 2048-token, 32k-vocabulary head (logits: 256 MiB
    in fp32), each in a fresh process: plain holds the logits, the saved softmax and their gradient."""
    peak = {}
    for chunk in (0, 256):
        out = subprocess.run([sys.executable, "-c", PEAK, str(chunk)], capture_output=True, text=True, check=True)
        peak[chunk] = int(out.stdout.split()[-1])
    assert peak[0] >= 500, peak  # at least two [2048, 32768] fp32 tensors at once
    assert peak[256] <= peak[0] / 4, peak


@pytest.mark.parametrize("chunk_tokens", [0, 10])
def test_compiled_loss_equals_the_eager_one_in_bf16(chunk_tokens: int) -> None:
    """train.compile's fused cross-entropy: same loss and gradients as the eager fp32 upcast."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, max_seq_len=32, attention="sdpa")).to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, 24))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[0, :5] = -100
    batch = Batch(input_ids=ids, labels=labels, position_ids=torch.arange(24).expand(2, 24),
                  doc_ids=torch.zeros(2, 24, dtype=torch.long))
    results = []
    for compiled in (False, True):
        model.zero_grad(set_to_none=True)
        loss, token_sum, _ = make_loss_fn((), chunk_tokens, compile=compiled)(model, batch, 5.0)
        loss.backward()
        assert token_sum.dtype == torch.float32
        results.append((token_sum.detach(), [p.grad.float() for p in model.parameters()]))
    (eager_sum, eager_grads), (compiled_sum, compiled_grads) = results
    torch.testing.assert_close(compiled_sum, eager_sum, rtol=1e-5, atol=0)
    for g_eager, g_compiled in zip(eager_grads, compiled_grads):  # bf16 gradients: one rounding apart at most
        assert (g_compiled - g_eager).norm() <= 1e-2 * g_eager.norm()


def test_compiled_cross_entropy_gives_every_shape_its_own_static_kernel() -> None:
    """Exact resume under train.compile: the kernel a shape runs on must not depend on which shapes came
    before (a resumed run has not seen the straight run's history). Automatic dynamic shapes would serve
    the third shape below from the symbolic kernel compiled for the second; static shapes compile it."""
    from torch._dynamo.utils import counters

    from slimtrain.trainer.loss.cross_entropy import compiled_cross_entropy_sum

    torch._dynamo.reset()
    counters.clear()
    cross_entropy = compiled_cross_entropy_sum()
    for rows in (8, 6, 5, 8):
        cross_entropy(torch.randn(rows, 11), torch.randint(0, 11, (rows,)))
    assert counters["stats"]["unique_graphs"] == 3
