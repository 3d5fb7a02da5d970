"""``slimtrain launch slurm``: render slurm/train.sbatch for a recipe, show it, submit it with sbatch.

Everything the user can get wrong (flags, env name, recipe) is checked before anything is written or
submitted; errors name the flag, the value and the fix.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from slimtrain.core.registry import did_you_mean

# slurm/ sits beside trainer/ in the source tree (editable installs, CI, clusters with a checkout);
# SLIMTRAIN_SLURM_DIR points at another copy (a site's own template and env files).
SLURM_DIR = Path(os.environ.get("SLIMTRAIN_SLURM_DIR") or Path(__file__).resolve().parents[2] / "slurm")
TEMPLATE = SLURM_DIR / "train.sbatch"
ENV_DIR = SLURM_DIR / "env"

Launcher = Literal["torchrun", "srun"]
LAUNCHERS: tuple[str, ...] = ("torchrun", "srun")
# SLURM accepts at most 65535 s for --signal's lead time.
MAX_SIGNAL_LEAD_S = 65535
_PLACEHOLDER = re.compile(r"\{\{ *(\w+) *\}\}")
# Values that land in #SBATCH lines: sbatch splits those lines on whitespace and does not unquote.
_SBATCH_WORD = re.compile(r"[\w.,:@%+=/-]+")


class LaunchError(ValueError):
    """A launch option is invalid; the message names the flag, the value and the fix."""


@dataclass(frozen=True)
class SlurmLaunch:
    """What to launch and where; every field is one flag of ``slimtrain launch slurm``."""

    recipe: Path
    overrides: tuple[str, ...] = ()
    nodes: int = 1
    # 0: CPU nodes, one process per node.
    gpus_per_node: int = 0
    launcher: Launcher = "torchrun"
    # CPU cores per task: per node with torchrun (one task runs all of the node's processes), per
    # process with srun. None: the cluster's default (often 1, too few for torchrun's workers).
    cpus_per_task: int | None = None
    # SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; None: the partition's default.
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str = "slimtrain"
    # A name in slurm/env/ (without .sh) or a path to a shell file.
    env: str = "default"
    # Seconds before the time limit at which SLURM warns the job (SIGUSR1) to save and requeue.
    signal_lead: int = 300
    log_dir: Path = Path("runs/slurm")
    # Further sbatch options, one #SBATCH line each, e.g. "--qos=high", "--exclusive".
    sbatch_args: tuple[str, ...] = ()
    workdir: Path = field(default_factory=Path.cwd)
    python: str = sys.executable
    # The `slimtrain` console script the job runs (the one of this environment by default).
    slimtrain: str = ""

    def __post_init__(self) -> None:
        _check_options(self)

    @property
    def procs_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def env_file(self) -> Path:
        return resolve_env_file(self.env)


def _check_options(o: SlurmLaunch) -> None:
    if o.nodes < 1:
        raise LaunchError(f"--nodes {o.nodes}: a job needs at least 1 node; pass --nodes 1 or more")
    if o.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node {o.gpus_per_node}: must be 0 (CPU nodes) or more")
    if o.cpus_per_task is not None and o.cpus_per_task < 1:
        raise LaunchError(f"--cpus-per-task {o.cpus_per_task}: must be 1 or more (or left out)")
    if o.launcher not in LAUNCHERS:
        raise LaunchError(f"--launcher {o.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    if not 1 <= o.signal_lead <= MAX_SIGNAL_LEAD_S:
        raise LaunchError(f"--signal-lead {o.signal_lead}: seconds, from 1 to {MAX_SIGNAL_LEAD_S}")
    if o.time is not None:
        limit = parse_time_limit(o.time)
        if o.signal_lead >= limit:
            raise LaunchError(
                f"--signal-lead {o.signal_lead}: the warning must come before the time limit "
                f"(--time {o.time} = {limit} s); pass a smaller --signal-lead or a longer --time"
            )
    for flag, value in (("--partition", o.partition), ("--account", o.account), ("--job-name", o.job_name)):
        if value is not None and not _SBATCH_WORD.fullmatch(value):
            raise LaunchError(f"{flag} {value!r}: use letters, digits and _.,:@%+=/- only (no spaces)")
    log_dir = (o.workdir.resolve() / o.log_dir).resolve()  # what the script gets: the submit directory counts
    if not _SBATCH_WORD.fullmatch(str(log_dir)):
        raise LaunchError(f"--log-dir {str(o.log_dir)!r} is {str(log_dir)!r}: SLURM cannot write logs to a path "
                          "with spaces or shell characters; pass an absolute --log-dir without them")
    for arg in o.sbatch_args:
        if not arg.startswith("-") or "\n" in arg:
            raise LaunchError(f"--sbatch {arg!r}: pass one sbatch option, e.g. --sbatch=--qos=high")
    for item in o.overrides:
        if "=" not in item:
            raise LaunchError(f"override {item!r}: write overrides as key.sub=value, e.g. train.steps=100")
    resolve_env_file(o.env)


def parse_time_limit(value: str) -> int:
    """Seconds in a SLURM time limit (``--time``)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if m is None:
        raise LaunchError(
            f"--time {value!r}: use a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
        )
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # MM
        seconds = a * 60
    if seconds <= 0:
        raise LaunchError(f"--time {value!r}: the time limit must be positive")
    return seconds


def resolve_env_file(env: str) -> Path:
    """The shell file ``--env`` names: ``slurm/env/<name>.sh``, or a path to a file."""
    if "/" in env or env.endswith(".sh"):
        path = Path(env).expanduser().resolve()
        if not path.is_file():
            raise LaunchError(f"--env {env!r}: no such file; pass a name from {ENV_DIR} or an existing .sh file")
        return path
    path = ENV_DIR / f"{env}.sh"
    if not path.is_file():
        names = sorted(p.stem for p in ENV_DIR.glob("*.sh"))
        hint = did_you_mean(env, names)
        hint = f"{hint} " if hint else ""
        raise LaunchError(
            f"--env {env!r}: no {path}; {hint}known: {', '.join(names) or 'none'} "
            f"(add slurm/env/{env}.sh or pass a path)"
        )
    return path


def find_slimtrain() -> str:
    """The `slimtrain` console script of the running environment (the job must run the same install)."""
    beside = Path(sys.executable).with_name("slimtrain")
    if beside.is_file():
        return str(beside)
    found = shutil.which("slimtrain")
    if found is None:
        raise LaunchError("the `slimtrain` command is not installed in this environment: pip install -e .")
    return found


def render_script(opts: SlurmLaunch, template: Path = TEMPLATE) -> str:
    """The batch script for ``opts``: ``template`` with its placeholders filled in."""
    if not template.is_file():
        raise LaunchError(
            f"no batch script template at {template}: run from a slimtrain checkout (pip install -e .) "
            "or set SLIMTRAIN_SLURM_DIR to a directory holding train.sbatch and env/"
        )
    workdir = opts.workdir.resolve()
    log_dir = (workdir / opts.log_dir).resolve()
    values = {
        "job_name": opts.job_name,
        "nodes": str(opts.nodes),
        "tasks_per_node": "1" if opts.launcher == "torchrun" else str(opts.procs_per_node),
        "gpus_per_node": str(opts.gpus_per_node) if opts.gpus_per_node else "",
        "cpus_per_task": str(opts.cpus_per_task) if opts.cpus_per_task else "",
        "time": opts.time or "",
        "partition": opts.partition or "",
        "account": opts.account or "",
        "log_dir": str(log_dir),
        "signal_lead": str(opts.signal_lead),
        "extra_sbatch": "\n".join(f"#SBATCH {arg}" for arg in opts.sbatch_args),
        "workdir": shlex.quote(str(workdir)),
        "env_file": shlex.quote(str(opts.env_file)),
        "python": shlex.quote(opts.python),
        "slimtrain": shlex.quote(opts.slimtrain or find_slimtrain()),
        # As given: the script runs in `workdir`, so a relative recipe path still points at it.
        "recipe": shlex.quote(str(opts.recipe)),
        "overrides": " ".join(shlex.quote(item) for item in opts.overrides),
        "launcher": opts.launcher,
        "procs_per_node": str(opts.procs_per_node),
    }
    return fill_template(template.read_text(), values)


def fill_template(text: str, values: dict[str, str]) -> str:
    """Replaces ``{{ name }}``; drops #SBATCH lines and lone-placeholder lines whose value is empty."""
    lines = []
    for line in text.splitlines():
        names = _PLACEHOLDER.findall(line)
        missing = [n for n in names if n not in values]
        if missing:
            raise KeyError(f"{TEMPLATE.name}: no value for placeholder(s) {missing}")
        rendered = _PLACEHOLDER.sub(lambda m: values[m.group(1)], line)
        if names and not any(values[n] for n in names):
            if line.startswith("#SBATCH") or _PLACEHOLDER.fullmatch(line.strip()):
                continue
        lines.append(rendered)
    return "\n".join(lines) + "\n"


# Groups of consecutive ranks that exchange every layer's activations: kept within a node (NVLink), never across
# the network. Megatron's tensor-parallel groups and DeepSpeed-Ulysses' sequence-parallel groups are consecutive ranks;
# the pipeline stages then fall across nodes.
_NODE_LOCAL_GROUPS = (("tensor_parallel", "megatron's tensor-parallel groups"),
                      ("sequence_parallel", "DeepSpeed-Ulysses' sequence-parallel groups"))


def check_placement(backend: object, procs_per_node: int, nodes: int) -> None:
    """Refuse a layout whose per-layer groups would span nodes (`procs_per_node` ranks on each of `nodes`)."""
    for field, what in _NODE_LOCAL_GROUPS:
        size = getattr(backend, field, 1)
        if isinstance(size, bool) or not isinstance(size, int) or size <= 1 or nodes == 1:
            continue
        if procs_per_node % size:
            raise LaunchError(f"backend.{field}={size} with {procs_per_node} ranks per node: {what} are consecutive "
                              f"ranks and would span nodes, exchanging every layer's activations over the network; "
                              f"use --gpus-per-node a multiple of {size}, or a {field} that divides {procs_per_node}")


def check_recipe(recipe: Path, overrides: tuple[str, ...], world_size: int) -> object:
    """Validates the recipe with its overrides exactly as `slimtrain train` will, including the batch
    geometry for ``world_size`` ranks (a mismatch would otherwise surface only once the job starts)."""
    if not recipe.is_file():
        raise LaunchError(f"RECIPE {str(recipe)!r}: no such file; pass a recipe YAML, e.g. recipes/tiny-cpu.yaml")
    # Imported here: the recipe schema pulls in the model and plugin configs, which the rest of this
    # module (rendering, option checks) does not need.
    from slimtrain.data.errors import DataError
    from slimtrain.trainer.recipe.schema import RecipeError, load_recipe

    try:
        loaded = load_recipe(str(recipe), list(overrides))
        loaded.check_world(world_size)
        _check_from_login_node(loaded)
        return loaded
    except (RecipeError, DataError) as e:  # DataError: a data input this node sees is missing
        raise LaunchError(f"recipe {str(recipe)!r} is invalid, nothing submitted:\n{e}") from None


def _check_from_login_node(recipe) -> None:
    """What `slimtrain train` checks before launch, as far as this node can: that the model can be exported, and
    the `init_from_hf` directory when this node sees it. A path this node does not see (cluster storage mounted
    on the compute nodes only) and the data inputs are checked by rank 0 when the job starts (exit 2)."""
    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.trainer.export.hf import check_exportable
    from slimtrain.trainer.export.importer import check_init_from_hf

    plugins = PluginStack.from_configs(recipe.plugins)
    why_not = check_exportable(recipe.model, plugins)
    if why_not:
        print(f"note: this model will not be exportable to Hugging Face format ({why_not}); training goes on",
              file=sys.stderr)
    _check_visible_data(recipe.data)
    hf = recipe.checkpoint.init_from_hf
    if hf and Path(hf).exists():
        check_init_from_hf(Path(hf), recipe.model, PluginStack.from_configs(recipe.plugins))
    elif hf:
        print(f"note: checkpoint.init_from_hf={hf!r} is not visible from this node; the job checks it when it starts",
              file=sys.stderr)


def _check_visible_data(data) -> None:
    """The data inputs, when this node sees where they live: every local source's directories (before any
    wildcard) and the tokenizer path exist here. Otherwise rank 0 checks them when the job starts."""
    from slimtrain.data import check_inputs

    roots = [Path(p.split("*")[0].split("?")[0] or ".").expanduser() for s in data.sources
             for p in getattr(s, "paths", None) or ()]
    if data.tokenizer.path is not None:
        roots.append(Path(data.tokenizer.path).expanduser())
    unseen = [str(r) for r in roots if not (r if r.is_dir() else r.parent).exists()]
    if unseen:
        print(f"note: {unseen[0]} is not visible from this node; the job checks the data inputs when it starts",
              file=sys.stderr)
        return
    check_inputs(data)


@dataclass(frozen=True)
class Submitted:
    job_id: str
    log: Path
    script: Path


def submit(opts: SlurmLaunch, script: str) -> Submitted:
    """Submits ``script`` with sbatch; keeps a copy beside the log (the job's log dir)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("sbatch not found on PATH: launch from a SLURM login node, or use --dry-run to see the script")
    log_dir = (opts.workdir / opts.log_dir).resolve()
    # SLURM does not create the directory of --output; a missing one loses the log without an error.
    log_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sbatch, "--parsable"], input=script, capture_output=True, text=True, timeout=120, cwd=opts.workdir
    )
    if proc.returncode != 0:
        raise LaunchError(f"sbatch refused the job (exit {proc.returncode}): {proc.stderr.strip()}")
    # --parsable prints "<id>" or "<id>;<cluster>".
    job_id = proc.stdout.strip().split(";")[0]
    saved = log_dir / f"{opts.job_name}-{job_id}.sbatch"
    saved.write_text(script)
    return Submitted(job_id=job_id, log=log_dir / f"{opts.job_name}-{job_id}.out", script=saved)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``slurm`` in the sub-commands of ``slimtrain launch``; ``func(args)`` returns the exit status."""
    p = subparsers.add_parser(
        "slurm",
        help="render the batch script for a recipe and submit it with sbatch",
        description="Render slurm/train.sbatch for RECIPE, show it and submit it. "
        "Overrides (key.sub=value) follow the recipe, before the flags.",
    )
    p.add_argument("recipe", type=Path, help="recipe YAML")
    p.add_argument("overrides", nargs="*", default=[], help="recipe overrides, key.sub=value")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (= processes) per node; 0: CPU nodes")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPU cores per task: per node with torchrun, per process with srun (default: the cluster's)")
    p.add_argument("--time", help="time limit, e.g. 04:00:00 or 2-00:00:00 (default: the partition's)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account to charge")
    p.add_argument("--job-name", help="job name (default: the recipe's run.name)")
    p.add_argument("--env", default="default", help="cluster environment: slurm/env/NAME.sh, or a path")
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun",
                   help="torchrun: one task per node running torchrun; srun: one task per process")
    p.add_argument("--signal-lead", type=int, default=300,
                   help="seconds before the time limit at which the job checkpoints and requeues (default 300)")
    p.add_argument("--log-dir", type=Path, help="where SLURM writes the log (default: RUN_OUTPUT_DIR/slurm)")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="extra sbatch option, repeatable, e.g. --sbatch=--qos=high")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.set_defaults(func=run_command)


def options_from_args(args: argparse.Namespace) -> SlurmLaunch:
    """Checks the flags, then the recipe, and fills the defaults that come from the recipe."""
    opts = SlurmLaunch(
        recipe=args.recipe,
        overrides=tuple(args.overrides),
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        launcher=args.launcher,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        job_name=args.job_name or "slimtrain",
        env=args.env,
        signal_lead=args.signal_lead,
        log_dir=args.log_dir or Path("runs/slurm"),
        sbatch_args=tuple(args.sbatch),
        slimtrain=find_slimtrain(),
    )
    recipe = check_recipe(opts.recipe, opts.overrides, world_size=opts.nodes * opts.procs_per_node)
    check_placement(recipe.backend, opts.procs_per_node, opts.nodes)  # type: ignore[attr-defined]
    run = recipe.run  # type: ignore[attr-defined]
    return replace(
        opts,
        job_name=args.job_name or _job_name(run.name),
        log_dir=args.log_dir or Path(run.resolved_output_dir) / "slurm",
    )


def _job_name(name: str) -> str:
    # Run names may hold characters that #SBATCH lines cannot; a job name is only a label.
    return re.sub(r"[^\w.+-]", "-", name) or "slimtrain"


def run_command(args: argparse.Namespace) -> int:
    """``slimtrain launch slurm``: returns the exit status (2 for a refused launch)."""
    try:
        opts = options_from_args(args)
        script = render_script(opts)
        print(script, end="")
        if args.dry_run:
            print("dry run: nothing submitted", file=sys.stderr)
            return 0
        done = submit(opts, script)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nSubmitted job {done.job_id}")
    print(f"  log:    {done.log}")
    print(f"  script: {done.script}")
    print(f"  follow: tail -f {done.log}    cancel: scancel {done.job_id}")
    print(f"  checkpoint + requeue now: scancel --signal=USR1 --batch {done.job_id}")
    return 0
