"""``slimtrain launch``: start a run on a cluster scheduler (SLURM today)."""

from __future__ import annotations

import argparse

from slimtrain.trainer.launch import slurm


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``launch slurm ...`` on the `slimtrain` CLI; each leaf sets ``func(args) -> int``."""
    launch = subparsers.add_parser("launch", help="launch a run on a cluster (SLURM)")
    targets = launch.add_subparsers(dest="launch_target", metavar="TARGET", required=True)
    slurm.add_commands(targets)
