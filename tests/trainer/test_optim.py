"""Parameter groups and lr schedules."""

import math

import pytest
import torch
from torch import nn

from slimtrain.trainer.recipe.schema import ScheduleConfig
from slimtrain.trainer.optim import GuardedAdamW, all_finite, lr_factor, param_groups


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied


def test_no_decay_on_norms_biases_and_embeddings_even_when_tied() -> None:
    model = Tiny()
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight)}
    expected = {id(model.embed.weight), id(model.proj.bias), id(model.norm.weight), id(model.norm.bias)}
    assert {id(p) for p in no_decay["params"]} == expected
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_schedules_warm_up_then_follow_their_shape(kind: str) -> None:
    cfg = ScheduleConfig(type=kind, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    if kind == "constant":
        assert all(x == 1.0 for x in f[10:])
    elif kind == "cosine":
        assert all(a >= b for a, b in zip(f[10:], f[11:]))
        assert f[-1] == pytest.approx(0.1, abs=1e-3)
    else:
        assert all(x == 1.0 for x in f[10:80])
        assert f[-1] == pytest.approx(0.1) and f[80] < 1.0


def test_guarded_adamw_skips_a_step_with_nonfinite_gradients() -> None:
    p = nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, math.nan, 0.0])
    opt.step()
    assert opt.overflow and torch.equal(p.detach(), torch.ones(3)) and not opt.state
    p.grad = torch.ones(3)
    opt.step()
    assert not opt.overflow and (p.detach() < 1).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_finite_check_sees_every_nonfinite_value_in_mixed_dtypes(bad: float) -> None:
    grads = [torch.full((5,), 1e30), torch.ones(4, dtype=torch.bfloat16), torch.zeros(0)]
    assert all_finite(grads)  # huge but finite: a 2-norm would overflow here, the max-abs norm does not
    grads[1][2] = bad
    assert not all_finite(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_finite_check_sees_a_nan_anywhere_in_a_large_tensor(dtype: torch.dtype) -> None:
    # Vectorised min/max kernels work in lanes and tails: a NaN must show wherever it sits.
    g = torch.randn(1_000_003).to(dtype)
    for at in (0, 1, 7, 15, 31, 63, 500_000, 1_000_000, 1_000_002):
        g[at] = math.nan
        assert not all_finite([g]), at
        g[at] = 0.0
    assert all_finite([g])


def test_the_finite_check_allocates_nothing_the_size_of_the_gradients() -> None:
    from torch.profiler import ProfilerActivity, profile

    grads = [torch.randn(4_000_000), torch.randn(10)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        assert all_finite(grads)
    largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert largest < 1024, f"a {largest}-byte temporary for {grads[0].numel() * 4} bytes of gradients"
