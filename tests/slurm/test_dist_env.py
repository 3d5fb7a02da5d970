"""resolve_dist_env: torchrun, SLURM and single-process environments, and SLURM node lists."""

from __future__ import annotations

import os
import shutil
import subprocess
from unittest import mock

import pytest

from slimtrain.trainer.env import distributed
from slimtrain.trainer.env.distributed import (
    DistEnv,
    DistEnvError,
    expand_hostlist,
    export_dist_env,
    port_for_job,
    resolve_dist_env,
)


@pytest.fixture
def no_scontrol(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pure parser must give the answer on machines without SLURM too.
    monkeypatch.setattr(distributed.shutil, "which", lambda name, *a, **k: None)


SLURM_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NODELIST": "gpu[07-09,12]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
}


def test_torchrun_variables_win_over_slurm() -> None:
    # Under torchrun inside a SLURM step both sets are present; torchrun's describe the worker.
    env = resolve_dist_env(
        {**SLURM_TASK, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
         "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    )
    assert env == DistEnv(3, 4, 1, 2, "n1", 29500, "torchrun")


def test_slurm_task(no_scontrol: None) -> None:
    env = resolve_dist_env(SLURM_TASK)
    assert env == DistEnv(5, 8, 1, 2, "gpu07", port_for_job(4242), "slurm")


def test_slurm_master_variables_take_precedence(no_scontrol: None) -> None:
    env = resolve_dist_env({**SLURM_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 1234)


def test_slurm_step_nodelist_is_preferred(no_scontrol: None) -> None:
    # A step may run on a subset of the allocation; its task 0 is on the step's first node.
    env = resolve_dist_env({**SLURM_TASK, "SLURM_STEP_NODELIST": "gpu[09,12]"})
    assert env.master_addr == "gpu09"


def test_uneven_tasks_per_node() -> None:
    env = resolve_dist_env({**SLURM_TASK, "SLURM_NTASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
                            "SLURM_NODEID": "3", "SLURM_PROCID": "6", "SLURM_LOCALID": "0",
                            "MASTER_ADDR": "x"})
    assert (env.local_rank, env.local_world_size) == (0, 1)


def test_batch_script_is_a_single_process() -> None:
    # The batch shell sees the allocation's task count but is one process: no step id there.
    environ = {k: v for k, v in SLURM_TASK.items() if k != "SLURM_STEP_ID"}
    env = resolve_dist_env(environ)
    assert (env.source, env.rank, env.world_size, env.master_port) == ("single", 0, 1, None)


def test_nothing_set_is_single() -> None:
    assert resolve_dist_env({}) == DistEnv(0, 1, 0, 1, "127.0.0.1", None, "single")


def test_job_port_is_stable_and_outside_the_ephemeral_range() -> None:
    ports = {port_for_job(j) for j in range(0, 100000, 7)}
    assert all(20000 <= p < 30000 for p in ports)
    assert port_for_job(123456) == port_for_job(123456)


@pytest.mark.parametrize(
    "environ, needle",
    [
        ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK=4"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
        ({"RANK": "x", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "RANK='x'"),
        ({**SLURM_TASK, "SLURM_STEP_TASKS_PER_NODE": "two"}, "SLURM_STEP_TASKS_PER_NODE"),
        ({**SLURM_TASK, "SLURM_JOB_ID": "", "MASTER_ADDR": "a"}, "MASTER_PORT"),
    ],
)
def test_bad_variables_are_named(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(DistEnvError, match=needle.replace("[", r"\[")):
        resolve_dist_env(environ)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("node[1-3,5]", ["node1", "node2", "node3", "node5"]),
        ("gpu[007-009]", ["gpu007", "gpu008", "gpu009"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
    ],
)
def test_expand_hostlist(nodelist: str, hosts: list[str]) -> None:
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-3", "node[a-b]", "n[[1]]", ""])
def test_expand_hostlist_rejects_malformed(bad: str) -> None:
    with pytest.raises(DistEnvError):
        expand_hostlist(bad)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
@pytest.mark.parametrize("nodelist", ["node[1-3,5]", "gpu[007-009],cpu1", "rack[1-2]-n[3,5]", "n[9-11]"])
def test_parser_agrees_with_scontrol(nodelist: str) -> None:
    # `scontrol show hostnames` expands without contacting the controller.
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    assert expand_hostlist(nodelist) == out.stdout.split()


def test_export_picks_a_free_port_for_a_single_process() -> None:
    environ: dict[str, str] = {}
    env = export_dist_env(resolve_dist_env({}), environ)
    assert env.master_port is not None and env.master_port > 0
    assert environ == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(env.master_port)}


def test_print_master_for_the_batch_script(no_scontrol: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert distributed._print_master({"SLURM_JOB_NODELIST": "n[3-4]", "SLURM_JOB_ID": "17"}) == 0
    assert capsys.readouterr().out == f"export MASTER_ADDR=n3 MASTER_PORT={port_for_job(17)}\n"
    assert distributed._print_master({}) == 2


def test_init_distributed_single_process() -> None:
    import torch.distributed as dist

    # init_distributed exports RANK, MASTER_PORT, ...: restore the whole environment afterwards, or
    # later tests (and the jobs they submit) would inherit them.
    with mock.patch.dict(os.environ):
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_ID"):
            os.environ.pop(key, None)
        os.environ["DS_ACCELERATOR"] = "cpu"
        env = distributed.init_distributed("gloo")
        try:
            assert (env.source, dist.get_rank(), dist.get_world_size()) == ("single", 0, 1)
            assert os.environ["MASTER_PORT"] == str(env.master_port)
        finally:
            dist.destroy_process_group()
    assert "MASTER_PORT" not in os.environ or os.environ["MASTER_PORT"] != str(env.master_port)


def test_the_batch_script_skips_a_port_another_job_listens_on(no_scontrol: None,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("", port_for_job(17)))
    taken.listen()
    try:  # job 10017 maps to the same port as job 17, which holds it on this node
        assert distributed._print_master({"SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "10017"}) == 0
    finally:
        taken.close()
    assert capsys.readouterr().out == f"export MASTER_ADDR=n1 MASTER_PORT={port_for_job(17) + 1}\n"
    assert distributed.free_port_from(29400) not in (29400, 29500)  # torchrun's own defaults are left alone


def test_leftover_launcher_variables_in_a_slurm_step_say_how_to_clear_them() -> None:
    with pytest.raises(distributed.DistEnvError, match="unset RANK WORLD_SIZE"):
        distributed.resolve_dist_env({"RANK": "0", "WORLD_SIZE": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0",
                                      "SLURM_NTASKS": "4"})


def test_nproc_inside_a_one_task_slurm_step_starts_local_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from slimtrain.trainer.cli import _under_launcher
    from slimtrain.trainer.errors import SlimtrainError

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1",
            "SLURM_STEP_NODELIST": "n1"}
    for key, value in {**step, "SLURM_NTASKS": "1"}.items():  # `srun --pty bash`, then `slimtrain train --nproc 8`
        monkeypatch.setenv(key, value)
    assert _under_launcher(8) is False
    assert _under_launcher(None) is True  # no --nproc: the step's one task is the run's one rank
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(SlimtrainError, match="--nproc 8: this process is already rank 0 of 4 started by slurm"):
        _under_launcher(8)


def test_each_rank_finds_its_gpu_whether_it_sees_all_or_one() -> None:
    assert distributed.cuda_device_index({"LOCAL_RANK": "3"}, device_count=8) == 3  # all of the node's GPUs
    assert distributed.cuda_device_index({"LOCAL_RANK": "3"}, device_count=1) == 0  # --gpus-per-task=1
    with pytest.raises(distributed.DistEnvError, match="LOCAL_RANK=3 but this process sees 2 GPUs"):
        distributed.cuda_device_index({"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "4,5"}, device_count=2)


@pytest.mark.parametrize("world_size, bound", [(8, True), (1, False)])
def test_nccl_is_bound_to_the_rank_s_own_gpu(monkeypatch: pytest.MonkeyPatch, world_size: int, bound: bool) -> None:
    """With one GPU per task, local rank 3 runs on cuda:0 (DeepSpeed alone would bind cuda:3, which does not
    exist); a single-rank job binds none, as DeepSpeed does."""
    import torch
    import torch.distributed as dist

    calls: dict[str, object] = {}
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("set_device", device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    env = DistEnv(rank=3, world_size=world_size, local_rank=3, local_world_size=4, master_addr="n1",
                  master_port=20001, source="slurm")
    distributed.init_nccl(env)
    assert calls["set_device"] == torch.device("cuda", 0)
    assert (calls["backend"], calls["rank"], calls["world_size"]) == ("nccl", 3, world_size)
    assert calls.get("device_id") == (torch.device("cuda", 0) if bound else None)
