"""The numbers of a sweep: one summary per run, per optimizer over seeds, the target accuracy.

Steps are optimizer steps taken: Lightning logs a metric after step ``k`` (1-based) under step
``k - 1``, so one is added to every logged step. "Steps to target" is the first validation at
which the accuracy reached the target (by default 95% of the best validation accuracy any run of
the sweep reached), so it is as fine as the validation interval.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.sweep.files import read_json

__all__ = [
    "RELATIVE_TARGET",
    "OptimizerSummary",
    "RunSummary",
    "load_runs",
    "metric_series",
    "steps_to_reach",
    "summarize_optimizers",
    "summarize_run",
    "sweep_target",
]

RELATIVE_TARGET = 0.95


# --- one run ----------------------------------------------------------------------------------
@dataclass
class RunSummary:
    """The numbers of one run that the report shows."""

    key: str
    optimizer: str
    lr: float
    lr_source: str
    seed: int
    status: str  # "finished", "pruned" or "failed"
    final_val_acc: float = math.nan
    best_val_acc: float = math.nan
    final_val_loss: float = math.nan
    test_acc: float = math.nan
    test_loss: float = math.nan
    steps_to_target: int | None = None
    steps: int = 0
    fit_seconds: float = math.nan
    step_seconds: float = math.nan  # median
    peak_memory_bytes: float = math.nan
    memory_kind: str = ""
    optimizer_state_bytes: float = math.nan
    wandb_run_dir: str | None = None
    error: str = ""
    pruned_at_step: int | None = None
    trial: int | None = None  # the Optuna trial's number (its newest attempt)
    resumed_from_step: int | None = None  # taken over from a dead attempt's last.ckpt


def metric_series(result: Mapping[str, Any], key: str) -> list[tuple[int, float]]:
    """``(optimizer steps taken, value)`` of a logged metric, in logging order."""
    return [(int(step) + 1, float(value)) for step, value in result["history"].get(key, [])]


def steps_to_reach(series: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first step at which ``value >= target``; ``None`` if never."""
    return next((step for step, value in series if value >= target), None)


def summarize_run(
    run: Mapping[str, Any], result: Mapping[str, Any] | None, target: float
) -> RunSummary:
    summary = RunSummary(
        key=run["key"],
        optimizer=run["optimizer"],
        lr=run["lr"],
        lr_source=run["lr_source"],
        seed=run["seed"],
        status=run.get("status", "finished") if result is not None else "failed",
        pruned_at_step=run.get("pruned_at_step"),
        trial=run.get("trial"),
        resumed_from_step=run.get("resumed_from_step"),
    )
    if result is None:
        return summary
    val_acc = metric_series(result, "val_acc")
    val_loss = metric_series(result, "val_loss")
    if val_acc:
        summary.final_val_acc = val_acc[-1][1]
        summary.best_val_acc = max(value for _, value in val_acc)
        summary.steps_to_target = steps_to_reach(val_acc, target)
    if val_loss:
        summary.final_val_loss = val_loss[-1][1]
    test = result.get("test", {})
    summary.test_acc = float(test.get("test_acc", math.nan))
    summary.test_loss = float(test.get("test_loss", math.nan))
    summary.steps = int(result["global_step"])
    summary.fit_seconds = float(result["fit_seconds"])
    if result["step_seconds"]:
        summary.step_seconds = statistics.median(result["step_seconds"])
    if result.get("peak_device_memory_bytes"):
        summary.peak_memory_bytes = float(result["peak_device_memory_bytes"])
        summary.memory_kind = "CUDA"
    else:
        summary.peak_memory_bytes = float(result["peak_process_memory_bytes"])
        summary.memory_kind = "RSS"
    summary.optimizer_state_bytes = float(result["optimizer_state_bytes"])
    summary.wandb_run_dir = result.get("wandb_run_dir")
    return summary


# --- one optimizer over seeds -------------------------------------------------------------------
@dataclass
class OptimizerSummary:
    """Mean and sample standard deviation over an optimizer's finished runs."""

    optimizer: str
    lr: float
    lr_source: str
    runs: int
    failed: int
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    reached_target: int = 0

    @property
    def finished(self) -> int:
        return self.runs - self.failed


AVERAGED = (
    "final_val_acc",
    "best_val_acc",
    "final_val_loss",
    "test_acc",
    "test_loss",
    "fit_seconds",
    "step_seconds",
    "peak_memory_bytes",
    "optimizer_state_bytes",
)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else math.nan


def summarize_optimizers(runs: Sequence[RunSummary]) -> list[OptimizerSummary]:
    """One summary per optimizer, best first: higher mean test accuracy (validation accuracy
    if there is no test), then lower validation loss."""
    by_optimizer: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_optimizer.setdefault(run.optimizer, []).append(run)
    summaries = []
    for name, members in by_optimizer.items():
        finished = [r for r in members if r.status == "finished"]
        summary = OptimizerSummary(
            optimizer=name,
            lr=members[0].lr,
            lr_source=members[0].lr_source,
            runs=len(members),
            failed=len(members) - len(finished),
        )
        for key in AVERAGED:
            summary.mean[key], summary.std[key] = _mean_std([getattr(r, key) for r in finished])
        reached = [r.steps_to_target for r in finished if r.steps_to_target is not None]
        summary.reached_target = len(reached)
        summary.mean["steps_to_target"], summary.std["steps_to_target"] = _mean_std(reached)
        summaries.append(summary)

    def rank(s: OptimizerSummary) -> tuple[float, float]:
        accuracy = s.mean["test_acc"]
        if not math.isfinite(accuracy):
            accuracy = s.mean["final_val_acc"]
        loss = s.mean["final_val_loss"]
        return (
            -accuracy if math.isfinite(accuracy) else math.inf,
            loss if math.isfinite(loss) else math.inf,
        )

    return sorted(summaries, key=rank)


# --- reading a sweep ---------------------------------------------------------------------------
def load_runs(
    folder: Path, entries: Sequence[Any], lr_sources: Mapping[str, str] | None = None
) -> list[tuple[dict[str, Any], dict | None, dict | None]]:
    """``(run, result.json or None, failure or None)`` of each started trial in ``entries``
    (:class:`recipes.sweep.study.SweepTrial`): ``run`` describes the trial, ``result.json`` is
    what its run recorded in ``<folder>/runs/<key>/``."""
    loaded = []
    for entry in entries:
        if entry.status in ("waiting", "running"):
            continue
        attrs = entry.trial.user_attrs
        run = {
            "key": entry.key,
            "optimizer": entry.optimizer,
            "lr": entry.lr if entry.lr is not None else math.nan,
            "lr_source": (lr_sources or {}).get(entry.optimizer, ""),
            "seed": entry.seed,
            "status": entry.status,
            "pruned_at_step": attrs.get("pruned_at_step"),
            "trial": entry.trial.number,
            "resumed_from_step": attrs.get("resumed_from_step"),
        }
        result = None
        if entry.status in ("finished", "pruned"):
            result = read_json(folder / "runs" / entry.key / "result.json")
        failure = {"error": attrs.get("error", "")} if entry.status == "failed" else None
        loaded.append((run, result, failure))
    return loaded


def sweep_target(results: Sequence[Mapping[str, Any]], target: float | None) -> tuple[float, str]:
    """The target accuracy and how it was chosen."""
    if target is not None:
        return target, "given with --target-accuracy"
    best = max(
        (value for result in results for _, value in result["history"].get("val_acc", [])),
        default=math.nan,
    )
    return (
        RELATIVE_TARGET * best,
        f"{RELATIVE_TARGET:.0%} of the best validation accuracy of the sweep ({best:.4f})",
    )
