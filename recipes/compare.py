"""Compare optimizers on a recipe: one run per optimizer and seed, then a report.

    python -m recipes.compare --recipe bert_finetune --optimizers adamw,adam,sgd,nesterov
    python -m recipes.compare --recipe bert_finetune --optimizers adamw,sgd --seeds 3 \\
        --trainer.limit_train_batches 50        # any recipe option applies to every run
    python -m recipes.compare --recipe vit_finetune --optimizers adamw,nesterov --lr-search
    python -m recipes.report reports/bert_finetune   # rewrite the report of a sweep folder

Each run is the recipe's own command (``python -m recipes.<recipe> <options> --optimizer NAME
--lr LR --seed_everything SEED``) in a fresh process (:mod:`recipes.compare_run`), one after the
other, all in one W&B group (W&B stays offline without credentials, as in the recipes). The
learning rate of each optimizer is its preset (:mod:`recipes.compare_lr`: the recipe's LR scaled
by rules of thumb; ``--lrs`` sets any), or with ``--lr-search`` the best of a small grid around
the preset on the first seed's validation accuracy. Unless the options say otherwise, every run
validates ``--validations-per-epoch`` times per epoch (for the curves and "steps to target") and
logs moment statistics every ``--moment-every`` steps.

The sweep folder (``--out``, default ``reports/<recipe>``) holds ``sweep.json``, one folder per
run under ``runs/`` (its options, output, W&B files, ``result.json`` once finished) and the
report (:mod:`recipes.report`: ``report.md``, ``results.json``, PNG plots), whose table is also
printed. Running the same command again resumes an interrupted sweep: finished runs are not
rerun, an unfinished one starts again, a failed one is kept unless ``--retry-failed``; more
optimizers or seeds extend the sweep. A run's checkpoints are deleted once it has finished
(``--keep-checkpoints`` keeps them).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import pkgutil
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import recipes
from optim_callbacks import OPTIMIZERS
from optim_callbacks.validation import check_at_least, check_choice, check_in_range
from recipes.compare_lr import (
    DEFAULT_LR_GRID,
    LearningRate,
    choose_lr,
    lr_grid,
    parse_lr_overrides,
    preset_lrs,
)
from recipes.compare_run import read_json, write_json
from recipes.report import write_report

__all__ = ["PlannedRun", "Sweep", "available_recipes", "main", "run_sweep"]

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
        return [
            *common,
            *("--optimizer", self.optimizer, "--lr", repr(self.lr.value)),
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


def resolve_recipe_config(recipe: str, args: Sequence[str]) -> dict[str, Any]:
    """The recipe's full configuration for ``args`` (its ``--print_config``), parsed: the
    optimizer and LR its config files and defaults give, before the sweep changes them."""
    module = importlib.import_module(f"recipes.{recipe}")
    printed = io.StringIO()
    argv = sys.argv
    sys.argv = [f"recipes.{recipe}"]  # LightningCLI warns when sys.argv holds other options
    try:
        with contextlib.redirect_stdout(printed):
            module.run([*args, "--print_config"])
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise SystemExit(2) from None  # the recipe's parser printed the usage error
    finally:
        sys.argv = argv
    return yaml.safe_load(printed.getvalue())


def previous_sweep(folder: Path, recipe: str, common_args: Sequence[str]) -> dict[str, Any] | None:
    """The settings of the sweep ``folder`` already holds (``None`` if none); an error if it
    ran another recipe or other recipe options, whose runs a report must not mix."""
    previous = read_json(folder / "sweep.json")
    if previous is not None and (previous["recipe"], previous["common_args"]) != (
        recipe,
        list(common_args),
    ):
        raise ValueError(
            f"out: {str(folder)!r} holds a sweep of {previous['recipe']} with the options "
            f"{shlex.join(previous['common_args'])!r}; allowed: the same recipe and options, "
            "or another --out"
        )
    return previous


class Sweep:
    """The sweep folder: its settings, its runs (started, reused or rerun) and its plan."""

    def __init__(
        self,
        folder: Path,
        recipe: str,
        common_args: Sequence[str],
        settings: dict[str, Any],
        previous: dict[str, Any] | None = None,
    ) -> None:
        self.folder = folder
        self.recipe = recipe
        self.common_args = list(common_args)
        self.state: dict[str, Any] = {
            "group": f"{recipe}-compare-{time.strftime('%Y%m%d-%H%M%S')}",
            **(previous or {}),
            **settings,
            "recipe": recipe,
            "common_args": self.common_args,
            "main_runs": [],
            "lrs": {},
            "lr_search": {},
        }
        self.save()

    def save(self) -> None:
        write_json(self.folder / "sweep.json", self.state)

    def run_dir(self, run: PlannedRun) -> Path:
        return self.folder / "runs" / run.key

    def execute(
        self, run: PlannedRun, position: str, retry_failed: bool, keep_checkpoints: bool
    ) -> dict[str, Any] | None:
        """The run's result: reused if it finished before, else run now; ``None`` if it failed."""
        run_dir = self.run_dir(run)
        args = run.recipe_args(self.common_args)  # a moved sweep folder still matches
        description = {
            "key": run.key,
            "optimizer": run.optimizer,
            "lr": run.lr.value,
            "lr_source": run.lr.source,
            "seed": run.seed,
            "role": run.role,
            "args": args,
        }
        recorded = read_json(run_dir / "run.json")
        result = read_json(run_dir / "result.json")
        failure = read_json(run_dir / "failure.json")
        same = recorded is not None and recorded["args"] == args
        if same and result is not None:
            print(f"[{position}] {run.key}: finished earlier, reused", flush=True)
            return result
        if same and failure is not None and not retry_failed:
            print(f"[{position}] {run.key}: failed earlier (--retry-failed reruns it)", flush=True)
            return None
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished (or changed) run starts again
        write_json(run_dir / "run.json", description)
        print(f"[{position}] {run.key}: running (output: {run_dir / 'output.log'})", flush=True)
        started = time.perf_counter()
        with open(run_dir / "output.log", "w") as log:
            process = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "recipes.compare_run",
                    self.recipe,
                    str(run_dir / "result.json"),
                    *args,
                    *("--trainer.default_root_dir", str(run_dir)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._child_env(run),
                check=False,
            )
        tail = (run_dir / "output.log").read_text(errors="replace").strip().splitlines()[-20:]
        if process.returncode == 2:  # the recipe's CLI: a usage error every run would repeat
            message = next(
                (line for line in reversed(tail) if ": error: " in line), tail[-1] if tail else ""
            )
            raise ValueError(message.split(": error: ", 1)[-1])
        result = read_json(run_dir / "result.json")
        if process.returncode != 0 or result is None:
            write_json(
                run_dir / "failure.json",
                {
                    "returncode": process.returncode,
                    "error": _failure_reason(process.returncode, tail),
                },
            )
            print(
                f"  failed (exit status {process.returncode}):\n    " + "\n    ".join(tail),
                flush=True,
            )
            return None
        if not keep_checkpoints:
            for checkpoint in sorted(run_dir.rglob("*.ckpt")):
                checkpoint.unlink()
        accuracy = result["history"].get("val_acc", [[0, float("nan")]])[-1][1]
        print(
            f"  done in {time.perf_counter() - started:.0f} s: val acc {accuracy:.4f}, "
            f"test acc {result['test'].get('test_acc', float('nan')):.4f}",
            flush=True,
        )
        return result

    def _child_env(self, run: PlannedRun) -> dict[str, str]:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)  # recipes/ is in it
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["WANDB_RUN_GROUP"] = self.state["group"]
        env["WANDB_NAME"] = run.key
        env["WANDB_JOB_TYPE"] = run.role
        return env


def _failure_reason(returncode: int, tail: Sequence[str]) -> str:
    """The last line the run printed, or how it ended when it printed nothing."""
    if tail and tail[-1].strip():
        return tail[-1].strip()
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit status {returncode} without output"


def _final_val(result: dict[str, Any] | None) -> tuple[float, float]:
    if result is None:
        return float("nan"), float("nan")
    history = result["history"]
    last = [
        history[key][-1][1] if history.get(key) else float("nan") for key in ("val_acc", "val_loss")
    ]
    return last[0], last[1]


def run_sweep(argv: Sequence[str]) -> Path:
    """Parse, plan, run (or reuse) every run, write the report; the sweep folder."""
    parser = _parser()
    options, recipe_args = parser.parse_known_args(list(argv))
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
    folder = Path(options.out or Path("reports") / options.recipe)
    previous = previous_sweep(folder, options.recipe, common)
    config = resolve_recipe_config(options.recipe, common)
    presets = preset_lrs(optimizers, config["optimizer"], config["lr"], overrides)

    seeds = [options.first_seed + i for i in range(options.seeds)]
    sweep = Sweep(
        folder,
        options.recipe,
        common,
        {
            "recipe_args": list(recipe_args),
            "command": shlex.join([*PROG.split(), *argv]),
            "optimizers": optimizers,
            "seeds": seeds,
            "target_accuracy": options.target_accuracy,
        },
        previous,
    )
    runs_per_optimizer = {
        name: len(seeds)
        - 1
        + (len(lr_grid(presets[name].value, grid_factors)) if options.lr_search else 1)
        for name in optimizers
    }
    total = sum(runs_per_optimizer.values())
    done = 0

    def execute(run: PlannedRun) -> dict[str, Any] | None:
        nonlocal done
        done += 1
        return sweep.execute(run, f"{done}/{total}", options.retry_failed, options.keep_checkpoints)

    chosen: dict[str, LearningRate] = {}
    for name in optimizers:  # first seed of every optimizer first: a partial sweep compares all
        preset = presets[name]
        if not options.lr_search:
            chosen[name] = preset
            sweep.state["lrs"][name] = {"value": preset.value, "source": preset.source}
            sweep.state["main_runs"].append(PlannedRun(name, preset, seeds[0], "compare").key)
            sweep.save()
            execute(PlannedRun(name, preset, seeds[0], "compare"))
            continue
        grid = lr_grid(preset.value, grid_factors)
        entry = {"grid": grid, "runs": [], "chosen": None}
        sweep.state["lr_search"][name] = entry
        finals = {}
        for lr in grid:
            run = PlannedRun(
                name,
                LearningRate(lr, f"search around {preset.value:.3g} ({preset.source})"),
                seeds[0],
                "lr-search",
            )
            entry["runs"].append(run.key)
            sweep.save()
            finals[lr] = _final_val(execute(run))
        best = choose_lr(finals)
        if best is None:
            print(f"  {name}: no LR of the grid gave a finite validation accuracy", flush=True)
            continue
        entry["chosen"] = best
        chosen[name] = LearningRate(best, f"best of {len(grid)} by validation accuracy")
        sweep.state["lrs"][name] = {"value": best, "source": chosen[name].source}
        # the search run at the chosen LR is the first seed's run
        search_key = PlannedRun(name, LearningRate(best, ""), seeds[0], "").key
        sweep.state["main_runs"].append(search_key)
        sweep.save()
    for seed in seeds[1:]:
        for name, lr in chosen.items():
            run = PlannedRun(name, lr, seed, "compare")
            sweep.state["main_runs"].append(run.key)
            sweep.save()
            execute(run)
    write_report(folder)
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        folder = run_sweep(argv)
    except ValueError as error:
        print(f"{PROG}: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None
    failed = _failed_runs(folder)
    if failed:
        print(f"{PROG}: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


def _failed_runs(folder: Path) -> list[str]:
    sweep = read_json(folder / "sweep.json")
    return [
        key
        for key in sweep["main_runs"]
        if (folder / "runs" / key / "failure.json").is_file()
        and not (folder / "runs" / key / "result.json").is_file()
    ]


if __name__ == "__main__":
    main()
