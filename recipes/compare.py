"""Compare optimizers on a recipe: one run per optimizer and seed, then a report.

    python -m recipes.compare --recipe bert_finetune --optimizers adamw,adam,sgd,nesterov
    python -m recipes.compare --recipe bert_finetune --optimizers adamw,sgd --seeds 3 \\
        --trainer.limit_train_batches 50        # any recipe option applies to every run
    python -m recipes.compare --recipe vit_finetune --optimizers adamw,nesterov --lr-search
    python -m recipes.report reports/bert_finetune   # rewrite the report of a sweep folder

Each run is the recipe's own command (``python -m recipes.<recipe> <options> --optimizer NAME
--lr LR --seed_everything SEED``) in a fresh process (:mod:`recipes.sweep.child`), one after the
other, all in one W&B group (W&B stays offline without credentials, as in the recipes). The
learning rate of each optimizer is its preset (:mod:`recipes.sweep.lr_presets`: the recipe's LR scaled
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

import sys
from collections.abc import Sequence
from pathlib import Path

from recipes.report import write_report
from recipes.sweep.plan import PROG, plan_sweep
from recipes.sweep.processes import FolderLock
from recipes.sweep.runner import execute_sweep, failed_runs

__all__ = ["main", "run_sweep"]


def run_sweep(argv: Sequence[str]) -> Path:
    """Plan, execute (or reuse) every run, report; the sweep folder."""
    plan = plan_sweep(argv)
    with FolderLock(plan.folder):  # one sweep at a time in a folder
        execute_sweep(plan)
        write_report(plan.folder)
    return plan.folder


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
    failed = failed_runs(folder)
    if failed:
        print(f"{PROG}: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
