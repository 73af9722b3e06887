"""Running a sweep: each planned run in its own process, reused when it finished before.

The sweep folder holds ``sweep.json`` (the plan and what was chosen: the LR of each optimizer,
the LR search) and one folder per run under ``runs/<key>/``: ``run.json`` (its options),
``output.log``, its W&B files and checkpoints, and ``result.json`` once it finished (or
``failure.json``). Each run is ``python -m recipes.sweep.child`` in a fresh process.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.sweep.files import read_json, write_json
from recipes.sweep.lr_presets import LearningRate, choose_lr, lr_grid
from recipes.sweep.plan import PlannedRun, SweepPlan
from recipes.sweep.processes import die_with_parent

__all__ = ["SweepFolder", "execute_sweep", "failed_runs", "previous_sweep"]


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


class SweepFolder:
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
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "recipes.sweep.child",
                    self.recipe,
                    str(run_dir / "result.json"),
                    *args,
                    *("--trainer.default_root_dir", str(run_dir)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._child_env(run),
                preexec_fn=die_with_parent,  # no orphan when the sweep is killed
            )
            (run_dir / "pid").write_text(str(process.pid))
            process.wait()
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
        package_root = str(Path(__file__).resolve().parents[2])  # recipes/ is in it
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


def execute_sweep(plan: SweepPlan) -> SweepFolder:
    """Run (or reuse) every run of ``plan``: the first seed of every optimizer first (after its
    LR search, if any), so a partial sweep compares them all; then the other seeds."""
    folder = plan.folder
    previous = previous_sweep(folder, plan.recipe, plan.common_args)
    sweep = SweepFolder(
        folder,
        plan.recipe,
        plan.common_args,
        {
            "recipe_args": plan.recipe_args,
            "command": plan.command,
            "optimizers": plan.optimizers,
            "seeds": plan.seeds,
            "target_accuracy": plan.target_accuracy,
        },
        previous,
    )
    total = plan.total_runs
    done = 0

    def execute(run: PlannedRun) -> dict[str, Any] | None:
        nonlocal done
        done += 1
        return sweep.execute(run, f"{done}/{total}", plan.retry_failed, plan.keep_checkpoints)

    first_seed = plan.seeds[0]
    chosen: dict[str, LearningRate] = {}
    for name in plan.optimizers:
        preset = plan.presets[name]
        if plan.lr_grid_factors is None:
            chosen[name] = preset
            sweep.state["lrs"][name] = {"value": preset.value, "source": preset.source}
            sweep.state["main_runs"].append(PlannedRun(name, preset, first_seed, "compare").key)
            sweep.save()
            execute(PlannedRun(name, preset, first_seed, "compare"))
            continue
        grid = lr_grid(preset.value, plan.lr_grid_factors)
        entry = {"grid": grid, "runs": [], "chosen": None}
        sweep.state["lr_search"][name] = entry
        finals = {}
        for lr in grid:
            run = PlannedRun(
                name,
                LearningRate(lr, f"search around {preset.value:.3g} ({preset.source})"),
                first_seed,
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
        search_key = PlannedRun(name, LearningRate(best, ""), first_seed, "").key
        sweep.state["main_runs"].append(search_key)
        sweep.save()
    for seed in plan.seeds[1:]:
        for name, lr in chosen.items():
            run = PlannedRun(name, lr, seed, "compare")
            sweep.state["main_runs"].append(run.key)
            sweep.save()
            execute(run)
    return sweep


def failed_runs(folder: Path) -> list[str]:
    sweep = read_json(folder / "sweep.json")
    return [
        key
        for key in sweep["main_runs"]
        if (folder / "runs" / key / "failure.json").is_file()
        and not (folder / "runs" / key / "result.json").is_file()
    ]
