"""Compare optimizers on a recipe: an Optuna study of runs (optimizers x LR search x seeds), run
by parallel workers in fresh processes, then a report.

    python -m recipes.compare --recipe bert_finetune --optimizers adamw,adam,sgd,nesterov
    python -m recipes.compare --recipe bert_finetune --optimizers adamw,sgd --seeds 3 \\
        --lr-trials 6 --workers 2 --trainer.limit_train_batches 50   # recipe options: every run
    python -m recipes.compare --join --storage postgresql://user@host/db --out /shared/sweep
    python -m recipes.report reports/bert_finetune   # rewrite the report of a sweep folder

Each run is the recipe's own command (``python -m recipes.<recipe> <options> --optimizer NAME
--lr LR --seed_everything SEED``) in a fresh process (:mod:`recipes.sweep.child`), all in one W&B
group (W&B stays offline without credentials, as in the recipes). The sweep is an Optuna study
(:mod:`recipes.sweep.study`), by default in ``<out>/study.db`` (SQLite), or in any database
``--storage URL`` names (PostgreSQL for workers on several machines): its trials are the runs,
claimed by ``--workers`` workers here and by any worker that joins (:mod:`recipes.sweep.worker`).
The learning rate of each optimizer is its preset (:mod:`recipes.sweep.lr_presets`), or with
``--lr-search``/``--lr-trials K`` the best of K trials around it on the first seed's validation
accuracy, hopeless ones pruned (:mod:`recipes.sweep.pruning`); further seeds run at that LR.

The sweep folder (``--out``, default ``reports/<recipe>``) holds one folder per run under
``runs/`` (its output, W&B files, checkpoints until it finished, ``result.json``) and the
report (:mod:`recipes.report`: ``report.md``, ``report.html``, ``results.json``, PNG plots),
whose table is also printed, with the ``optuna-dashboard`` command for the study. Running the
same command again resumes the study: finished runs are reused, a run whose worker died is
resumed from its ``last.ckpt``, a failed one is kept unless ``--retry-failed``; more optimizers or
seeds extend it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from recipes.report import main_trials, write_report
from recipes.sweep.commands import command_errors
from recipes.sweep.plan import PROG, plan_sweep
from recipes.sweep.storage import StorageError, dashboard_command, open_storage

__all__ = ["main", "run_sweep"]


def run_sweep(argv: Sequence[str]) -> tuple[Path, list[str]]:
    """Plan, run (or join) the study until no trial is left, report; the sweep folder and the
    keys of its comparison runs that failed."""
    import sqlalchemy.exc

    from recipes.sweep.study import current_trials, open_study
    from recipes.sweep.worker import Sweep, retry_failed, run_workers

    plan, options = plan_sweep(argv)
    options.folder.mkdir(parents=True, exist_ok=True)
    storage = open_storage(options.storage, heartbeat=options.heartbeat)
    try:
        recipe = plan.recipe if plan is not None else "sweep"
        group = f"{recipe}-compare-{time.strftime('%Y%m%d-%H%M%S')}"
        study, settings = open_study(storage, options.study, plan, group)
        if options.retry_failed:
            retried = retry_failed(study)
            if retried:
                print(f"queued again: {', '.join(retried)}", flush=True)
        current = current_trials(study.get_trials(deepcopy=False))
        done = sum(t.status in ("finished", "pruned") for t in current.values())
        print(
            f"Study {options.study!r} in {options.shown_storage}: {len(current)} runs, {done} "
            f"finished; {options.workers} worker(s) here, {options.threads} torch thread(s) "
            "per run",
            flush=True,
        )
        run_workers(Sweep(study, storage, settings, options))
        write_report(options.folder, storage=options.storage, study=options.study)
        current = current_trials(study.get_trials(deepcopy=False))
        failed = [t.key for t in main_trials(settings, current) if t.status == "failed"]
    except sqlalchemy.exc.SQLAlchemyError as error:
        from recipes.sweep.storage import storage_failure

        raise storage_failure(error, options.storage) from None
    print(f"Look at the study: {dashboard_command(options.storage)}")
    return options.folder, failed


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    with command_errors(PROG, failures=(StorageError,), resumable=True):
        _, failed = run_sweep(argv)
    if failed:
        print(f"{PROG}: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
