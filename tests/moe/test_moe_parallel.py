"""Expert parallelism (modules/moe/parallel.py): on 2 gloo ranks holding 2 of 4 experts each, the layer's output
and the gradients of its tokens, routing weights and experts equal those of one process holding all 4 experts;
the same for a whole model with QAT (LSQ) on its experts, whose learned steps stay whole on every rank; and the
communicators' differentiable all-to-all."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimtrain.modules.context import LocalCommunicator
from slimtrain.modules.expert_parallel import expert_modules
from slimtrain.modules.moe.experts import GroupedExperts, expert_loop
from slimtrain.modules.moe.parallel import expert_parallel_forward
from slimtrain.modules.moe.router import Routing
from slimtrain.modules.plugin_registry import validate_plugin_config
from slimtrain.modules.plugin_stack import PluginStack
from slimtrain.modules.transformer import ModelConfig
from slimtrain.trainer.backends.build import ModelInit, build_model

E, K, H = 4, 2, 16
DROP = E  # the dropped-slot sentinel


@dataclass
class Case:
    """Both ranks' tokens and routing for one layer of E experts of width `inter`."""

    name: str
    inter: int  # 8: grouped GEMM (16-byte aligned); 6: the per-expert fallback
    chosen: list[list[list[int]]]  # per rank, [T, K] experts

    def data(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x [T, H], weights [T, K], experts [T, K], upstream gradient [T, H]) of `rank`, the same in every process."""
        g = torch.Generator().manual_seed(100 + rank)
        experts = torch.tensor(self.chosen[rank], dtype=torch.int64).reshape(-1, K)
        t = experts.shape[0]
        return (torch.randn(t, H, generator=g), torch.rand(t, K, generator=g) + 0.1, experts,
                torch.randn(t, H, generator=g))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All E experts' (gate_up, down)."""
        g = torch.Generator().manual_seed(7)
        return torch.randn(E, 2 * self.inter, H, generator=g) * 0.3, torch.randn(E, H, self.inter, generator=g) * 0.3


CASES = [
    # Rank 0 holds experts 0 and 1, rank 1 experts 2 and 3. 5 and 3 tokens; expert 0 gets 6 slots, 3 none.
    Case("uneven", 8, [[[0, 1], [0, 2], [1, 0], [0, 1], [2, 0]], [[2, 1], [2, 1], [1, 2]]]),
    Case("uneven-fallback", 6, [[[0, 1], [0, 2], [1, 0], [0, 1], [2, 0]], [[2, 1], [2, 1], [1, 2]]]),
    # Rank 1 sends nothing to rank 0; rank 0 sends one row to rank 1.
    Case("one-way", 8, [[[0, 1], [1, 0], [0, 2]], [[2, 3], [3, 2]]]),
    # Dropped slots (expert E) on both ranks, one token with both its slots dropped.
    Case("dropped", 8, [[[0, DROP], [DROP, 3], [1, 2], [DROP, DROP]], [[3, 0], [2, DROP], [1, 0], [0, 3], [2, 1]]]),
    # Rank 1 has no tokens at all but still takes part in every exchange.
    Case("empty-rank", 8, [[[3, 2], [0, 3], [2, DROP]], []]),
]


def _reference(case: Case, rank: int) -> dict[str, torch.Tensor]:
    """One process with all E experts on `rank`'s tokens: output and gradients (of every expert)."""
    x, w, chosen, up = case.data(rank)
    x.requires_grad_(True)
    w.requires_grad_(True)
    gate_up, down = case.weights()
    full = GroupedExperts(E, H, case.inter)
    with torch.no_grad():
        full.gate_up.copy_(gate_up)
        full.down.copy_(down)
    routing = Routing(w, chosen, torch.zeros(chosen.shape[0], E))
    # With dropped slots, expert_loop (the reference GroupedExperts is tested against): GroupedExperts runs a
    # dropped slot through its last expert and counts on its weight being 0 (as apply_capacity makes it); here
    # dropped slots keep a weight, to show the exchange ignores them whatever their weight.
    out = expert_loop(x, routing, full.gate_up, full.down) if (chosen == DROP).any() else full(x, routing)
    (out * up).sum().backward()
    return {"out": out.detach(), "x": x.grad, "w": w.grad, "gate_up": full.gate_up.grad, "down": full.down.grad}


def _expert_parallel(case: Case, comm, rank: int) -> dict[str, torch.Tensor]:
    """Output and gradients for `rank`'s tokens, this process holding experts [r*E/ep, (r+1)*E/ep), where r
    and ep are its rank and size in the communicator's expert group."""
    x, w, chosen, up = case.data(rank)
    x.requires_grad_(True)
    w.requires_grad_(True)
    gate_up, down = case.weights()
    n = E // comm.size("expert")
    local, first = GroupedExperts(n, H, case.inter), comm.rank("expert") * n
    with torch.no_grad():
        local.gate_up.copy_(gate_up[first:first + n])
        local.down.copy_(down[first:first + n])
    out = expert_parallel_forward(x, Routing(w, chosen, torch.zeros(chosen.shape[0], E)), local, comm)
    (out * up).sum().backward()
    return {"out": out.detach(), "x": x.grad, "w": w.grad, "gate_up": local.gate_up.grad, "down": local.down.grad}


def _exchange_check(comm, rank: int) -> dict[str, torch.Tensor]:
    """all_to_all of uneven rows (rank 0 sends 1 row to itself and 2 to rank 1; rank 1 sends 0 and 3) and the
    gradient of sum(received x (1 + row index)) with respect to what was sent."""
    ins = [[1, 2], [0, 3]][rank]
    sent = (torch.arange(sum(ins) * 2, dtype=torch.float32).view(-1, 2) + 100 * rank).requires_grad_(True)
    got = comm.all_to_all(sent, [[1, 0], [2, 3]][rank], ins)
    (got * (1 + torch.arange(got.shape[0], dtype=torch.float32)).unsqueeze(-1)).sum().backward()
    return {"got": got.detach(), "grad": sent.grad}


# -- a whole model with QAT (LSQ) on its experts -----------------------------------------------------------------

QAT_MODEL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
                        max_seq_len=32, num_layers=2, attention="eager")
QAT_PLUGINS = [{"type": "moe", "num_experts": E, "top_k": K, "expert_intermediate_size": 32, "num_shared_experts": 1},
               {"type": "qat", "weights": {"bits": 4, "group_size": 16}, "estimator": "lsq", "start_step": 1}]
LSQ_STATE = ".experts.weight_transform."  # the LSQ tensors of the experts: whole on every rank
# Compared after the backward: the logits, loss, calibrated step bases, and these gradients.
EXPERTS, GAIN, ROUTER = "layers.1.mlp.experts.gate_up", "layers.1.mlp.experts.weight_transform.gate_up_step_gain", \
    "layers.1.mlp.router.weight"


def _qat_model(parallelize=lambda model: None) -> tuple[torch.nn.Module, PluginStack]:
    stack = PluginStack.from_configs([validate_plugin_config(b) for b in QAT_PLUGINS])
    return build_model(QAT_MODEL, stack, ModelInit(seed=5), torch.device("cpu"), parallelize), stack


def _start_quantizing(model: torch.nn.Module, stack: PluginStack) -> None:
    """Scale the experts' weights (so that the steps calibrated when fake-quant starts differ from those set at
    the build), then fake-quant on: the steps are calibrated in the next forward."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up", "experts.down")):
                p.mul_(1.5)
    stack.plugins[-1].set_step(2)


def _qat_forward_backward(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Forward and backward of `rank`'s batch: logits, loss, the experts' step bases, chosen gradients."""
    ids = torch.randint(0, QAT_MODEL.vocab_size, (2, 12), generator=torch.Generator().manual_seed(30 + rank))
    logits = model(ids[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, QAT_MODEL.vocab_size), ids[:, 1:].reshape(-1))
    loss.backward()
    params = dict(model.named_parameters())
    bases = {n: b.clone() for n, b in model.named_buffers() if n.endswith("_step_base") and LSQ_STATE in n}
    return {"logits": logits.detach(), "loss": loss.detach(), **bases,
            **{f"grad:{n}": params[n].grad.clone() for n in (EXPERTS, GAIN, ROUTER)}}


def _qat_expert_parallel(comm, rank: int) -> dict[str, dict[str, torch.Tensor]]:
    def parallelize(model: torch.nn.Module) -> None:
        for _, module in expert_modules(model):
            module.shard_experts(comm, "expert", rank, 2)

    model, stack = _qat_model(parallelize)  # the LSQ steps set at the build: gathered over both ranks
    built = {k: v.clone() for k, v in model.state_dict().items()}
    _start_quantizing(model, stack)
    return {"built": built, "step": _qat_forward_backward(model, rank)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    from slimtrain.trainer.backends.communicator import TorchCommunicator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        comm = TorchCommunicator({"data": None, "expert": None})
        results = {c.name: _expert_parallel(c, comm, rank) for c in CASES}
        results["exchange"] = _exchange_check(comm, rank)
        results["qat"] = _qat_expert_parallel(comm, rank)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of 2 gloo ranks (expert group = world) computed for every case."""
    out = tmp_path_factory.mktemp("ep")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outputs_and_token_gradients_match_one_process(two_ranks: list[dict], case: Case) -> None:
    for rank in range(2):
        got, ref = two_ranks[rank][case.name], _reference(case, rank)
        for key in ("out", "x", "w"):
            _close(got[key], ref[key])


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_ranks_experts_get_the_gradient_of_every_ranks_tokens(two_ranks: list[dict], case: Case) -> None:
    # One process sees one rank's tokens; the experts' gradient over both ranks' tokens is the sum of the two.
    refs = [_reference(case, rank) for rank in range(2)]
    for rank in range(2):
        for key in ("gate_up", "down"):
            _close(two_ranks[rank][case.name][key], (refs[0][key] + refs[1][key])[rank * 2:(rank + 1) * 2])


@pytest.mark.distributed
def test_dropped_slots_get_no_gradient(two_ranks: list[dict]) -> None:
    case = next(c for c in CASES if c.name == "dropped")
    for rank in range(2):
        dropped = torch.tensor(case.chosen[rank]) == DROP
        assert (two_ranks[rank]["dropped"]["w"][dropped] == 0).all()


@pytest.mark.distributed
def test_uneven_exchange_and_its_gradient(two_ranks: list[dict]) -> None:
    # Rank 0 receives its own row 0; rank 1 receives rank 0's rows 1-2 then its own rows 0-2.
    r0, r1 = two_ranks[0]["exchange"], two_ranks[1]["exchange"]
    assert r0["got"].tolist() == [[0.0, 1.0]]
    assert r1["got"].tolist() == [[2.0, 3.0], [4.0, 5.0], [100.0, 101.0], [102.0, 103.0], [104.0, 105.0]]
    # The gradient of a sent row is the factor (1 + its index where it was received).
    assert r0["grad"][:, 0].tolist() == [1.0, 1.0, 2.0]
    assert r1["grad"][:, 0].tolist() == [3.0, 4.0, 5.0]


@pytest.mark.distributed
def test_a_model_with_qat_experts_builds_each_ranks_share_with_whole_lsq_state(two_ranks: list[dict]) -> None:
    """Each rank's build holds its slice of the single-process build's experts, and the whole LSQ state (step
    bases of all 4 experts, computed from the experts each rank holds and gathered), bitwise."""
    whole = _qat_model()[0].state_dict()
    for rank in range(2):
        built = two_ranks[rank]["qat"]["built"]
        assert built.keys() == whole.keys()
        for name, value in built.items():
            sliced = name.endswith(("experts.gate_up", "experts.down"))
            assert torch.equal(value, whole[name][2 * rank: 2 * rank + 2] if sliced else whole[name]), name
        assert any(LSQ_STATE in n and n.endswith("_step_base") for n in built)


@pytest.mark.distributed
def test_a_model_with_qat_experts_computes_and_learns_as_one_process(two_ranks: list[dict]) -> None:
    """Fake-quant on (LSQ, steps calibrated in that forward): each rank's logits, loss and router gradient equal
    one process's on its batch; the calibrated step bases equal that process's on every rank; the experts'
    weights and learned step gains get the gradient of both ranks' tokens (a gain only in its rank's experts'
    entries, so that the data-parallel mean over ranks is the gradient of all tokens, as for the weights)."""
    model, stack = _qat_model()
    _start_quantizing(model, stack)
    refs = []
    for rank in range(2):  # one process, both ranks' batches one after the other (calibrated in the first)
        model.zero_grad()
        refs.append(_qat_forward_backward(model, rank))
    for rank in range(2):
        got, ref = two_ranks[rank]["qat"]["step"], refs[rank]
        for key in ("logits", "loss", f"grad:{ROUTER}"):
            _close(got[key], ref[key])
        for name in [k for k in got if k.endswith("_step_base")]:
            assert torch.equal(got[name], refs[0][name]), name  # whole, as calibrated in one process
            assert not torch.equal(got[name], two_ranks[rank]["qat"]["built"][name]), name  # recalibrated
        both = refs[0][f"grad:{EXPERTS}"] + refs[1][f"grad:{EXPERTS}"]
        _close(got[f"grad:{EXPERTS}"], both[2 * rank: 2 * rank + 2])
        gain = got[f"grad:{GAIN}"].view(E, -1)
        assert not gain[2 * (1 - rank): 2 * (2 - rank)].any()  # the other rank's experts: no gradient here
    summed = two_ranks[0]["qat"]["step"][f"grad:{GAIN}"] + two_ranks[1]["qat"]["step"][f"grad:{GAIN}"]
    assert summed.abs().sum() > 0
    _close(summed, refs[0][f"grad:{GAIN}"] + refs[1][f"grad:{GAIN}"])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_one_rank_is_the_whole_layer(case: Case) -> None:
    # ep = 1 (LocalCommunicator): all experts local, the exchanges are identities.
    for rank in range(2):
        got, ref = _expert_parallel(case, LocalCommunicator(), rank), _reference(case, rank)
        for key in ref:
            _close(got[key], ref[key])


def test_local_exchange_refuses_splits_over_other_ranks() -> None:
    with pytest.raises(ValueError, match="with itself"):
        LocalCommunicator().all_to_all(torch.zeros(3, 2), [1, 2], [3])
