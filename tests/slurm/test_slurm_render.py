"""`slimtrain launch slurm`: the rendered script, --dry-run, and flags refused before any submission.

No cluster needed: submissions go to a fake `sbatch` on PATH that records what it was given.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slimtrain.trainer.launch.slurm import (
    ENV_DIR,
    LaunchError,
    SlurmLaunch,
    parse_time_limit,
    render_script,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "tiny-cpu.yaml"
DOCS = REPO / "docs" / "slurm.md"

# The 4-node example of docs/slurm.md, with the paths a user would have.
DOCS_EXAMPLE = dict(
    recipe=Path("recipes/quickstart.yaml"),
    overrides=("train.steps=20000",),
    nodes=4,
    gpus_per_node=8,
    cpus_per_task=64,
    time="12:00:00",
    partition="gpu",
    account="my-project",
    job_name="quickstart",
    log_dir=Path("runs/quickstart/slurm"),
    workdir=Path("/home/me/slimtrain"),
    python="/home/me/slimtrain/.venv/bin/python",
    slimtrain="/home/me/slimtrain/.venv/bin/slimtrain",
)


def _render(**kw: object) -> str:
    base: dict[str, object] = dict(recipe=Path("r.yaml"), workdir=Path("/w"), python="/py", slimtrain="/st")
    return render_script(SlurmLaunch(**{**base, **kw}))  # type: ignore[arg-type]


def _sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def _bash_syntax_ok(script: str) -> None:
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_cpu_nodes_with_torchrun() -> None:
    script = _render(nodes=2, gpus_per_node=0, env="cpu", time="10", job_name="tiny")
    assert _sbatch_lines(script) == [
        "#SBATCH --job-name=tiny",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --time=10",
        "#SBATCH --output=/w/runs/slurm/%x-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
    ]
    assert "LAUNCHER=torchrun\n" in script and "PROCS_PER_NODE=1\n" in script
    assert f"source {ENV_DIR / 'cpu.sh'}\n" in script
    assert "cd /w\n" in script
    _bash_syntax_ok(script)


def test_gpu_nodes_one_task_per_gpu() -> None:
    script = _render(
        nodes=4, gpus_per_node=8, launcher="srun", partition="gpu", account="proj", signal_lead=600, cpus_per_task=12,
        time="1-00:00:00", sbatch_args=("--qos=high", "--exclusive"),
    )
    sbatch = _sbatch_lines(script)
    for line in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--account=proj", "--cpus-per-task=12",
                 "--time=1-00:00:00", "--signal=B:USR1@600", "--qos=high", "--exclusive"):
        assert f"#SBATCH {line}" in sbatch
    assert "LAUNCHER=srun\n" in script and "PROCS_PER_NODE=8\n" in script
    assert f"source {ENV_DIR / 'default.sh'}\n" in script
    _bash_syntax_ok(script)


def test_torchrun_mode_runs_one_task_per_node_even_with_gpus() -> None:
    sbatch = _sbatch_lines(_render(nodes=2, gpus_per_node=4))
    assert "#SBATCH --ntasks-per-node=1" in sbatch and "#SBATCH --gpus-per-node=4" in sbatch


def test_overrides_reach_the_trainer_as_separate_words() -> None:
    overrides = ("train.steps=5", "run.name=a b", "data.path=$HOME/x;rm -rf /")
    script = _render(recipe=Path("my recipes/r.yaml"), overrides=overrides)
    (line,) = [ln for ln in script.splitlines() if ln.startswith("TRAIN_ARGS=")]
    # Let bash parse the line exactly as the job will, and print one word per line.
    words = subprocess.run(
        ["bash", "-c", line + '\nprintf "%s\\n" "${TRAIN_ARGS[@]}"'], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert words == ["train", "my recipes/r.yaml", *overrides]


@pytest.mark.parametrize("page", [DOCS], ids=lambda p: p.name)
def test_docs_show_the_current_dry_run_output(page: Path) -> None:
    script = render_script(SlurmLaunch(**DOCS_EXAMPLE))  # type: ignore[arg-type]
    script = script.replace(str(ENV_DIR), "/home/me/slimtrain/slurm/env")
    docs = page.read_text()
    blocks = re.findall(r"```bash\n(#!/bin/bash\n.*?)```", docs, flags=re.S)
    assert blocks, f"{page} has no rendered script"
    assert blocks[0] == script, f"{page.name} is out of date: regenerate its example from render_script"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(nodes=0), "--nodes 0"),
        (dict(gpus_per_node=-1), "--gpus-per-node -1"),
        (dict(cpus_per_task=0), "--cpus-per-task 0"),
        (dict(env="cpux"), "did you mean 'cpu'"),
        (dict(env="/nonexistent/env.sh"), "--env '/nonexistent/env.sh'"),
        (dict(time="1:2:3:4"), "--time '1:2:3:4'"),
        (dict(time="00:04:00", signal_lead=300), "--signal-lead 300"),
        (dict(signal_lead=0), "--signal-lead 0"),
        (dict(partition="gpu large"), "--partition 'gpu large'"),
        (dict(launcher="mpirun"), "--launcher 'mpirun'"),
        (dict(overrides=("train.steps",)), "override 'train.steps'"),
        (dict(sbatch_args=("qos=high",)), "--sbatch 'qos=high'"),
        (dict(log_dir=Path("my logs")), "--log-dir 'my logs'"),
        (dict(workdir=Path("/home/me/my proj")), "--log-dir 'runs/slurm' is '/home/me/my proj/runs/slurm'"),
    ],
)
def test_bad_options_name_the_flag(kw: dict[str, object], message: str) -> None:
    with pytest.raises(LaunchError, match=re.escape(message)):
        _render(**kw)


@pytest.mark.parametrize(
    "value, seconds",
    [("30", 1800), ("30:15", 1815), ("2:00:00", 7200), ("1-2", 93600), ("1-2:30", 95400), ("0-0:0:5", 5)],
)
def test_time_limits(value: str, seconds: int) -> None:
    assert parse_time_limit(value) == seconds


# --- the command line, against a fake sbatch ---------------------------------------------------


@pytest.fixture
def fake_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `sbatch` that records its stdin and arguments and answers job id 77; returns its record dir."""
    record = tmp_path / "sbatch-calls"
    record.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\ncat > {record}/script\necho "$@" > {record}/args\necho 77\n')
    sbatch.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    return record


def _cli(*args: str) -> int:
    from slimtrain.trainer.cli import main

    return main(["launch", "slurm", *args])


CPU_FLAGS = ("--nodes", "2", "--gpus-per-node", "0", "--env", "cpu", "--time", "00:30:00")


def test_dry_run_prints_the_script_and_submits_nothing(
    fake_sbatch: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert _cli(str(TINY), "train.steps=7", *CPU_FLAGS, "--dry-run") == 0
    out = capsys.readouterr()
    assert out.out.startswith("#!/bin/bash\n") and "dry run" in out.err
    assert "'train.steps=7'" in out.out or "train.steps=7" in out.out
    assert "#SBATCH --job-name=" in out.out and "#SBATCH --nodes=2" in out.out
    assert not (fake_sbatch / "script").exists()
    assert not (tmp_path / "runs").exists(), "a dry run must not create the log directory"


def test_submit_saves_the_script_beside_the_log(
    fake_sbatch: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert _cli(str(TINY), *CPU_FLAGS, "--job-name", "t1", "--log-dir", "logs") == 0
    out = capsys.readouterr().out
    submitted = (fake_sbatch / "script").read_text()
    assert (fake_sbatch / "args").read_text().split() == ["--parsable"]
    assert out.startswith(submitted)
    assert "Submitted job 77" in out and str(tmp_path / "logs" / "t1-77.out") in out
    assert (tmp_path / "logs" / "t1-77.sbatch").read_text() == submitted


@pytest.mark.parametrize(
    "args, message",
    [
        ((str(TINY), "--nodes", "0", "--gpus-per-node", "0"), "--nodes 0"),
        ((str(TINY), "--nodes", "2", "--gpus-per-node", "0", "--env", "nope"), "--env 'nope'"),
        ((str(TINY), "train.no_such_key=1", *CPU_FLAGS), "no_such_key"),
        ((str(TINY), "train.steps=-3", *CPU_FLAGS), "train.steps"),
        (("recipes/missing.yaml", *CPU_FLAGS), "no such file"),
        # 8 rows per step do not split over 3 ranks of 2-row micro-batches: caught before queueing.
        ((str(TINY), "--nodes", "3", "--gpus-per-node", "0", "--env", "cpu"), "train.global_batch_size=8"),
        # What `slimtrain train` checks before launch, from the login node: a model export would refuse, and an
        # init_from_hf directory this node sees that is no Hugging Face model.
        ((str(TINY), "model.num_heads=6", "model.num_kv_heads=2", "model.head_dim=12", *CPU_FLAGS), "num_heads=6"),
        ((str(TINY), f"checkpoint.init_from_hf={REPO / 'recipes'}", *CPU_FLAGS), "checkpoint.init_from_hf"),
        ((str(TINY), f"data.tokenizer.path={REPO / 'recipes' / 'no-such-tokenizer'}", *CPU_FLAGS),
         "no-such-tokenizer"),
    ],
)
def test_bad_launches_are_refused_before_submission(
    fake_sbatch: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    assert _cli(*args) == 2
    assert message in capsys.readouterr().err
    assert not (fake_sbatch / "script").exists()
    assert not (tmp_path / "runs").exists()


def _run_script_with_fakes(tmp_path: Path, scontrol_status: int, env_file_body: str = "") -> subprocess.CompletedProcess:
    """The rendered batch script run by bash, with `srun` a stand-in for the step (it asks for a requeue as
    the trainer does after SIGUSR1) and `scontrol` one that answers `scontrol_status`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "srun").write_text('#!/bin/bash\necho 1 > "$SLIMTRAIN_REQUEUE_REQUEST"\nexit 0\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [[ $1 == show ]]; then echo "$3"; exit 0; fi\n'
                                      f'echo "scontrol $*"\nexit {scontrol_status}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env_file = tmp_path / "env.sh"
    env_file.write_text(env_file_body)
    script = render_script(SlurmLaunch(recipe=Path("r.yaml"), workdir=tmp_path, python=sys.executable,
                                       slimtrain="/st", log_dir=Path("logs"), env=str(env_file)))
    (tmp_path / "logs").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="localhost",
               SLURM_JOB_NUM_NODES="1")
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_a_failed_requeue_does_not_end_the_job_completed(tmp_path: Path) -> None:
    ok = _run_script_with_fakes(tmp_path / "ok", scontrol_status=0)
    assert ok.returncode == 0 and "scontrol requeue 42" in ok.stdout, ok.stderr
    failed = _run_script_with_fakes(tmp_path / "failed", scontrol_status=1)
    assert failed.returncode == 1 and "requeue failed" in failed.stderr  # afterok dependents must not start


def test_the_env_file_may_read_unset_variables(tmp_path: Path) -> None:
    # conda's activation scripts (and some module systems) read variables that may be unset.
    proc = _run_script_with_fakes(tmp_path, scontrol_status=0, env_file_body='echo "conda ${UNSET_THING}"\n')
    assert proc.returncode == 0 and "conda " in proc.stdout, proc.stderr


def test_a_first_node_name_that_does_not_resolve_stops_the_job_with_the_fix(tmp_path: Path) -> None:
    proc = _run_script_with_fakes(tmp_path, scontrol_status=0,
                                  env_file_body="export MASTER_ADDR=no-such-node.invalid\n")
    assert proc.returncode == 2 and "no-such-node.invalid does not resolve here" in proc.stderr


def test_groups_that_exchange_every_layer_stay_within_a_node() -> None:
    from types import SimpleNamespace

    from slimtrain.trainer.launch.slurm import check_placement

    check_placement(SimpleNamespace(tensor_parallel=8), procs_per_node=8, nodes=2)  # TP in a node, PP across nodes
    check_placement(SimpleNamespace(tensor_parallel=8), procs_per_node=4, nodes=1)  # one node: nothing to span
    with pytest.raises(LaunchError, match=re.escape("backend.tensor_parallel=8 with 4 ranks per node: megatron's "
                                                    "tensor-parallel groups are consecutive ranks and would span nodes")):
        check_placement(SimpleNamespace(tensor_parallel=8), procs_per_node=4, nodes=2)
    with pytest.raises(LaunchError, match=re.escape("backend.sequence_parallel=8 with 4 ranks per node")):
        check_placement(SimpleNamespace(sequence_parallel=8, tensor_parallel=1), procs_per_node=4, nodes=4)
