"""The sweep's Optuna study: its one source of truth.

- The study's user attributes hold the sweep's settings (:meth:`SweepPlan.settings`: recipe,
  options, optimizers, presets, seeds, LR search, W&B group). A command with another recipe or
  other recipe options on the same study is refused; a worker that joins reads them.
- Each planned run is a trial, queued with ``enqueue_trial`` (its optimizer, LR and seed as fixed
  parameters, its key and role as user attributes). The process that creates the study queues
  the plan; one that finds it (a second worker, a rerun) waits until the plan is queued and adds
  only the runs a larger command asks for (more optimizers or seeds), so nothing is planned twice.
- Trials are claimed one at a time with the storage's atomic WAITING -> RUNNING transition (what
  ``Study.ask`` does), so two workers never run one trial. A trial that failed because its
  worker died is failed by the heartbeat and queued again as a new trial that names it
  (``failed_trial``); :func:`current_trials` keeps the newest attempt of each key.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from recipes.sweep.plan import PlannedTrial, SweepPlan
from recipes.sweep.storage import masked_url

__all__ = [
    "SweepTrial",
    "chosen_lr",
    "current_trials",
    "ended",
    "load_sweep",
    "open_study",
    "queue_plan",
    "search_finished",
]

PLAN_WAIT_SECONDS = 60


def _quiet() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _sampler() -> optuna.samplers.BaseSampler:
    """Every parameter of a sweep trial is fixed when it is queued (the LRs were drawn by the
    plan's seeded sampler), so this one never draws; seeded all the same."""
    return optuna.samplers.RandomSampler(seed=0)


def _load_study(storage: Any, name: str, allowed: str) -> optuna.Study:
    """The study ``name`` in ``storage``; a one-line error saying what is ``allowed`` when
    there is none."""
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=_sampler())
    except KeyError:
        raise ValueError(
            f"study: no study {name!r} in {masked_url(storage.url)}; allowed: {allowed}"
        ) from None


def open_study(
    storage: Any, name: str, plan: SweepPlan | None, group: str
) -> tuple[optuna.Study, dict[str, Any]]:
    """Create the study and queue ``plan``, or load it (``plan`` ``None``: ``--join``), check
    that it holds the same sweep and queue what ``plan`` adds; the study and its settings."""
    _quiet()
    if plan is None:
        study = _load_study(
            storage,
            name,
            "the name of a running sweep's study (--study), started with python -m recipes.compare",
        )
        return study, _wait_for_plan(study)
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", sampler=_sampler()
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler())
        settings = _wait_for_plan(study)
        _check_same_sweep(study, settings, plan)
        settings = _merge(settings, plan)
        study.set_user_attr("settings", settings)
        queue_plan(study, plan.trials)
        return study, settings
    settings = {**plan.settings(), "group": group}
    study.set_user_attr("settings", settings)
    queue_plan(study, plan.trials)
    study.set_user_attr("planned", True)
    return study, settings


def _wait_for_plan(study: optuna.Study) -> dict[str, Any]:
    """The settings of a study some process has created; waits (a minute at most) until that
    process has queued its plan."""
    deadline = time.monotonic() + PLAN_WAIT_SECONDS
    while True:
        attrs = study.user_attrs
        if "settings" in attrs and (attrs.get("planned") or time.monotonic() > deadline):
            return attrs["settings"]
        if time.monotonic() > deadline:
            raise ValueError(
                f"study: {study.study_name!r} holds no comparison sweep; allowed: a study "
                "made by python -m recipes.compare, or another --study"
            )
        time.sleep(0.5)


def _check_same_sweep(study: optuna.Study, settings: Mapping[str, Any], plan: SweepPlan) -> None:
    import shlex

    if (settings["recipe"], settings["common_args"]) != (plan.recipe, plan.common_args):
        raise ValueError(
            f"study: {study.study_name!r} holds a sweep of {settings['recipe']} with the options "
            f"{shlex.join(settings['common_args'])!r}; allowed: the same recipe and options, "
            "or another --out or --study"
        )


def _merge(settings: Mapping[str, Any], plan: SweepPlan) -> dict[str, Any]:
    """The study's settings extended by a command that asks for more optimizers or seeds."""
    new = plan.settings()
    merged = dict(settings)
    merged["optimizers"] = [
        *settings["optimizers"],
        *(n for n in new["optimizers"] if n not in settings["optimizers"]),
    ]
    merged["seeds"] = sorted(set(settings["seeds"]) | set(new["seeds"]))
    merged["presets"] = {**new["presets"], **settings["presets"]}
    merged["search"] = {**new["search"], **settings["search"]}
    for name, entry in new["search"].items():  # more trials for a searched optimizer
        old = settings["search"].get(name)
        if old is not None:
            lrs = [*old["lrs"], *(lr for lr in entry["lrs"] if lr not in old["lrs"])]
            merged["search"][name] = {**old, "lrs": lrs}
    return merged


def queue_plan(study: optuna.Study, planned: Iterable[PlannedTrial]) -> int:
    """Queue each planned trial whose key the study does not hold yet; how many were queued."""
    known = {t.user_attrs.get("key") for t in study.get_trials(deepcopy=False)}
    queued = 0
    for trial in planned:
        if trial.key in known:
            continue
        params: dict[str, Any] = {"optimizer": trial.optimizer, "seed": trial.seed}
        if trial.lr is not None:
            params["lr"] = trial.lr
        study.enqueue_trial(params, user_attrs=trial.as_attrs())
        known.add(trial.key)
        queued += 1
    return queued


@dataclass
class SweepTrial:
    """The newest attempt of one planned run."""

    key: str
    optimizer: str
    seed: int
    role: str
    trial: FrozenTrial
    attempts: list[int]  # trial numbers, oldest first

    @property
    def lr(self) -> float | None:
        return self.trial.params.get("lr", self.trial.user_attrs.get("lr"))

    @property
    def state(self) -> TrialState:
        return self.trial.state

    @property
    def status(self) -> str:
        """finished, pruned, failed, running or waiting."""
        return {
            TrialState.COMPLETE: "finished",
            TrialState.PRUNED: "pruned",
            TrialState.FAIL: "failed",
            TrialState.RUNNING: "running",
            TrialState.WAITING: "waiting",
        }[self.state]


def current_trials(trials: Sequence[FrozenTrial]) -> dict[str, SweepTrial]:
    """Key -> the newest attempt of that planned run (a retry supersedes the trial it
    retries), in plan order; trials without a key (not the sweep's) are left out."""
    by_key: dict[str, list[FrozenTrial]] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        key = trial.user_attrs.get("key")
        if key is not None:
            by_key.setdefault(key, []).append(trial)
    current = {}
    for key, attempts in by_key.items():
        newest = attempts[-1]
        attrs = newest.user_attrs
        current[key] = SweepTrial(
            key=key,
            optimizer=attrs["optimizer"],
            seed=int(attrs["seed"]),
            role=attrs["role"],
            trial=newest,
            attempts=[t.number for t in attempts],
        )
    return current


def ended(trial: FrozenTrial) -> bool:
    """Whether a trial's run has ended for good: COMPLETE, PRUNED, or FAIL with the reason a
    worker gave. A FAIL without one is a dead worker's trial that the heartbeat's callback is
    queueing again (or has), and one "interrupted" is queued again by its own worker."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("error") not in (
        None,
        "interrupted",
    )


def search_finished(current: Mapping[str, SweepTrial], optimizer: str) -> bool:
    """Whether every LR-search trial of ``optimizer`` has ended (see :func:`ended`)."""
    return all(
        ended(t.trial)
        for t in current.values()
        if t.optimizer == optimizer and t.role == "lr-search"
    )


def chosen_lr(current: Mapping[str, SweepTrial], optimizer: str) -> float | None:
    """The LR whose search trial of ``optimizer`` finished with the best final validation
    accuracy (then the lower validation loss, then the smaller LR); pruned and failed trials
    never win, test metrics are never read. ``None`` if no search trial finished."""
    from recipes.sweep.lr_presets import choose_lr

    candidates = {
        t.lr: (t.trial.value, t.trial.user_attrs.get("final_val_loss", float("nan")))
        for t in current.values()
        if t.optimizer == optimizer
        and t.role == "lr-search"
        and t.state == TrialState.COMPLETE
        and t.lr is not None
    }
    return choose_lr(candidates)


def load_sweep(
    storage: Any, name: str
) -> tuple[optuna.Study, dict[str, Any], dict[str, SweepTrial]]:
    """A sweep's study, its settings and current trials (for the report)."""
    _quiet()
    study = _load_study(
        storage, name, "a sweep's study (--study NAME) made by python -m recipes.compare"
    )
    settings = study.user_attrs.get("settings")
    if settings is None:
        raise ValueError(
            f"study: {name!r} holds no comparison sweep; allowed: a study made by "
            "python -m recipes.compare"
        )
    return study, settings, current_trials(study.get_trials(deepcopy=False))
