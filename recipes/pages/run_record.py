"""``run_record.json``: what a finished recipe run did, in its run folder, for its page.

Written on rank zero at the end of every recipe run, beside ``config.yaml`` and the checkpoints.
It holds the logged curves (from :class:`~recipes.sweep.recorder.RunRecorder`: headline metrics,
learning rates, clipping, global moment statistics), the test results, where the checkpoints and
the experiment logs are, and the events ``MomentStatistics`` marked (switch, skipped non-finite
steps, heavy clipping). :mod:`recipes.pages.run_page` reads nothing else (with ``config.yaml``
and ``heatmaps/``), so a page can be drawn again from the folder alone.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from optim_callbacks import MomentStatistics, SpikeSkip, TrainingFindings, run_folder
from optim_callbacks.callbacks.spike_skip import describe_event
from recipes.sweep.files import read_json, write_json
from recipes.sweep.recorder import RunRecorder

__all__ = ["RECORD_FILE", "build_run_record", "read_run_record", "write_run_record"]

RECORD_FILE = "run_record.json"


def _relative(path: str | os.PathLike | None, folder: Path) -> str | None:
    """``path`` relative to ``folder`` when it lies inside it (the folder can move), else as is."""
    if not path:
        return None
    try:
        return str(Path(path).resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def _logger_locations(trainer: L.Trainer) -> dict[str, Any]:
    locations: dict[str, Any] = {}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            offline = bool(getattr(run, "offline", False)) or not getattr(run, "url", None)
            locations["wandb"] = {
                "run_dir": str(Path(run.dir).parent),
                "offline": offline,
                "url": None if offline else run.url,
                "project": getattr(run, "project", None),
                "id": run.id,
            }
        elif isinstance(logger, TensorBoardLogger):
            locations["tensorboard"] = {"log_dir": logger.log_dir}
        elif isinstance(logger, CSVLogger):
            locations["csv"] = {"metrics": str(Path(logger.log_dir) / "metrics.csv")}
    return locations


def build_run_record(
    trainer: L.Trainer,
    *,
    recipe: str,
    args: Sequence[str],
    settings: Mapping[str, Any],
    test_results: Mapping[str, float],
    tested_examples: int,
    test_source: str,
) -> dict[str, Any]:
    """The record of a run that has fitted and tested (call on rank zero)."""
    folder = run_folder(trainer)
    recorder = next((c for c in trainer.callbacks if isinstance(c, RunRecorder)), None)
    moments = next((c for c in trainer.callbacks if isinstance(c, MomentStatistics)), None)
    checkpoint = trainer.checkpoint_callback
    last = next((c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path), "")
    events = [asdict(e) for e in moments.history.events] if moments is not None else []
    heatmaps = None
    if moments is not None and moments.heatmap_files:
        heatmaps = _relative(moments.heatmap_folder(trainer), folder)
    return {
        "recipe": recipe,
        "args": list(args),
        "settings": dict(settings),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "global_step": trainer.global_step,
        "fit_seconds": recorder.fit_seconds if recorder is not None else None,
        "curves": recorder.history.history if recorder is not None else {},
        "lr_schedule": recorder.lr_schedule if recorder is not None else [],
        "test": {
            "results": {k: float(v) for k, v in test_results.items()},
            "examples": int(tested_examples),
            "source": test_source,
        },
        "checkpoints": {
            "best": _relative(getattr(checkpoint, "best_model_path", "") or None, folder),
            "last": _relative(last or None, folder),
        },
        "loggers": _logger_locations(trainer),
        "heatmaps": heatmaps,
        "events": events,
        **_health(trainer, events),
    }


def _health(trainer: L.Trainer, listed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The findings in words and SpikeSkip's skipped steps. ``spike_events``: the skips the
    heatmaps' events (``listed``; MomentStatistics hears of each skip) do not already hold, so
    the page lists each once."""
    findings = next((c for c in trainer.callbacks if isinstance(c, TrainingFindings)), None)
    spikes = next((c for c in trainer.callbacks if isinstance(c, SpikeSkip)), None)
    events = spikes.events if spikes is not None else []
    known = {e["step"] for e in listed if e["kind"] == "spike"}
    return {
        "findings": [f.as_dict() for f in findings.findings] if findings is not None else [],
        "spikes": {"skipped": spikes.skipped_steps, "events": events} if spikes else None,
        "spike_events": [
            {"step": e["step"], "kind": "spike", "label": describe_event(e)}
            for e in events
            if e["step"] not in known
        ],
    }


def write_run_record(folder: str | Path, record: Mapping[str, Any]) -> Path:
    path = Path(folder) / RECORD_FILE
    write_json(path, dict(record))
    return path


def read_run_record(folder: str | Path) -> dict[str, Any]:
    """The record of the run folder ``folder``; ``ValueError`` naming the folder if it has none."""
    record = read_json(Path(folder) / RECORD_FILE)
    if record is None:
        raise ValueError(
            f"folder: got {str(folder)!r}, which has no {RECORD_FILE}; allowed: the run folder of "
            "a finished recipe run (the folder above its checkpoints/)"
        )
    return record
