"""The plan of a comparison sweep: its options, checked, and the runs they ask for.

:func:`plan_sweep` turns the command line of ``python -m recipes.compare`` into a
:class:`SweepPlan` before anything runs: the recipe, the optimizers and seeds, each optimizer's
preset learning rate (read from the recipe's own configuration, built by the recipe's parser),
the LR grid if ``--lr-search``, and the options every run shares. A bad option is one
``ValueError`` naming it.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import recipes
from optim_callbacks import OPTIMIZERS, SCHEDULE_FREE
from optim_callbacks.validation import check_at_least, check_choice, check_in_range
from recipes.sweep.lr_presets import (
    DEFAULT_LR_GRID,
    LearningRate,
    lr_grid,
    parse_lr_overrides,
    preset_lrs,
)

__all__ = [
    "PROG",
    "PlannedRun",
    "SweepPlan",
    "available_recipes",
    "check_recipe_args",
    "parse_grid",
    "parse_optimizers",
    "plan_sweep",
    "recipe_configuration",
]

PROG = "python -m recipes.compare"
# Recipe options the sweep sets per run, and what to use instead.
SWEEP_OWNED_OPTIONS = {
    "--optimizer": "--optimizers",
    "--lr": "--lrs NAME=LR or --lr-search",
    "--seed_everything": "--seeds and --first-seed",
    "--trainer.default_root_dir": "--out",
    "--ckpt_path": "nothing (running the same command again resumes the sweep)",
}


def available_recipes() -> list[str]:
    """The recipe modules (``recipes/*_finetune.py``)."""
    return sorted(
        module.name
        for module in pkgutil.iter_modules(recipes.__path__)
        if module.name.endswith("_finetune")
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="Every other option is passed to the recipe (see python -m recipes.<recipe> --help).",
        allow_abbrev=False,  # --lr must not be taken for --lr-search
    )
    parser.add_argument("--recipe", required=True, help=f"one of: {', '.join(available_recipes())}")
    parser.add_argument(
        "--optimizers",
        required=True,
        help=f"comma-separated optimizer names; any of: {', '.join(OPTIMIZERS.names())}",
    )
    parser.add_argument("--seeds", type=int, default=1, help="runs per optimizer (default 1)")
    parser.add_argument("--first-seed", type=int, default=42, help="seeds are first, first+1, ...")
    parser.add_argument(
        "--lrs", default=None, help="learning rates that replace presets: adamw=1e-4,sgd=0.05"
    )
    parser.add_argument(
        "--lr-search", action="store_true", help="pick each LR from a grid around its preset"
    )
    parser.add_argument(
        "--lr-grid",
        default=",".join(f"{f:g}" for f in DEFAULT_LR_GRID),
        help="factors of the preset LR tried by --lr-search (default %(default)s)",
    )
    parser.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="validation accuracy for 'steps to target' (default: 95%% of the best any run reached)",
    )
    parser.add_argument(
        "--validations-per-epoch", type=int, default=4, help="(default %(default)s)"
    )
    parser.add_argument(
        "--moment-every",
        type=int,
        default=10,
        help="moment statistics every N steps (default %(default)s)",
    )
    parser.add_argument("--out", default=None, help="sweep folder (default reports/<recipe>)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun runs that failed before")
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="keep each run's checkpoints"
    )
    return parser


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: an optimizer at a learning rate with a seed."""

    optimizer: str
    lr: LearningRate
    seed: int
    role: str  # "compare" or "lr-search"

    @property
    def key(self) -> str:
        return f"{self.optimizer}-lr{self.lr.value:g}-seed{self.seed}"

    def recipe_args(self, common: Sequence[str]) -> list[str]:
        """The options of this run (besides its folder, ``--trainer.default_root_dir``)."""
        # A schedule-free optimizer replaces the schedule: its runs use the constant one (the
        # recipe's warmup still applies), which the recipes require for it.
        schedule = ("--scheduler", "constant") if self.optimizer in SCHEDULE_FREE else ()
        return [
            *common,
            *("--optimizer", self.optimizer, "--lr", repr(self.lr.value)),
            *schedule,
            *("--seed_everything", str(self.seed)),
        ]


def _option_name(token: str) -> str:
    return token.split("=", 1)[0]


def check_recipe_args(recipe_args: Sequence[str]) -> None:
    """Reject the recipe options the sweep sets itself, naming what to use instead."""
    for token in recipe_args:
        name = _option_name(token)
        if name in SWEEP_OWNED_OPTIONS:
            raise ValueError(
                f"{name.lstrip('-')}: got {token!r}; the sweep sets it for each run; allowed: "
                f"{SWEEP_OWNED_OPTIONS[name]}"
            )


def parse_optimizers(text: str) -> list[str]:
    known = [*OPTIMIZERS.names(), *OPTIMIZERS.aliases()]
    names = [
        OPTIMIZERS.canonical(check_choice("optimizers", name.strip().lower(), known))
        for name in text.split(",")
        if name.strip()
    ]
    if not names:
        raise ValueError(
            f"optimizers: got {text!r}; allowed: comma-separated names such as adamw,sgd"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"optimizers: got {text!r}, which names {', '.join(repeated)} twice; allowed: each once"
        )
    return names


def parse_grid(text: str) -> list[float]:
    try:
        factors = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        factors = []
    if not factors or any(not f > 0 for f in factors):
        raise ValueError(
            f"lr-grid: got {text!r}; allowed: comma-separated numbers > 0 such as 0.3,1,3"
        )
    return factors


def recipe_configuration(recipe: str, args: Sequence[str]) -> Any:
    """The recipe's configuration for ``args``, parsed and checked by the recipe's own parser
    (what its ``--print_config`` shows): the optimizer and LR its config files and defaults give,
    before the sweep changes them."""
    return importlib.import_module(f"recipes.{recipe}").RECIPE.configuration(args)


@dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep will do, decided before its first run."""

    recipe: str
    folder: Path
    common_args: list[str]  # every run's recipe options (the sweep's defaults, then the user's)
    recipe_args: list[str]  # the user's recipe options alone
    optimizers: list[str]
    presets: dict[str, LearningRate]
    seeds: list[int]
    lr_grid_factors: list[float] | None  # None: no LR search
    target_accuracy: float | None
    retry_failed: bool
    keep_checkpoints: bool
    command: str

    @property
    def total_runs(self) -> int:
        """Runs of the whole sweep: per optimizer, its LR grid (or one run) plus one per extra seed."""
        first_seed_runs = {
            name: len(lr_grid(self.presets[name].value, self.lr_grid_factors))
            if self.lr_grid_factors
            else 1
            for name in self.optimizers
        }
        return sum(runs + len(self.seeds) - 1 for runs in first_seed_runs.values())


def plan_sweep(argv: Sequence[str]) -> SweepPlan:
    """Parse and check the sweep's command line (``argv`` without the program name)."""
    options, recipe_args = _parser().parse_known_args(list(argv))
    check_choice("recipe", options.recipe, available_recipes())
    optimizers = parse_optimizers(options.optimizers)
    check_at_least("seeds", options.seeds, 1)
    check_at_least("validations-per-epoch", options.validations_per_epoch, 1)
    check_at_least("moment-every", options.moment_every, 1)
    if options.target_accuracy is not None:
        check_in_range(
            "target-accuracy",
            options.target_accuracy,
            0.0,
            1.0,
            low_inclusive=False,
            high_inclusive=True,
        )
    overrides = parse_lr_overrides(options.lrs)
    grid_factors = parse_grid(options.lr_grid)
    check_recipe_args(recipe_args)

    sweep_defaults = ["--moment_stats.every_n_steps", str(options.moment_every)]
    if options.validations_per_epoch > 1:
        sweep_defaults += [
            "--trainer.val_check_interval",
            repr(1.0 / options.validations_per_epoch),
        ]
    common = [*sweep_defaults, *recipe_args]  # the user's options come last and win
    config = recipe_configuration(options.recipe, common)
    return SweepPlan(
        recipe=options.recipe,
        folder=Path(options.out or Path("reports") / options.recipe),
        common_args=common,
        recipe_args=list(recipe_args),
        optimizers=optimizers,
        presets=preset_lrs(optimizers, config.optimizer, config.lr, overrides),
        seeds=[options.first_seed + i for i in range(options.seeds)],
        lr_grid_factors=grid_factors if options.lr_search else None,
        target_accuracy=options.target_accuracy,
        retry_failed=options.retry_failed,
        keep_checkpoints=options.keep_checkpoints,
        command=shlex.join([*PROG.split(), *argv]),
    )
