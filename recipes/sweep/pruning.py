"""Stopping hopeless LR-search runs early: Optuna's pruners through the Lightning pruning
callback of ``optuna-integration``.

A search run is a recipe run in its own process (:mod:`recipes.sweep.child`); the sweep hands it
its trial through the environment (:data:`STORAGE_ENV`, :data:`STUDY_ENV`, :data:`TRIAL_ENV`,
:data:`PRUNER_ENV`: the storage URL never appears in the run's options, config or W&B run).
:class:`TrialPruning` reports ``val_acc`` at every validation and asks the pruner whether to
stop; a stopped run ends its fit like early stopping (``trainer.should_stop``), so it is still
tested and recorded, and the sweep marks its trial PRUNED. Only LR-search runs are pruned: the
runs that compare optimizers always run to the end.

The pruners (``--pruner``):

- ``median``: ``MedianPruner(n_startup_trials=1, n_min_trials=1)``: a run whose best
  validation accuracy so far is below the median of the finished search runs at the same step
  is stopped, once one run has finished;
- ``halving``: ``SuccessiveHalvingPruner()`` (asynchronous successive halving, Li et al. 2020:
  at rungs of ``min_resource * 4**k`` steps, only the top quarter goes on);
- ``none``.

Either compares a run only with the search runs of its own optimizer (:class:`SameOptimizer`):
SGD's search is not cut short because AdamW's runs are ahead. Which runs a pruner stops depends
on which others had finished by then, so with several workers it can differ from one worker;
``--pruner none`` gives the same runs whatever the number of workers.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import optuna
from optuna_integration import PyTorchLightningPruningCallback

__all__ = [
    "PRUNER_ENV",
    "STORAGE_ENV",
    "STUDY_ENV",
    "TRIAL_ENV",
    "SameOptimizer",
    "TrialPruning",
    "make_pruner",
    "trial_from_environment",
]

STORAGE_ENV = "OPTIM_SWEEP_STORAGE"
STUDY_ENV = "OPTIM_SWEEP_STUDY"
TRIAL_ENV = "OPTIM_SWEEP_TRIAL_ID"
PRUNER_ENV = "OPTIM_SWEEP_PRUNER"


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The pruner called ``name`` (see the module docstring)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_min_trials=1)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


class _SameOptimizerStudy:
    """The study as a pruner sees it: only the LR-search trials of one optimizer."""

    def __init__(self, study: optuna.Study, optimizer: str) -> None:
        self._study = study
        self._optimizer = optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[Any]:
        return [
            t
            for t in self._study.get_trials(deepcopy=deepcopy, states=states)
            if t.user_attrs.get("optimizer") == self._optimizer
            and t.user_attrs.get("role") == "lr-search"
        ]


class SameOptimizer(optuna.pruners.BasePruner):
    """Prunes as ``inner`` does, against the LR-search trials of the trial's own optimizer."""

    def __init__(self, inner: optuna.pruners.BasePruner) -> None:
        self.inner = inner

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        optimizer = trial.user_attrs.get("optimizer")
        return self.inner.prune(_SameOptimizerStudy(study, optimizer), trial)  # type: ignore[arg-type]


def trial_from_environment() -> optuna.Trial:
    """The running trial the sweep handed this process (see the module docstring)."""
    from recipes.sweep.storage import open_storage

    storage = open_storage(os.environ[STORAGE_ENV])
    study = optuna.load_study(
        study_name=os.environ[STUDY_ENV],
        storage=storage,
        pruner=SameOptimizer(make_pruner(os.environ.get(PRUNER_ENV, "median"))),
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    return optuna.Trial(study, int(os.environ[TRIAL_ENV]))


class TrialPruning(PyTorchLightningPruningCallback):
    """``optuna_integration.PyTorchLightningPruningCallback`` for a sweep's search run.

    The parent reports at ``current_epoch``, so a second validation in an epoch would be ignored
    as "already reported"; a sweep validates several times per epoch, so this one reports at
    the optimizer step (``trainer.global_step``) and stops the fit through ``should_stop`` (on
    every rank, decided by rank zero) instead of raising inside the loop. ``pruned_at_step`` is
    the step of the validation that stopped it (``None``: not stopped). A run resumed from a
    checkpoint reports its later validations to the same trial (earlier ones were inherited).
    """

    def __init__(self, monitor: str = "val_acc") -> None:
        super().__init__(trial_from_environment(), monitor)
        self.pruned_at_step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is None:
            return
        step = trainer.global_step
        stop = False
        if trainer.is_global_zero:
            if step not in self._trial.storage.get_trial(self._trial._trial_id).intermediate_values:
                self._trial.report(float(score), step=step)
            stop = self._trial.should_prune()
        stop = bool(trainer.strategy.broadcast(stop))
        if stop:
            trainer.should_stop = True
            self.pruned_at_step = step
