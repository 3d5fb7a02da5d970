"""Where this process sits in the job: rank, world size and rendezvous address, from the environment.

Three launchers are understood, in this order:

1. ``torchrun`` (or anything that sets ``RANK`` and ``WORLD_SIZE``, e.g. the DeepSpeed launcher);
2. ``srun`` with one task per process: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the
   job's node list; the first node of the step is the rendezvous address and the port is derived
   from the job id, so every task of a job computes the same address without talking to the others;
3. nothing: a single process.

:func:`resolve_dist_env` only reads a mapping, so every launcher can be tested without one;
:func:`init_distributed` exports the result in the variables torch expects and initialises the
process group through DeepSpeed (NCCL bound to the rank's own GPU first).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Source = Literal["torchrun", "slurm", "single"]

# Ports derived from the job id fall in [BASE, BASE + SPAN): below Linux's ephemeral range
# (32768+), so an outgoing connection never holds the port a job is about to listen on.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000


@dataclass(frozen=True)
class DistEnv:
    """One process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    # None: nobody chose one; :func:`init_distributed` picks a free port (single process only).
    master_port: int | None
    source: Source

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DistEnvError(ValueError):
    """The launcher's variables are inconsistent or malformed."""


def resolve_dist_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Reads the launcher's variables from ``environ`` (no side effect but ``scontrol``, see below).

    The SLURM branch needs a job *step* (``SLURM_STEP_ID``): inside the batch script itself
    ``SLURM_NTASKS`` counts the tasks of the whole allocation, yet only one process runs there.
    """
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _from_torchrun(environ)
    if all(k in environ for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID")):
        return _from_slurm(environ)
    port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else None
    return DistEnv(0, 1, 0, 1, environ.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    world_size = _int(environ, "WORLD_SIZE")
    rank = _int(environ, "RANK")
    _check_rank(rank, world_size, "RANK", "WORLD_SIZE")
    if "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
        leaked = " (inside a SLURM step: if they are left over from another launcher, unset RANK WORLD_SIZE " \
                 "to use SLURM's variables)" if "SLURM_STEP_ID" in environ else ""
        raise DistEnvError(
            "RANK and WORLD_SIZE are set but MASTER_ADDR/MASTER_PORT are not: "
            f"launch with torchrun, or export both (e.g. MASTER_ADDR=127.0.0.1 MASTER_PORT=29500){leaked}"
        )
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=_int(environ, "LOCAL_RANK", 0),
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE", 1),
        master_addr=environ["MASTER_ADDR"],
        master_port=_int(environ, "MASTER_PORT"),
        source="torchrun",
    )


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    world_size = _int(environ, "SLURM_NTASKS")
    rank = _int(environ, "SLURM_PROCID")
    _check_rank(rank, world_size, "SLURM_PROCID", "SLURM_NTASKS")
    if environ.get("MASTER_ADDR"):
        master_addr = environ["MASTER_ADDR"]
    else:
        # Task 0 runs on the first node of the step (for every SLURM task distribution).
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise DistEnvError("SLURM_JOB_NODELIST is not set: cannot find the first node; export MASTER_ADDR")
        master_addr = first_host(nodelist)
    if environ.get("MASTER_PORT"):
        master_port = _int(environ, "MASTER_PORT")
    elif environ.get("SLURM_JOB_ID"):
        master_port = port_for_job(_int(environ, "SLURM_JOB_ID"))
    else:
        raise DistEnvError("SLURM_JOB_ID is not set: cannot derive a rendezvous port; export MASTER_PORT")
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=_int(environ, "SLURM_LOCALID", 0),
        local_world_size=_local_world_size(environ),
        master_addr=master_addr,
        master_port=master_port,
        source="slurm",
    )


def port_for_job(job_id: int) -> int:
    """The rendezvous port of a SLURM job: the same on every node, and for a requeued run."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def _local_world_size(environ: Mapping[str, str]) -> int:
    """Tasks on this node: SLURM writes counts per node as e.g. ``2(x3),1`` (3 nodes with 2, one with 1)."""
    counts = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if not counts:
        return 1
    per_node: list[int] = []
    for part in counts.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise DistEnvError(f"SLURM_STEP_TASKS_PER_NODE={counts!r}: cannot parse {part!r}")
        per_node += [int(m.group(1))] * int(m.group(2) or 1)
    node = _int(environ, "SLURM_NODEID", 0)
    return per_node[node] if node < len(per_node) else 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list; asks ``scontrol`` when present (it knows every syntax)."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass  # fall back to our own parser: a login node's scontrol may not reach the controller
    return expand_hostlist(nodelist)[0]


def expand_hostlist(nodelist: str) -> list[str]:
    """Expands ``node[1-3,5],gpu-[01-02]x`` to every host name, in order, keeping zero padding.

    A name may hold several bracket groups (``rack[1-2]-n[1-2]``): their product, first group outermost.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts += _expand_one(item, nodelist)
    if not hosts:
        raise DistEnvError(f"empty node list {nodelist!r}")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
        if depth not in (0, 1):
            raise DistEnvError(f"node list {nodelist!r}: unbalanced or nested brackets")
    if depth != 0:
        raise DistEnvError(f"node list {nodelist!r}: unbalanced brackets")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_one(item: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    prefix, rest = item[: m.start()], item[m.end() :]
    tails = _expand_one(rest, whole)
    names: list[str] = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise DistEnvError(f"node list {whole!r}: bad range {part!r}")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            names += [f"{prefix}{n:0{width}d}{tail}" for tail in tails]
    return names


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    value = environ.get(key)
    if value is None:
        if default is None:
            raise DistEnvError(f"{key} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistEnvError(f"{key}={value!r} is not an integer") from None


def _check_rank(rank: int, world_size: int, rank_key: str, size_key: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistEnvError(f"{rank_key}={rank} and {size_key}={world_size}: need 0 <= rank < world size")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_dist_env(env: DistEnv, environ: MutableMapping[str, str] = os.environ) -> DistEnv:
    """Writes ``env`` into the variables torch's ``env://`` init reads; picks a port if none was chosen."""
    if env.master_port is None:
        env = replace(env, master_port=_free_port())
    environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    return env


def init_distributed(backend: str) -> DistEnv:
    """Initialises torch.distributed (through DeepSpeed) for this process; returns where it sits.

    ``backend`` is ``"gloo"`` on CPU and ``"nccl"`` on NVIDIA GPUs. Safe to call twice.
    """
    import deepspeed  # imported here: resolving the environment must not need DeepSpeed

    env = export_dist_env(resolve_dist_env(os.environ))
    if backend == "nccl":
        init_nccl(env)
    # Every variable is exported above, so DeepSpeed's MPI/AzureML discovery must not run. After
    # init_nccl, DeepSpeed wraps the process group that is already there.
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, verbose=False, rank=env.rank, world_size=env.world_size
    )
    return env


def init_nccl(env: DistEnv) -> None:
    """The NCCL process group, bound to this rank's own GPU (`cuda_device_index`).

    DeepSpeed would bind `cuda:LOCAL_RANK`, a device that does not exist when SLURM gives each task
    one GPU; unbound, NCCL guesses the device from the global rank, which can hang on such a mapping.
    As in DeepSpeed, no device is bound in a single-rank job (torch would then build every later
    group by splitting a communicator that has no peer) nor on the torch versions where that hangs.
    """
    import torch
    import torch.distributed as dist
    from deepspeed.constants import default_pg_timeout

    if dist.is_initialized():
        return
    device = torch.device("cuda", cuda_device_index())
    torch.cuda.set_device(device)
    bind = env.world_size > 1 and not ("2.6.0" < torch.__version__ < "2.7.1")  # TorchVersion compares
    dist.init_process_group(
        "nccl", init_method="env://", rank=env.rank, world_size=env.world_size, timeout=default_pg_timeout,
        **({"device_id": device} if bind else {}),
    )


def rank_device() -> "torch.device":
    """Where this rank's batches and model live: its GPU (`cuda_device_index`), or the CPU without one."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", cuda_device_index())
    return torch.device("cpu")


def cuda_device_index(environ: Mapping[str, str] = os.environ, device_count: int | None = None) -> int:
    """This rank's GPU: its local rank when it sees all of its node's GPUs (the default), or the one GPU it
    sees when SLURM binds one per task (`--gpus-per-task=1`, `--gpu-bind=single:1`)."""
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    local = int(environ.get("LOCAL_RANK", 0))
    if local < device_count:
        return local
    if device_count == 1:
        return 0
    raise DistEnvError(
        f"LOCAL_RANK={local} but this process sees {device_count} GPUs (CUDA_VISIBLE_DEVICES="
        f"{environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): give every task all of its node's GPUs or exactly one "
        "(check --gpus-per-task / --gpu-bind in the job's sbatch options)"
    )


def _print_master(environ: Mapping[str, str]) -> int:
    """``python -m slimtrain.trainer.env.distributed``: the rendezvous address of the current SLURM job as
    shell assignments, for the batch script (one rule for the script and the Python side)."""
    nodelist = environ.get("SLURM_JOB_NODELIST")
    job_id = environ.get("SLURM_JOB_ID")
    if not nodelist or not job_id:
        print("error: run inside a SLURM job (SLURM_JOB_NODELIST and SLURM_JOB_ID unset)", file=sys.stderr)
        return 2
    addr = environ.get("MASTER_ADDR") or first_host(nodelist)
    port = environ.get("MASTER_PORT") or str(free_port_from(port_for_job(int(job_id))))
    print(f"export MASTER_ADDR={addr} MASTER_PORT={port}")
    return 0


# torchrun's defaults (c10d rendezvous and the process group): a job that also listens there would collide
# with anyone running plain torchrun on the node.
_TORCHRUN_DEFAULT_PORTS = (29400, 29500)


def free_port_from(port: int, tries: int = 200) -> int:
    """The first port from `port` on (wrapping within the job-port range) that nothing on this machine
    listens on. The batch script runs on the first node, where rank 0 will listen, so two jobs sharing a
    node whose ids map to the same port still get different ones."""
    for i in range(tries):
        candidate = SLURM_PORT_BASE + (port - SLURM_PORT_BASE + i) % SLURM_PORT_SPAN
        if candidate in _TORCHRUN_DEFAULT_PORTS:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", candidate))
            except OSError:
                continue
            return candidate
    raise DistEnvError(f"no free port among {tries} from {port}; export MASTER_PORT in the env file")


if __name__ == "__main__":
    raise SystemExit(_print_master(os.environ))
