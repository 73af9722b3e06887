"""Each arm of the claims study as a comparison sweep of the engine (:mod:`recipes.sweep`).

An arm is one optimizer on one task, so it is exactly what ``python -m recipes.compare`` runs
with one optimizer: :func:`sweep_argv` writes that command line (the task's recipe options,
then the arm's own, then any the caller adds, which win), :func:`plan_arm` has the engine plan
it (its own parser checks every option before anything runs), and :func:`run_arm` runs it:
the arm's own Optuna study (named after the arm) in the claims study's storage, one worker,
every run a fresh process. Running it again resumes it: finished trials are kept, a trial whose
process died is taken over from its checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from recipes.claims.registry import Arm, Registry

__all__ = ["arm_folder", "plan_arm", "run_arm", "sweep_argv"]


def arm_folder(work: Path, arm: Arm) -> Path:
    """The engine's sweep folder of ``arm`` (its runs, W&B files, logs: never committed)."""
    return work / "arms" / arm.name


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (what the study keeps of
    the command line must not name this machine's folders)."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)


def sweep_argv(
    registry: Registry,
    arm: Arm,
    *,
    work: Path,
    storage: str,
    quick: bool = False,
    task_args: Mapping[str, Sequence[str]] | None = None,
    threads: int = 1,
) -> list[str]:
    """The ``recipes.compare`` arguments of ``arm`` (see the module docstring)."""
    task = registry.tasks[arm.task]
    seeds = registry.seeds[:2] if quick else registry.seeds
    argv = [
        *("--recipe", task.recipe, "--optimizers", arm.optimizer),
        *("--seeds", str(len(seeds)), "--first-seed", str(seeds[0])),
        *("--out", _shown(arm_folder(work, arm)), "--storage", storage, "--study", arm.name),
        *("--workers", "1", "--threads", str(threads)),
        *("--validations-per-epoch", str(1 if quick else task.validations_per_epoch)),
    ]
    if arm.searched:
        trials = 2 if quick else registry.lr_trials
        argv += ["--lr-trials", str(trials), "--lr-range", f"{registry.lr_range:g}"]
        argv += ["--pruner", registry.pruner]
    else:
        argv += ["--lrs", f"{arm.optimizer}={arm.fixed_lr!r}"]
    argv += list(task.quick_args if quick else task.args)
    argv += list(arm.args)
    argv += list((task_args or {}).get(arm.task, ()))
    return argv


def plan_arm(argv: Sequence[str]) -> Any:
    """The engine's plan and worker options of an arm's command line (checked by the recipe's
    own parser)."""
    from recipes.sweep.plan import plan_sweep

    return plan_sweep(list(argv))


def run_arm(argv: Sequence[str]) -> dict[str, Any]:
    """Run (or resume) the arm's study until none of its trials is left; its settings."""
    import sqlalchemy.exc

    from recipes.sweep.storage import open_storage, storage_failure
    from recipes.sweep.study import open_study
    from recipes.sweep.worker import Sweep, run_workers

    plan, options = plan_arm(argv)
    options.folder.mkdir(parents=True, exist_ok=True)
    storage = open_storage(options.storage, heartbeat=options.heartbeat)
    try:
        study, settings = open_study(storage, options.study, plan, f"claims-{options.study}")
        run_workers(Sweep(study, storage, settings, options))
    except sqlalchemy.exc.SQLAlchemyError as error:
        raise storage_failure(error, options.storage) from None
    finally:
        storage.remove_session()
        storage.engine.dispose()
    return settings
