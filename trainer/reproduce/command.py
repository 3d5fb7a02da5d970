"""`slimtrain reproduce RECIPE [overrides] [--nproc N] [--from RUN_DIR]`: train the recipe as `slimtrain train`
would (or read a finished run), check its `expect:` block, print the table, write reproduce.md; exit 1 on a miss."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimtrain.trainer.errors import RecipeError, SlimtrainError

REFERENCE_SUFFIX = ".reference.jsonl.gz"


def reference_path(recipe_path: str, expect) -> Path | None:
    """The reference run's metrics file: `expect.reference` (relative to the recipe file), else
    `<recipe>.reference.jsonl.gz` next to the recipe when it exists. RecipeError when a named one is missing."""
    recipe_file = Path(recipe_path)
    if expect.reference is not None:
        path = Path(expect.reference).expanduser()
        path = path if path.is_absolute() else recipe_file.resolve().parent / path
        if not path.is_file():
            raise RecipeError(f"expect.reference={expect.reference!r}: {path} does not exist; give a reference run's "
                              "metrics.jsonl (or .jsonl.gz) relative to the recipe file")
        return path
    default = recipe_file.with_name(recipe_file.name.rsplit(".", 1)[0] + REFERENCE_SUFFIX)
    if default.is_file():
        return default
    if expect.curves:
        raise RecipeError(f"expect.curves needs a reference run: set expect.reference, or ship the reference run's "
                          f"metrics as {default}")
    return None


def cmd_reproduce(args: argparse.Namespace) -> int:
    from slimtrain.trainer.recipe.schema import load_recipe

    if args.suite:
        from slimtrain.trainer.reproduce.suite import run_suite

        overrides = [args.recipe, *args.overrides] if args.recipe else args.overrides  # no recipe: all overrides
        return run_suite(args.suite, Path(args.suite_out), overrides, only=args.only)
    if args.recipe is None:
        raise RecipeError("reproduce: give a recipe, or --suite smoke|cpu|gpu (recipes/reproduce/suite.yaml)")

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.expect is None:
        raise RecipeError(f"{args.recipe} has no expect: block, so there is nothing to check; add targets "
                          "(docs/reproduce.md), or run `slimtrain train`")
    reference = reference_path(args.recipe, recipe.expect)  # before training: a missing file fails now
    if args.from_run:
        run_dir = Path(args.from_run)
        if not (run_dir / "metrics.jsonl").is_file() and recipe.expect.metric_fields():  # benchmark-only: no metrics
            raise SlimtrainError(f"--from {run_dir}: no metrics.jsonl there; give the directory of a finished run")
    else:
        from slimtrain.trainer import cli

        rc = cli.cmd_train(args)  # the same path as `slimtrain train`, --nproc and launchers included
        if rc or not _main_process(args.nproc):
            return rc
        run_dir = Path(recipe.run.resolved_output_dir)
    return check_run(args.recipe, recipe, run_dir, reference)


def _main_process(nproc: int | None) -> bool:
    """False on the ranks other than 0 of a job a launcher started (each ran `slimtrain reproduce`)."""
    from slimtrain.trainer import cli
    from slimtrain.trainer.env.distributed import resolve_dist_env

    return not cli._under_launcher(nproc) or resolve_dist_env().rank == 0


def check_run(recipe_path: str, recipe, run_dir: Path, reference: Path | None, unreadable: int = 1) -> int:
    """Check `run_dir` against the recipe's targets; print the table, write reproduce.md (and the curve PNG). 0 when
    every target is met, 1 on a miss, `unreadable` when a value could not be read at all (a missing metric, step
    or baseline run: the suite's known misses must not hide one)."""
    from slimtrain.trainer.reproduce.check import check_expect
    from slimtrain.trainer.reproduce.fingerprints import run_fingerprints
    from slimtrain.trainer.reproduce.report import CURVE_FILE, plot_curve, print_table, write_report
    from slimtrain.trainer.reproduce.run_data import RunMetrics, read_records

    expect = recipe.expect
    uses_flops = any(name == "flops" for _, name in expect.metric_fields())
    run = _open_run(run_dir, recipe if uses_flops else None)
    ref = RunMetrics(read_records(reference), str(reference)) if reference is not None else None
    outcomes = check_expect(expect, run, run_dir, ref, lambda other: _open_run(other, _run_recipe(other, uses_flops)))
    print_table(outcomes, f"{recipe_path}: {run_dir}")
    metric = expect.curves[0].metric if expect.curves else "loss"
    curve = plot_curve(run, ref, metric, run_dir / CURVE_FILE) if ref is not None else None
    report = write_report(run_dir, recipe_path, outcomes, run_fingerprints(run_dir, recipe), curve, reference)
    missed = [o for o in outcomes if not o.passed]
    print(f"{len(outcomes) - len(missed)} of {len(outcomes)} targets met; report: {report}")
    if any(o.value is None for o in missed):
        return unreadable
    return 1 if missed else 0


def _open_run(run_dir: Path, recipe=None):
    """A run's metrics (none when only a benchmark wrote into the directory); `flops` derived with `recipe`."""
    from slimtrain.trainer.reproduce.run_data import RunMetrics, flops_per_token_fn

    if not (run_dir / "metrics.jsonl").is_file():
        return RunMetrics([], str(run_dir))
    return RunMetrics.of_run(run_dir, flops_per_token_fn(run_dir, recipe) if recipe is not None else None)


def _run_recipe(run_dir: Path, needed: bool):
    """The recipe a (baseline) run trained with, from its recipe.yaml: its FLOPs per token are its own."""
    from slimtrain.trainer.recipe.schema import load_recipe

    saved = run_dir / "recipe.yaml"
    return load_recipe(str(saved), []) if needed and saved.is_file() else None


def cmd_compare(args: argparse.Namespace) -> int:
    from slimtrain.trainer.reproduce.compare import compare_runs

    compare_runs([Path(r) for r in args.runs], args.metric, Path(args.out) if args.out else None)
    return 0


def add_reproduce_commands(sub) -> None:
    """`reproduce` and `compare` on the `slimtrain` command line."""
    p = sub.add_parser("reproduce", help="train a recipe (or read a finished run) and check its expect: targets")
    p.add_argument("recipe", nargs="?", default=None)
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train (with --suite: of every "
                   "entry's recipe)")
    p.add_argument("--suite", choices=["smoke", "cpu", "gpu"], default=None,
                   help="run the reproduction suite's entries of this tier (recipes/reproduce/suite.yaml)")
    p.add_argument("--suite-out", default="runs/reproduce", help="--suite: the entries' run directories go here")
    p.add_argument("--only", nargs="+", metavar="ENTRY", default=None,
                   help="--suite: run only these entries (the baselines they compare with must be in --suite-out)")
    p.add_argument("--nproc", type=_positive, default=None, help="local processes (default: run.local_procs)")
    p.add_argument("--from", dest="from_run", metavar="RUN_DIR", default=None,
                   help="check this finished run instead of training")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("compare", help="overlaid curves and a table of final figures of several runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--metric", action="append", default=[],
                   help="another metric to plot and tabulate (repeatable; loss and eval_loss always are)")
    p.add_argument("--out", default=None, help="PNG path (default: compare.png in the first run directory)")
    p.set_defaults(func=cmd_compare)


def _positive(text: str) -> int:
    from slimtrain.trainer.cli import _positive as positive

    return positive(text)
