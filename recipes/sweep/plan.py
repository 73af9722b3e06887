"""The plan of a comparison sweep: its options, checked, and the trials they ask for.

:func:`plan_sweep` turns the command line of ``python -m recipes.compare`` into a
:class:`SweepPlan` before anything runs: the recipe, the optimizers and seeds, each optimizer's
preset learning rate (read from the recipe's own configuration, built by the recipe's parser),
the LRs its search tries, the options every run shares, and how the sweep runs (storage, study,
workers, pruner). A bad option is one ``ValueError`` naming it.

The trials (:class:`PlannedTrial`), in the order they are queued: for each optimizer its LR
search (or one run at its preset) with the first seed, then each further seed of each optimizer
at the LR its search chose (known only once that search has finished), or at its preset.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import recipes
from optim_callbacks import OPTIMIZERS, SCHEDULE_FREE
from optim_callbacks.validation import check_at_least, check_choice, check_in_range
from recipes.sweep.lr_presets import (
    DEFAULT_LR_RANGE,
    DEFAULT_LR_TRIALS,
    LearningRate,
    lr_bounds,
    lr_grid,
    parse_lr_overrides,
    preset_lrs,
    sampled_lrs,
)
from recipes.sweep.storage import masked_url, storage_url

__all__ = [
    "PROG",
    "PRUNERS",
    "PlannedTrial",
    "SweepPlan",
    "WorkerOptions",
    "available_recipes",
    "check_recipe_args",
    "parse_grid",
    "parse_optimizers",
    "plan_sweep",
    "planned_trials",
    "recipe_configuration",
]

PROG = "python -m recipes.compare"
PRUNERS = ("median", "halving", "none")
# Recipe options the sweep sets per run, and what to use instead.
SWEEP_OWNED_OPTIONS = {
    "--optimizer": "--optimizers",
    "--lr": "--lrs NAME=LR, --lr-search or --lr-trials",
    "--seed_everything": "--seeds and --first-seed",
    "--trainer.default_root_dir": "--out",
    "--ckpt_path": "nothing (running the same command again resumes the sweep)",
}
# What --join takes besides the study's own settings.
JOIN_OPTIONS = (
    "--join",
    "--storage",
    "--study",
    "--out",
    "--workers",
    "--threads",
    "--heartbeat",
    "--keep-checkpoints",
    "--retry-failed",
)


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
    add = parser.add_argument
    add("--recipe", default=None, help=f"one of: {', '.join(available_recipes())}")
    add(
        "--optimizers",
        default=None,
        help=f"comma-separated optimizer names; any of: {', '.join(OPTIMIZERS.names())}",
    )
    add("--seeds", type=int, default=1, help="runs per optimizer (default 1)")
    add("--first-seed", type=int, default=42, help="seeds are first, first+1, ...")
    add("--lrs", default=None, help="learning rates that replace presets: adamw=1e-4,sgd=0.05")
    add(
        "--lr-search",
        action="store_true",
        help=f"search each LR around its preset ({DEFAULT_LR_TRIALS} trials unless --lr-trials)",
    )
    add("--lr-trials", type=int, default=None, help="LR search: trials per optimizer (>= 2)")
    add(
        "--lr-range",
        type=float,
        default=DEFAULT_LR_RANGE,
        help="LR search: log-uniform in [preset / R, preset * R] (default %(default)g)",
    )
    add("--lr-grid", default=None, help="LR search: these factors of the preset instead: 0.3,1,3")
    add("--sampler-seed", type=int, default=0, help="seed of the LR sampler (default 0)")
    add(
        "--pruner",
        default="median",
        help="stops hopeless LR-search runs: median, halving or none (default %(default)s)",
    )
    add(
        "--target-accuracy",
        type=float,
        default=None,
        help="validation accuracy for 'steps to target' (default: 95%% of the best any run reached)",
    )
    add("--validations-per-epoch", type=int, default=4, help="(default %(default)s)")
    add(
        "--moment-every",
        type=int,
        default=10,
        help="moment statistics every N steps (default %(default)s)",
    )
    add("--out", default=None, help="sweep folder (default reports/<recipe>)")
    add(
        "--storage",
        default=None,
        help="Optuna storage URL (default: sqlite:///<out>/study.db); "
        "postgresql+psycopg://user@host/db for workers on several machines",
    )
    add("--study", default=None, help="study name (default: the --out folder's name)")
    add("--workers", type=int, default=1, help="trials run at once on this machine (default 1)")
    add(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: $OMP_NUM_THREADS, else CPU cores / workers)",
    )
    add(
        "--heartbeat",
        type=int,
        default=10,
        help="seconds between a worker's heartbeats; a trial silent for 3 of them is taken "
        "over (default %(default)s)",
    )
    add("--join", action="store_true", help="work on the study's own sweep (another machine)")
    add("--retry-failed", action="store_true", help="rerun runs that failed before")
    add("--keep-checkpoints", action="store_true", help="keep each run's checkpoints")
    return parser


@dataclass(frozen=True)
class PlannedTrial:
    """One run of the sweep: an optimizer with a seed, at a learning rate (``None``: the LR
    the optimizer's search chooses, known once the search has finished)."""

    optimizer: str
    lr: float | None
    seed: int
    role: str  # "lr-search" or "compare"

    @property
    def key(self) -> str:
        if self.lr is None:
            return f"{self.optimizer}-seed{self.seed}"
        return f"{self.optimizer}-lr{self.lr:g}-seed{self.seed}"

    def as_attrs(self) -> dict[str, Any]:
        return {"key": self.key, "optimizer": self.optimizer, "seed": self.seed, "role": self.role}


def run_args(common: Sequence[str], optimizer: str, lr: float, seed: int) -> list[str]:
    """The recipe options of one run (besides its folder, ``--trainer.default_root_dir``)."""
    # A schedule-free optimizer replaces the schedule: its runs use the constant one (the
    # recipe's warmup still applies), which the recipes require for it.
    schedule = ("--scheduler", "constant") if optimizer in SCHEDULE_FREE else ()
    return [
        *common,
        *("--optimizer", optimizer, "--lr", repr(lr)),
        *schedule,
        *("--seed_everything", str(seed)),
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
class WorkerOptions:
    """How this process works on a study: where, under which name, with how many workers."""

    folder: Path
    storage: str = field(repr=False)  # the full URL, password included: never shown or stored
    study: str
    workers: int
    threads: int
    heartbeat: int
    keep_checkpoints: bool
    retry_failed: bool

    @property
    def shown_storage(self) -> str:
        return masked_url(self.storage)


@dataclass(frozen=True)
class SweepPlan:
    """Everything a sweep will do, decided before its first run (``None`` with ``--join``:
    the study's settings are read from the storage)."""

    recipe: str
    common_args: list[str]  # every run's recipe options (the sweep's defaults, then the user's)
    recipe_args: list[str]  # the user's recipe options alone
    optimizers: list[str]
    presets: dict[str, LearningRate]
    seeds: list[int]
    search: dict[str, dict[str, Any]]  # optimizer -> {"lrs", "low", "high", "kind"}; {}: none
    pruner: str
    target_accuracy: float | None
    command: str  # the password of the storage URL masked
    trials: list[PlannedTrial] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        """What the study keeps of the sweep (JSON): another command with other recipe options
        is refused, a worker that joins reads the rest."""
        return {
            "recipe": self.recipe,
            "common_args": self.common_args,
            "recipe_args": self.recipe_args,
            "optimizers": self.optimizers,
            "presets": {k: {"value": v.value, "source": v.source} for k, v in self.presets.items()},
            "seeds": self.seeds,
            "search": self.search,
            "pruner": self.pruner,
            "target_accuracy": self.target_accuracy,
            "command": self.command,
        }


def planned_trials(
    optimizers: Sequence[str],
    presets: dict[str, LearningRate],
    seeds: Sequence[int],
    search: dict[str, dict[str, Any]],
) -> list[PlannedTrial]:
    """The sweep's trials in queue order (see the module docstring)."""
    trials = []
    for name in optimizers:
        if name in search:
            trials += [PlannedTrial(name, lr, seeds[0], "lr-search") for lr in search[name]["lrs"]]
        else:
            trials.append(PlannedTrial(name, presets[name].value, seeds[0], "compare"))
    for seed in seeds[1:]:
        for name in optimizers:
            lr = None if name in search else presets[name].value
            trials.append(PlannedTrial(name, lr, seed, "compare"))
    return trials


def _worker_options(options: argparse.Namespace, folder: Path) -> WorkerOptions:
    check_at_least("workers", options.workers, 1)
    check_at_least("heartbeat", options.heartbeat, 1)
    if options.threads is not None:
        check_at_least("threads", options.threads, 1)
        threads = options.threads
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]):
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        threads = max(1, (os.cpu_count() or 1) // options.workers)
    return WorkerOptions(
        folder=folder,
        storage=storage_url(options.storage, folder),
        study=options.study or folder.resolve().name,
        workers=options.workers,
        threads=threads,
        heartbeat=options.heartbeat,
        keep_checkpoints=options.keep_checkpoints,
        retry_failed=options.retry_failed,
    )


def _masked_command(argv: Sequence[str]) -> str:
    tokens = list(argv)
    for index, token in enumerate(tokens):
        if token == "--storage" and index + 1 < len(tokens):
            tokens[index + 1] = masked_url(tokens[index + 1])
        elif token.startswith("--storage="):
            tokens[index] = "--storage=" + masked_url(token.split("=", 1)[1])
    return shlex.join([*PROG.split(), *tokens])


def plan_sweep(argv: Sequence[str]) -> tuple[SweepPlan | None, WorkerOptions]:
    """Parse and check the sweep's command line (``argv`` without the program name): the plan
    (``None`` with ``--join``) and how this process works on it."""
    options, recipe_args = _parser().parse_known_args(list(argv))
    check_choice("pruner", options.pruner, PRUNERS)
    if options.join:
        given = [_option_name(t) for t in argv if t.startswith("--")]
        extra = [t for t in given if t not in JOIN_OPTIONS]
        if extra:
            raise ValueError(
                f"join: got {extra[0]}; a worker that joins runs the study's own sweep; "
                f"allowed with --join: {', '.join(JOIN_OPTIONS[1:])}"
            )
        if options.out is None:
            raise ValueError("out: missing; allowed with --join: the sweep's shared run folder")
        return None, _worker_options(options, Path(options.out))
    if options.recipe is None or options.optimizers is None:
        missing = "recipe" if options.recipe is None else "optimizers"
        raise ValueError(f"{missing}: missing; allowed: --{missing} (or --join to join a sweep)")
    check_choice("recipe", options.recipe, available_recipes())
    optimizers = parse_optimizers(options.optimizers)
    check_at_least("seeds", options.seeds, 1)
    check_at_least("validations-per-epoch", options.validations_per_epoch, 1)
    check_at_least("moment-every", options.moment_every, 1)
    if options.lr_trials is not None:
        check_at_least("lr-trials", options.lr_trials, 2)
    if not options.lr_range > 1:
        raise ValueError(f"lr-range: got {options.lr_range:g}; allowed: a number > 1 such as 10")
    if options.lr_trials is not None and options.lr_grid is not None:
        raise ValueError(
            f"lr-grid: got {options.lr_grid!r} with --lr-trials {options.lr_trials}; "
            "allowed: one of the two"
        )
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
    grid_factors = parse_grid(options.lr_grid) if options.lr_grid is not None else None
    check_recipe_args(recipe_args)
    folder = Path(options.out or Path("reports") / options.recipe)
    worker = _worker_options(options, folder)

    sweep_defaults = ["--moment_stats.every_n_steps", str(options.moment_every)]
    if options.validations_per_epoch > 1:
        sweep_defaults += [
            "--trainer.val_check_interval",
            repr(1.0 / options.validations_per_epoch),
        ]
    common = [*sweep_defaults, *recipe_args]  # the user's options come last and win
    config = recipe_configuration(options.recipe, common)
    presets = preset_lrs(optimizers, config.optimizer, config.lr, overrides)
    seeds = [options.first_seed + i for i in range(options.seeds)]
    search: dict[str, dict[str, Any]] = {}
    if options.lr_search or options.lr_trials is not None or grid_factors is not None:
        for name in optimizers:
            preset = presets[name].value
            if grid_factors is not None:
                lrs = lr_grid(preset, grid_factors)
                low, high, kind = lrs[0], lrs[-1], "grid"
            else:
                trials = options.lr_trials or DEFAULT_LR_TRIALS
                lrs = sampled_lrs(name, preset, trials, options.lr_range, options.sampler_seed)
                (low, high), kind = lr_bounds(preset, options.lr_range), "log-uniform"
            search[name] = {"lrs": lrs, "low": low, "high": high, "kind": kind}
    plan = SweepPlan(
        recipe=options.recipe,
        common_args=common,
        recipe_args=list(recipe_args),
        optimizers=optimizers,
        presets=presets,
        seeds=seeds,
        search=search,
        pruner=options.pruner if search else "none",
        target_accuracy=options.target_accuracy,
        command=_masked_command(argv),
        trials=planned_trials(optimizers, presets, seeds, search),
    )
    return plan, worker
