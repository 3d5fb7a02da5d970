"""`slimtrain` command line: train | validate | data | launch | export | quickstart | speculate | compress |
reproduce | compare."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from slimtrain.trainer.errors import SlimtrainError

REPO_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def cmd_validate(args: argparse.Namespace) -> int:
    from slimtrain.trainer.recipe.schema import load_recipe

    if args.reference:
        from slimtrain.trainer.recipe.reference import recipe_reference

        print(recipe_reference(), end="")
        return 0
    if not args.recipe:
        raise SlimtrainError("validate needs a RECIPE path (or --reference)")
    from slimtrain.trainer.recipe.loading import dump_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if not args.world_size:  # the world a plain `slimtrain train` starts; --world-size checks another
        recipe.check_world(recipe.run.local_procs)
    else:
        from slimtrain.trainer.backends import BACKENDS

        gas = recipe.check_world(args.world_size)
        print(f"# world size {args.world_size}: {gas} micro-batches per rank per step", file=sys.stderr)
        memory = BACKENDS.get(recipe.backend.type).memory
        try:
            text = (memory(recipe, args.world_size, args.gpu_memory) if memory is not None
                    else f"memory estimate: backend {recipe.backend.type!r} has none")
        except SlimtrainError as e:  # the recipe is still valid: only the estimate needs the vocabulary size
            text = f"memory estimate skipped: {e}"
        print("# " + text.replace("\n", "\n# "), file=sys.stderr)
    print(dump_recipe(recipe), end="")
    print(f"ok: {args.recipe} is a valid recipe", file=sys.stderr)
    return 0


def _end_rank(rc: int) -> NoReturn:
    """A rank a launcher started ends here once it returned: the exit handlers run (they end the helper processes it
    started, which would otherwise hold its output open), then the process exits without the C++ teardown that
    follows, where native threads (DeepSpeed's CPU communication op) can abort it ("terminate called without an
    active exception", a rare 2-rank failure of a run that had finished and saved everything)."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _under_launcher(nproc: int | None = None) -> bool:
    """Whether a launcher (torchrun, srun) started this process as one rank of its job.

    A SLURM step of one task (an interactive `srun --pty bash`, or a script's `srun slimtrain ...`) with an
    explicit `--nproc N` is a machine to start N local ranks on, as outside SLURM.
    """
    from slimtrain.trainer.env.distributed import resolve_dist_env

    env = resolve_dist_env()
    if env.source == "single" or not nproc or nproc == 1:
        return env.source != "single"
    if env.source == "slurm" and env.world_size == 1:
        return False
    raise SlimtrainError(f"--nproc {nproc}: this process is already rank {env.rank} of {env.world_size} started by "
                         f"{env.source}; drop --nproc (each task of the launcher is one rank)")


def cmd_train(args: argparse.Namespace) -> int:
    from slimtrain.trainer.recipe.schema import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if _under_launcher(args.nproc):
        _end_rank(train_worker(recipe))
    nproc = args.nproc or recipe.run.local_procs
    _check_before_launch(recipe, nproc)  # fail before any process starts, writing nothing
    from slimtrain.trainer.lifecycle.run_lock import hold_run_dir

    # This process holds the run directory for the run's life; the ranks it starts end with it (env/lifeline.py).
    with hold_run_dir(Path(recipe.run.resolved_output_dir)):
        if nproc == 1:
            return train_worker(recipe, holds_run_dir=True)
        from slimtrain.data import prepare

        prepared = prepare(recipe.data, progress=True)  # once, before the ranks start
        if recipe.checkpoint.init_from_hf and recipe.model.vocab_size is None:
            _check_init_from_hf(recipe, prepared.tokenizer.vocab_size)  # the tokenizer's size is known now
        return _spawn_local(nproc, args)


def _check_before_launch(recipe, nproc: int) -> None:
    """Everything that can be checked before a process starts: the world, the checkpoint it would resume or branch
    from, the HF directory it would start from, that the model can be exported, that the data inputs exist."""
    from slimtrain.data import check_inputs
    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.trainer.export.hf import check_exportable

    recipe.check_world(nproc)
    _check_resume(recipe, nproc)
    check_inputs(recipe.data)
    if recipe.checkpoint.init_from_hf:
        _check_init_from_hf(recipe, recipe.model.vocab_size)
        _check_tokenizer_fits_checkpoint(recipe)
    why_not = check_exportable(recipe.model, PluginStack.from_configs(recipe.plugins))
    if why_not:
        print(f"note: this model will not be exportable to Hugging Face format ({why_not}); training goes on",
              file=sys.stderr)


def _check_init_from_hf(recipe, vocab_size: int | None) -> None:
    from slimtrain.modules.plugin_stack import PluginStack
    from slimtrain.trainer.export.importer import check_init_from_hf

    model = recipe.model.model_copy(update={"vocab_size": vocab_size})
    check_init_from_hf(Path(recipe.checkpoint.init_from_hf), model, PluginStack.from_configs(recipe.plugins))


def _check_tokenizer_fits_checkpoint(recipe) -> None:
    """Every token id of the recipe's tokenizer has a row in the embedding of `checkpoint.init_from_hf` (a
    checkpoint may have more rows than tokens: Qwen pads 151,665 tokens to 151,936 rows; those rows stay and are
    exported). Skipped when the directory is not visible here: the import checks the shapes at the job's start."""
    import json

    from slimtrain.trainer.errors import RecipeError

    hf_dir = Path(recipe.checkpoint.init_from_hf).expanduser()
    config = hf_dir / "config.json"
    if not config.is_file():
        return
    rows = recipe.model.vocab_size or json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
    if not isinstance(rows, int):
        return  # check_init_from_hf has refused a config.json without vocab_size already
    where, size = _tokenizer_size(recipe.data.tokenizer)
    if size > rows:
        raise RecipeError(
            f"{where} gives {size} tokens but checkpoint.init_from_hf={str(hf_dir)!r} has {rows} embedding rows: "
            f"ids {rows}..{size - 1} would have no embedding. Use the checkpoint's own tokenizer "
            f"(data.tokenizer.path: {str(hf_dir)!r}) or one of at most {rows} tokens")
    if recipe.model.vocab_size is None and size != rows:
        # A null vocab_size takes the tokenizer's size, whose embedding would not be the checkpoint's.
        raise RecipeError(
            f"model.vocab_size is null, so the model would get the tokenizer's {size} rows ({where}), but "
            f"checkpoint.init_from_hf={str(hf_dir)!r} has {rows}; set model.vocab_size={rows} (a tokenizer smaller "
            "than the embedding is fine)")


def _tokenizer_size(tokenizer) -> tuple[str, int]:
    """(the recipe field, the number of ids) of `data.tokenizer`: a local tokenizer's size, or the trained BPE's."""
    if tokenizer.path is not None:
        from slimtrain.data.tokenizer import tokenizer_size

        return f"data.tokenizer.path={str(tokenizer.path)!r}", tokenizer_size(tokenizer.path)
    return "data.tokenizer.train.vocab_size", tokenizer.train.vocab_size


def _check_resume(recipe, world_size: int) -> None:
    """The checkpoint a run would resume (or branch) from must suit the recipe (checked again at load)."""
    from slimtrain.trainer.lifecycle.branch import check_fresh_start, check_resume, resume_mode
    from slimtrain.trainer.lifecycle.checkpoint import find_resume_point

    check_fresh_start(recipe)
    path = None
    if resume_mode(recipe) != "never":
        path = find_resume_point(Path(recipe.run.resolved_output_dir) / "checkpoints")
        if path is not None:
            check_resume(recipe, path)
    if path is None and recipe.checkpoint.branch_from:
        from slimtrain.trainer.lifecycle.branch import check_branch, resolve_branch_source

        path = resolve_branch_source(recipe.checkpoint.branch_from)
        check_branch(recipe, path)
    if path is not None:
        from slimtrain.trainer.backends import BACKENDS

        BACKENDS.get(recipe.backend.type).check_resumable(recipe, path, world_size)


def train_worker(recipe, holds_run_dir: bool = False) -> int:
    """One rank: initialise torch.distributed, build the parts, run the loop. Rank 0 holds the run directory
    unless the `slimtrain train` that started it does (`holds_run_dir`, or SLIMTRAIN_LAUNCHER_PID)."""
    from slimtrain.trainer.lifecycle import signals

    signals.install()  # as early as possible: a preemption warning may arrive during start-up
    from slimtrain.trainer.env.distributed import resolve_dist_env
    from slimtrain.trainer.env.lifeline import LAUNCHER_PID, tie_rank_to_launcher

    env = resolve_dist_env()
    if env.source != "single":
        tie_rank_to_launcher()
    if holds_run_dir or os.environ.get(LAUNCHER_PID) or env.rank != 0:
        return _train_rank(recipe)
    from slimtrain.trainer.lifecycle.run_lock import hold_run_dir, wait_for_requeue

    with hold_run_dir(Path(recipe.run.resolved_output_dir), wait_s=wait_for_requeue()):
        return _train_rank(recipe)


def _train_rank(recipe) -> int:
    from slimtrain.trainer.backends import BACKENDS

    BACKENDS.get(recipe.backend.type).prepare_process()
    from slimtrain.trainer.env.distributed import init_distributed
    from slimtrain.trainer.lifecycle.loop import Trainer
    from slimtrain.trainer.recipe.loading import dump_recipe
    from slimtrain.trainer.lifecycle.run import build_parts, set_cpu_threads, write_run_files

    import torch

    backend = recipe.backend.dist_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    env = init_distributed(backend)
    set_cpu_threads(env.local_world_size)
    parts = build_parts(recipe)
    if env.rank == 0:  # after the build: a start that fails there leaves no run directory
        run_dir = write_run_files(recipe, dump_recipe(recipe))
        from slimtrain.trainer.reproduce.fingerprints import write_environment

        write_environment(run_dir, env.world_size)  # what `slimtrain reproduce` reports beside a mismatch
    Trainer(recipe, parts).run()
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    return 0


def _spawn_local(nproc: int, args: argparse.Namespace) -> int:
    """Start `nproc` ranks on this machine with torchrun; SIGTERM/SIGUSR1 are forwarded to them. torchrun's agent
    starts every rank in a session of its own, so signals to this process group never reach them: the agent and
    the ranks instead end when this process does, however it ends (env/lifeline.py)."""
    from slimtrain.trainer.env.lifeline import LAUNCHER_PID, agent_command
    from slimtrain.trainer.lifecycle.run import threads_per_rank

    cmd = agent_command(["torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                         "-m", "slimtrain.trainer.cli", "train", args.recipe, *args.overrides])
    # Setting OMP_NUM_THREADS ourselves (cores shared between the local ranks) also keeps torchrun quiet.
    env = dict(os.environ, SLIMTRAIN_LOCAL_LAUNCH="1", **{LAUNCHER_PID: str(os.getpid())})
    env.setdefault("OMP_NUM_THREADS", str(threads_per_rank(nproc)))
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame) -> None:
        # torchrun itself dies on SIGUSR1; deliver the signal straight to the worker processes.
        _signal_tree(proc.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)
    return proc.wait()


def _signal_tree(pid: int, signum: int) -> None:
    """Send `signum` to the worker processes (children of the torchrun agent), or the agent itself."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    for kid in kids or [str(pid)]:
        try:
            os.kill(int(kid), signum)
        except ProcessLookupError:
            pass


def cmd_export(args: argparse.Namespace) -> int:
    from slimtrain.trainer.export.consolidate import load_checkpoint_for_export
    from slimtrain.trainer.export.hf import check_export_args, write_export

    check_export_args(Path(args.out), args.dtype, args.overwrite)  # before the (slow) read of the checkpoint
    ckpt = load_checkpoint_for_export(Path(args.checkpoint))  # read and validated once, for the writer and --verify
    out = write_export(ckpt, Path(args.out), dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {out}")
    if args.verify:
        from slimtrain.trainer.export.verify import TOLERANCE, verify_export

        diff = verify_export(out, ckpt, dtype=args.dtype)
        verdict = "ok" if diff <= TOLERANCE else "MISMATCH"
        print(f"verify: transformers vs slimtrain (trained model, plugins applied) max |logit diff| = {diff:.2e} "
              f"({verdict})")
        if verdict != "ok":
            print(_mismatch_hint(args.dtype, ckpt), file=sys.stderr)
        return 0 if verdict == "ok" else 1
    return 0


def _mismatch_hint(dtype: str, ckpt) -> str:
    """What a failed --verify can mean, so that a rounding or a plugin the plain directory cannot express is
    not taken for a broken export."""
    hints = []
    if dtype != "fp32":
        hints.append(f"--dtype {dtype} rounds weights that a plugin computed in fp32 (e.g. QAT's dequantized "
                     "weights with fp32 scales); export with --dtype fp32 to tell rounding from a wrong mapping")
    if ckpt.recipe.plugins:
        hints.append("the plain directory holds what transformers can compute: a plugin's behaviour it cannot "
                     "express (QAT activation quantization, fake-quant before start_step) is in its variant "
                     "directories instead (docs/export.md)")
    return "verify: " + "; ".join(hints or ["the export does not compute what the checkpoint does; please report it"])


def cmd_quickstart(args: argparse.Namespace) -> int:
    from slimtrain.trainer.quickstart import run_quickstart

    return run_quickstart(REPO_RECIPES / "quickstart.yaml", args.overrides)


def _positive(text: str) -> int:
    """argparse type: a whole number of processes or ranks, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a recipe (resumes from the run's latest checkpoint)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=20")
    p.add_argument("--nproc", type=_positive, default=None, help="local processes (default: run.local_procs)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="validate a recipe and print it resolved")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--reference", action="store_true", help="print the recipe reference (every key) instead")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--world-size", type=_positive, default=None,
                   help="also check the batch geometry for N ranks and estimate the memory per GPU")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU the estimate is held against")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("export", help="write a Hugging Face checkpoint from a slimtrain checkpoint")
    p.add_argument("checkpoint", help="a step directory, or a run directory (its newest complete checkpoint)")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--verify", action="store_true",
                   help="load the export with transformers and compare its logits with the trained model's "
                        "(every plugin applied), fp32, max abs diff <= 1e-4")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quickstart", help="train the quickstart recipe on the Python standard library")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_quickstart)

    from slimtrain.trainer.compress import add_compress_parser
    from slimtrain.trainer.speculate import add_speculate

    from slimtrain.trainer.random_checkpoint import add_parser as add_make_checkpoint

    add_speculate(sub)
    add_compress_parser(sub)
    add_make_checkpoint(sub)
    from slimtrain.trainer.reproduce.command import add_reproduce_commands

    add_reproduce_commands(sub)
    _add_plugin_commands(sub)
    return parser


def _load_data_config(path: str, overrides: list[str]):
    from slimtrain.trainer.recipe.schema import load_recipe

    return load_recipe(path, overrides).data


def _add_plugin_commands(sub) -> None:
    import importlib.util

    if importlib.util.find_spec("slimtrain.data.cli") is not None:
        from slimtrain.data.cli import add_commands as add_data

        data = sub.add_parser("data", help="tokenizer training and token-shard preparation")
        add_data(data.add_subparsers(dest="data_command", required=True), _load_data_config)
    launch = sub.add_parser("launch", help="submit a recipe to a cluster scheduler")
    from slimtrain.trainer.launch.slurm import add_commands as add_launch

    add_launch(launch.add_subparsers(dest="launch_command", required=True))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`train R --nproc 2 a.b=c`): argparse leaves those in `extra`.
    stray = [x for x in extra if "=" not in x or x.startswith("-")]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except SlimtrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # the data package's errors are ValueErrors with a user-facing message
        if type(exc).__module__.startswith("slimtrain"):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
