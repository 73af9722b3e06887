"""The workers of a sweep: each claims a queued trial, runs it as the recipe in a fresh process
and tells the study how it ended, until no trial is left.

``--workers N`` runs N of them in this process (threads that each wait on one run's process): on
CPU each run gets ``--threads`` torch threads, on GPUs each worker one device
(``CUDA_VISIBLE_DEVICES``). Workers on other machines run the same loop on the same study.

A claimed trial:

- gets its parameters: the optimizer, the seed and the LR it was queued with, or for a further
  seed the LR its optimizer's search chose (the trial is claimed only once that search ended);
- runs ``python -m recipes.sweep.child`` in ``<out>/runs/<key>/`` (its options, output, W&B files,
  checkpoints and ``result.json``), resumed with ``--ckpt_path`` from the newest ``last.ckpt``
  there when an earlier attempt died (a worker killed, a sweep interrupted), reused as it is when
  an earlier attempt finished;
- is kept alive by a heartbeat every ``--heartbeat`` seconds. A trial silent for three of them
  is failed by whichever worker looks next and queued again as a new trial, which a live worker
  claims and resumes from the dead one's ``last.ckpt``;
- ends COMPLETE with its final validation accuracy as value, PRUNED when the pruner stopped it,
  or FAIL with the last line its run printed. A usage error (exit status 2) stops the sweep.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from optim_callbacks import OPTIMIZERS
from recipes.sweep.files import read_json
from recipes.sweep.plan import WorkerOptions, run_args
from recipes.sweep.processes import die_with_parent
from recipes.sweep.pruning import PRUNER_ENV, STORAGE_ENV, STUDY_ENV, TRIAL_ENV
from recipes.sweep.storage import storage_failure
from recipes.sweep.study import chosen_lr, current_trials, ended, search_finished

__all__ = ["Sweep", "newest_checkpoint", "retry_failed", "run_workers"]

_ACTIVE = (TrialState.WAITING, TrialState.RUNNING)


@dataclass
class Sweep:
    """What this process's workers share."""

    study: optuna.Study
    storage: Any  # the RDBStorage, with heartbeats
    settings: dict[str, Any]
    options: WorkerOptions
    stop: threading.Event = field(default_factory=threading.Event)
    usage_error: str | None = None
    error: BaseException | None = None
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def folder(self) -> Path:
        return self.options.folder

    def halt(self) -> None:
        """Stop every worker: no new claims, running runs asked to end (SIGTERM; Lightning
        saves an interrupted checkpoint), their trials queued again for a rerun."""
        self.stop.set()
        with self.lock:
            for process in self.processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)


def _devices(workers: int) -> list[str | None]:
    """The GPU each worker uses (``None``: CPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d for d in visible.split(",") if d.strip()]
    else:
        import torch

        ids = [str(i) for i in range(torch.cuda.device_count())]
    return [ids[i % len(ids)] if ids else None for i in range(workers)]


def run_workers(sweep: Sweep) -> None:
    """Run ``--workers`` workers until the study has no trial left to run (or the sweep is
    stopped: a usage error is raised as ``ValueError``, a storage error as it is)."""
    devices = _devices(sweep.options.workers)
    threads = [
        threading.Thread(target=_worker, args=(sweep, index, device), name=f"worker-{index}")
        for index, device in enumerate(devices)
    ]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        sweep.halt()
        for thread in threads:
            thread.join()
        raise
    if sweep.error is not None:
        raise sweep.error
    if sweep.usage_error is not None:
        raise ValueError(sweep.usage_error)


def retry_failed(study: optuna.Study) -> list[str]:
    """Queue again each planned run whose newest trial failed (``--retry-failed``); their keys."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    again = RetryHeartbeatStaleTrialCallback()
    keys = []
    for key, entry in current_trials(study.get_trials(deepcopy=False)).items():
        if entry.state == TrialState.FAIL and ended(entry.trial):  # not one being retried
            again(study, entry.trial)
            keys.append(key)
    return keys


def _worker(sweep: Sweep, index: int, device: str | None) -> None:
    name = f"{socket.gethostname()}:{os.getpid()}/{index}"
    try:
        while not sweep.stop.is_set():
            claimed = _claim(sweep)
            if claimed is None:
                if not any(
                    t.state in _ACTIVE
                    for t in current_trials(sweep.study.get_trials(deepcopy=False)).values()
                ):
                    return  # nothing queued, nothing running anywhere: the sweep is done
                sweep.stop.wait(min(2.0, sweep.options.heartbeat))
                continue
            _run_trial(sweep, claimed, name, device)
    except Exception as error:
        import sqlalchemy.exc

        if isinstance(error, sqlalchemy.exc.SQLAlchemyError):
            sweep.error = storage_failure(error, sweep.options.storage)
        else:
            sweep.error = error
        sweep.halt()
    finally:
        remove = getattr(sweep.storage, "remove_session", None)
        if remove is not None:
            remove()  # this thread's database session


def _claim(sweep: Sweep) -> FrozenTrial | None:
    """Fail the trials of dead workers (queued again by the heartbeat's callback), then take
    the first queued trial that can run now, atomically (WAITING -> RUNNING)."""
    optuna.storages.fail_stale_trials(sweep.study)
    current = current_trials(sweep.study.get_trials(deepcopy=False))
    for entry in current.values():
        if entry.state != TrialState.WAITING:
            continue
        lr_to_choose = "lr" not in entry.trial.params and not _has_fixed_lr(entry.trial)
        if lr_to_choose and not search_finished(current, entry.optimizer):
            continue  # a further seed waits for its optimizer's LR search
        if sweep.storage.set_trial_state_values(entry.trial._trial_id, state=TrialState.RUNNING):
            sweep.storage.record_heartbeat(entry.trial._trial_id)
            return entry.trial
    return None


def _has_fixed_lr(trial: FrozenTrial) -> bool:
    return "lr" in trial.system_attrs.get("fixed_params", {})


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``last.ckpt`` under a run folder (each attempt writes its own W&B run folder)."""
    found = [p for p in run_dir.glob("**/checkpoints/last.ckpt") if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _search_bounds(settings: Mapping[str, Any], optimizer: str, lr: float) -> tuple[float, float]:
    entry = settings["search"].get(optimizer)
    if entry is None:
        return lr, lr
    return min(entry["low"], lr), max(entry["high"], lr)


class _Heartbeat:
    """Records the trial's heartbeat every ``interval`` seconds until stopped."""

    def __init__(self, storage: Any, trial_id: int, interval: int) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(storage, trial_id, interval), daemon=True
        )

    def _beat(self, storage: Any, trial_id: int, interval: int) -> None:
        while not self._stop.wait(interval):
            with contextlib.suppress(Exception):  # a storage hiccup: the next beat tries again
                storage.record_heartbeat(trial_id)
        remove = getattr(storage, "remove_session", None)
        if remove is not None:
            remove()

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _say(message: str) -> None:
    print(message, flush=True)


def _run_trial(sweep: Sweep, frozen: FrozenTrial, worker: str, device: str | None) -> None:
    study, settings, options = sweep.study, sweep.settings, sweep.options
    trial = optuna.Trial(study, frozen._trial_id)
    attrs = frozen.user_attrs
    key, role = attrs["key"], attrs["role"]
    label = f"{key} (trial {frozen.number})"
    with _Heartbeat(sweep.storage, frozen._trial_id, options.heartbeat):
        optimizer = trial.suggest_categorical("optimizer", OPTIMIZERS.names())
        seed = trial.suggest_int("seed", int(attrs["seed"]), int(attrs["seed"]))
        fixed = frozen.params.get("lr", frozen.system_attrs.get("fixed_params", {}).get("lr"))
        if fixed is None:  # a further seed: the LR its optimizer's search chose, as a range of one
            lr = chosen_lr(current_trials(study.get_trials(deepcopy=False)), optimizer)
            if lr is None:
                trial.set_user_attr("error", "no LR of its search finished")
                study.tell(trial, state=TrialState.FAIL)
                _say(f"[{label}] failed: no LR of {optimizer}'s search finished")
                return
            bounds = (lr, lr)
        else:  # queued with its LR (or a retry that has it): the search's range, for plots
            bounds = _search_bounds(settings, optimizer, float(fixed))
        lr = trial.suggest_float("lr", *bounds, log=True)
        trial.set_user_attr("worker", worker)
        retried = frozen.system_attrs.get("failed_trial")
        if retried is not None:
            trial.set_user_attr("takes_over", retried)

        run_dir = options.folder / "runs" / key
        result = read_json(run_dir / "result.json")
        if result is not None:
            _say(f"[{label}] finished earlier, reused")
        else:
            result = _execute(sweep, trial, key, role, optimizer, lr, seed, run_dir, device, label)
            if result is None:
                return
        _tell(sweep, trial, result, run_dir, label)


def _execute(
    sweep: Sweep,
    trial: optuna.Trial,
    key: str,
    role: str,
    optimizer: str,
    lr: float,
    seed: int,
    run_dir: Path,
    device: str | None,
    label: str,
) -> dict[str, Any] | None:
    """Run the trial's recipe run in a fresh process; its result, or ``None`` (trial told)."""
    options, settings = sweep.options, sweep.settings
    resume = newest_checkpoint(run_dir) if run_dir.exists() else None
    if resume is None and run_dir.exists():
        shutil.rmtree(run_dir)  # an attempt that died before its first checkpoint starts again
    run_dir.mkdir(parents=True, exist_ok=True)
    args = run_args(settings["common_args"], optimizer, lr, seed)
    command = [
        sys.executable,
        "-m",
        "recipes.sweep.child",
        settings["recipe"],
        str(run_dir / "result.json"),
        *args,
        *("--trainer.default_root_dir", str(run_dir)),
    ]
    if resume is not None:
        import torch

        step = int(torch.load(resume, map_location="cpu", weights_only=True)["global_step"])
        command += ["--ckpt_path", str(resume), *_same_checkpoint_folder(args, resume.parent)]
        trial.set_user_attr("resumed_from_step", step)
        _say(f"[{label}] resuming from step {step} ({resume.relative_to(options.folder)})")
    else:
        _say(f"[{label}] running (output: {run_dir / 'output.log'})")
    env = _child_env(sweep, trial, key, role, device)
    started = time.perf_counter()
    with open(run_dir / "output.log", "a") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=die_with_parent,  # no orphan when the sweep is killed
        )
        with sweep.lock:
            sweep.processes[trial._trial_id] = process
        trial.set_user_attr("pid", process.pid)
        process.wait()
        with sweep.lock:
            sweep.processes.pop(trial._trial_id, None)
    tail = (run_dir / "output.log").read_text(errors="replace").strip().splitlines()[-20:]
    result = read_json(run_dir / "result.json")
    if sweep.stop.is_set() and result is None:
        # Stopped by this sweep (Ctrl-C, another run's usage error): queued again, so the
        # same command resumes it from its checkpoint.
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        trial.set_user_attr("error", "interrupted")
        sweep.study.tell(trial, state=TrialState.FAIL)
        RetryHeartbeatStaleTrialCallback(inherit_intermediate_values=True)(
            sweep.study, sweep.storage.get_trial(trial._trial_id)
        )
        return None
    if process.returncode == 2:  # the recipe's CLI: a usage error every run would repeat
        message = next(
            (line for line in reversed(tail) if ": error: " in line), tail[-1] if tail else ""
        )
        message = message.split(": error: ", 1)[-1]
        trial.set_user_attr("error", message)
        sweep.study.tell(trial, state=TrialState.FAIL)
        sweep.usage_error = sweep.usage_error or message
        sweep.halt()
        return None
    if process.returncode != 0 or result is None:
        reason = _failure_reason(process.returncode, tail)
        trial.set_user_attr("error", reason)
        sweep.study.tell(trial, state=TrialState.FAIL)
        _say(f"[{label}] failed (exit status {process.returncode}):\n    " + "\n    ".join(tail))
        return None
    accuracy = _last(result, "val_acc")
    _say(
        f"[{label}] done in {time.perf_counter() - started:.0f} s: val acc {accuracy:.4f}, "
        f"test acc {result['test'].get('test_acc', float('nan')):.4f}"
        + (f", pruned at step {result['pruned_at_step']}" if result.get("pruned_at_step") else "")
    )
    return result


def _same_checkpoint_folder(args: list[str], folder: Path) -> list[str]:
    """Options that keep a resumed attempt's checkpoints in the dead attempt's folder: a
    ``ModelCheckpoint`` whose folder changed forgets its best score and keeps only the best
    path, so the test would evaluate another checkpoint than an uninterrupted run's (the new
    attempt's logger, a new W&B run, would otherwise name a new folder)."""
    options = ["--last_checkpoint.dirpath", str(folder)]
    switched_off = any(
        token in ("--checkpoint=null", "--checkpoint=None")
        or (
            token == "--checkpoint"
            and index + 1 < len(args)
            and args[index + 1] in ("null", "None")
        )
        for index, token in enumerate(args)
    )
    if not switched_off:
        options += ["--checkpoint.dirpath", str(folder)]
    return options


def _child_env(
    sweep: Sweep, trial: optuna.Trial, key: str, role: str, device: str | None
) -> dict[str, str]:
    options, settings = sweep.options, sweep.settings
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # recipes/ is in it
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["WANDB_RUN_GROUP"] = settings["group"]
    env["WANDB_NAME"] = key
    env["WANDB_JOB_TYPE"] = role
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(options.threads)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    for name in (STORAGE_ENV, STUDY_ENV, TRIAL_ENV, PRUNER_ENV):
        env.pop(name, None)
    if role == "lr-search" and settings.get("pruner", "none") != "none":
        env[STORAGE_ENV] = options.storage  # the environment only: never in options or logs
        env[STUDY_ENV] = options.study
        env[TRIAL_ENV] = str(trial._trial_id)
        env[PRUNER_ENV] = settings["pruner"]
    return env


def _last(result: Mapping[str, Any], key: str) -> float:
    series = result["history"].get(key) or [[0, float("nan")]]
    return float(series[-1][1])


def _tell(
    sweep: Sweep, trial: optuna.Trial, result: Mapping[str, Any], run_dir: Path, label: str
) -> None:
    """Tell the study how the run ended; its checkpoints go unless ``--keep-checkpoints``."""
    accuracy, loss = _last(result, "val_acc"), _last(result, "val_loss")
    trial.set_user_attr("final_val_loss", loss)
    trial.set_user_attr("run_dir", str(run_dir.relative_to(sweep.options.folder)))
    pruned = result.get("pruned_at_step")
    if pruned is not None:
        trial.set_user_attr("pruned_at_step", pruned)
        sweep.study.tell(trial, state=TrialState.PRUNED)
    else:
        sweep.study.tell(trial, accuracy if math.isfinite(accuracy) else -math.inf)
    if not sweep.options.keep_checkpoints:
        for checkpoint in sorted(run_dir.rglob("*.ckpt")):
            checkpoint.unlink()


def _failure_reason(returncode: int, tail: list[str]) -> str:
    """The last line the run printed, or how it ended when it printed nothing."""
    if tail and tail[-1].strip():
        return tail[-1].strip()
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit status {returncode} without output"
