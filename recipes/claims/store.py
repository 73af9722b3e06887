"""Where the claims study keeps what it measured, and what of it is committed.

Layout of the study folder (``<out>/study``, by default ``docs/claims/study``):

- the work folder, never committed (``<out>/study/work``, or ``--work``; for the default
  ``docs/claims`` it is ``reports/claims-work``, outside the documentation site, whose build
  copies every file under ``docs/``): the live Optuna storage ``study.db`` (SQLite, one study
  per arm, written while runs finish) and each arm's engine folder ``arms/<arm>/`` (run output,
  logs, checkpoints while a run lasts, the runs' ``result.json``);
- ``study.db``: a consistent copy of the live storage (SQLite's online backup), taken by
  :func:`sync`: the stored study the report is rendered from;
- ``records/<arm>/<key>.json``: what the report needs of each finished or pruned run (its trial,
  its command, test metrics and the recorded curves), small enough to commit.

A fresh checkout has ``study.db`` and ``records/`` but no work folder: the study command first copies
``study.db`` back to the work folder, so running it again resumes where the stored study ended
(a run that was in flight when the copy was taken is run again from its start).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "HISTORY_KEYS",
    "StudyPaths",
    "ensure_live",
    "open_stored",
    "read_run",
    "sync",
]

# The recorded curves a run's JSON keeps (prefixes of the recorder's history keys).
HISTORY_KEYS = (
    "val_acc",
    "val_loss",
    "train_loss",
    "moments/sqrt_second_moment_p50",
    "moments/step_size_p50",
    "optimizer_switch",
)


@dataclass(frozen=True)
class StudyPaths:
    root: Path  # <out>/study
    work_dir: Path | None = None  # default <root>/work

    @property
    def stored_db(self) -> Path:
        return self.root / "study.db"

    @property
    def work(self) -> Path:
        return self.work_dir if self.work_dir is not None else self.root / "work"

    @property
    def live_db(self) -> Path:
        return self.work / "study.db"

    @property
    def records(self) -> Path:
        return self.root / "records"

    def run_json(self, arm: str, key: str) -> Path:
        return self.records / arm / f"{key}.json"

    @staticmethod
    def url(path: Path) -> str:
        import os

        try:
            shown = os.path.relpath(path)
        except ValueError:
            shown = str(path)
        return f"sqlite:///{shown}"


def ensure_live(paths: StudyPaths) -> None:
    """Start the live storage from the stored study when there is none (a fresh checkout)."""
    paths.work.mkdir(parents=True, exist_ok=True)
    if not paths.live_db.exists() and paths.stored_db.exists():
        shutil.copyfile(paths.stored_db, paths.live_db)


def _backup(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database that may be written meanwhile."""
    partial = target.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    with sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=60) as src:
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst)
        finally:
            dst.close()
    partial.replace(target)


def open_stored(paths: StudyPaths, live: bool = False) -> Any:
    """The Optuna storage of the stored study (or the live one)."""
    from recipes.sweep.storage import open_storage

    return open_storage(StudyPaths.url(paths.live_db if live else paths.stored_db))


def _pick_history(history: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: series
        for key, series in sorted(history.items())
        if any(key == p or key.startswith(p + "/") for p in HISTORY_KEYS)
    }


def run_record(
    arm: str, entry: Any, settings: Mapping[str, Any], result: Mapping[str, Any]
) -> dict:
    """The committed record of one run: its trial and what the report needs of its result."""
    from recipes.sweep.plan import run_args

    trial = entry.trial
    lr = entry.lr
    return {
        "arm": arm,
        "key": entry.key,
        "trial": trial.number,
        "role": entry.role,
        "status": entry.status,
        "optimizer": entry.optimizer,
        "seed": entry.seed,
        "lr": lr,
        "value": trial.value,
        "pruned_at_step": trial.user_attrs.get("pruned_at_step"),
        "command": [
            "python",
            "-m",
            f"recipes.{settings['recipe']}",
            *run_args(settings["common_args"], entry.optimizer, float(lr), entry.seed),
        ],
        "test": {k: result["test"][k] for k in sorted(result.get("test", {}))},
        "global_step": result.get("global_step"),
        "precision": result.get("precision"),
        "run_seconds": result.get("run_seconds"),
        "fit_seconds": result.get("fit_seconds"),
        "optimizer_classes": result.get("optimizer_classes"),
        "machine": result.get("machine"),
        "history": _pick_history(result.get("history", {})),
    }


def _dump(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1, sort_keys=True, allow_nan=True) + "\n"
    if not path.exists() or path.read_text() != text:
        partial = path.with_suffix(".partial")
        partial.write_text(text)
        partial.replace(path)


def sync(paths: StudyPaths, arms: Iterable[str]) -> int:
    """Copy the live storage to ``study.db`` and write the record of each finished or pruned
    run of ``arms``; how many run records exist."""
    from recipes.sweep.files import read_json
    from recipes.sweep.study import load_sweep

    if not paths.live_db.exists():
        return 0
    _backup(paths.live_db, paths.stored_db)
    storage = open_stored(paths)
    count = 0
    try:
        names = {s.study_name for s in storage.get_all_studies()}
        for arm in arms:
            if arm not in names:
                continue
            _, settings, current = load_sweep(storage, arm)
            for entry in current.values():
                if entry.status not in ("finished", "pruned"):
                    continue
                target = paths.run_json(arm, entry.key)
                run_dir = paths.work / "arms" / arm / "runs" / entry.key
                result = read_json(run_dir / "result.json")
                if result is None:
                    count += target.exists()
                    continue
                _dump(target, run_record(arm, entry, settings, result))
                count += 1
    finally:
        storage.remove_session()
        storage.engine.dispose()
    return count


def read_run(paths: StudyPaths, arm: str, key: str) -> dict[str, Any] | None:
    path = paths.run_json(arm, key)
    if not path.exists():
        return None
    return json.loads(path.read_text())
