"""From the stored study to verdicts: each arm's runs per seed, each metric, each claim.

Which run stands for an arm at a seed: at the first seed, the LR-search trial at the LR the
search chose (:func:`recipes.sweep.study.chosen_lr`: best final validation accuracy; test data
never chooses); at a further seed, the arm's comparison run at that LR. A fixed-LR arm has one
comparison run per seed. An arm is complete when every registered seed has a finished run;
a claim gets a verdict only when all of its arms are complete ("not yet run" otherwise).

Metrics (``configs/claims.yaml``):

- ``test_acc``: the run's test accuracy; the recipes test the run's checkpoint with the best
  validation accuracy (``ckpt_path="best"``), so it is chosen on validation, never on test;
- ``final_val_loss``: the validation loss at its last validation;
- ``mean_val_loss``: the mean of its validation losses (an area under the curve: lower means
  it got there faster);
- ``effective_lr_log10_ratio``: at a constant LR the effective per-element LR of an adaptive
  optimizer is ``lr / (sqrt(v) + eps)``; with MomentStatistics' median ``sqrt(v)``
  (``moments/sqrt_second_moment_p50``) at the first logged step ``s_0`` and the last ``s_T``,
  ``log10(s_0 / s_T)`` is log10 of the effective LR at the end over the start (eps neglected:
  Adagrad's 1e-10 and RMSprop's 1e-8 are far below the measured ``sqrt(v)``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from recipes.claims.registry import Arm, Claim, Comparison, Registry
from recipes.claims.store import StudyPaths, open_stored, read_run
from recipes.claims.verdict import (
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    UNTESTED,
    Interval,
    combine,
    effect_interval,
    identical_pairs,
    verdict,
)

__all__ = [
    "NOT_YET_RUN",
    "ArmResult",
    "ClaimResult",
    "ComparisonResult",
    "evaluate",
    "load_arms",
    "metric_value",
]

NOT_YET_RUN = "not yet run"


def _series(record: Mapping[str, Any], key: str) -> list[float]:
    return [float(v) for _, v in record.get("history", {}).get(key, [])]


def metric_value(record: Mapping[str, Any], metric: str) -> float:
    """``metric`` of one run's stored record (NaN when the run did not record it)."""
    if metric == "test_acc":
        return float(record.get("test", {}).get("test_acc", math.nan))
    if metric == "final_val_loss":
        losses = _series(record, "val_loss")
        return losses[-1] if losses else math.nan
    if metric == "mean_val_loss":
        losses = _series(record, "val_loss")
        return statistics.fmean(losses) if losses else math.nan
    if metric == "effective_lr_log10_ratio":
        roots = [v for v in _series(record, "moments/sqrt_second_moment_p50") if v > 0]
        if len(roots) < 2:
            return math.nan
        return math.log10(roots[0] / roots[-1])
    raise ValueError(f"metric: got {metric!r}; allowed: test_acc, final_val_loss, ...")


@dataclass
class ArmResult:
    arm: Arm
    seeds: tuple[int, ...]  # the registered seeds (two with --quick)
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)  # seed -> record
    search: list[dict[str, Any]] = field(default_factory=list)  # LR-search records + states
    chosen_lr: float | None = None
    failed: list[str] = field(default_factory=list)  # keys of failed runs
    started: bool = False

    @property
    def complete(self) -> bool:
        return all(seed in self.runs for seed in self.seeds)

    @property
    def status(self) -> str:
        if self.complete:
            return "complete"
        if not self.started:
            return NOT_YET_RUN
        return f"in progress ({len(self.runs)} of {len(self.seeds)} seeds)"

    def values(self, metric: str) -> dict[int, float]:
        return {seed: metric_value(record, metric) for seed, record in sorted(self.runs.items())}


def load_arms(paths: StudyPaths, registry: Registry, quick: bool) -> dict[str, ArmResult]:
    """Every arm's runs as stored (``study.db`` and ``records/``)."""
    seeds = registry.seeds[:2] if quick else registry.seeds
    results = {name: ArmResult(arm, tuple(seeds)) for name, arm in registry.arms.items()}
    if not paths.stored_db.exists():
        return results
    from recipes.sweep.study import chosen_lr, load_sweep

    storage = open_stored(paths)
    try:
        names = {s.study_name for s in storage.get_all_studies()}
        for name, result in results.items():
            if name not in names:
                continue
            _, _, current = load_sweep(storage, name)
            result.started = any(t.status != "waiting" for t in current.values())
            lr = chosen_lr(current, result.arm.optimizer) if result.arm.searched else None
            result.chosen_lr = lr if result.arm.searched else result.arm.fixed_lr
            for entry in current.values():
                record = read_run(paths, name, entry.key)
                if entry.status == "failed":
                    result.failed.append(entry.key)
                if entry.role == "lr-search":
                    result.search.append(
                        {
                            "key": entry.key,
                            "lr": entry.lr,
                            "status": entry.status,
                            "value": entry.trial.value,
                            "record": record is not None,
                        }
                    )
                    chosen = entry.status == "finished" and lr is not None and entry.lr == lr
                    if chosen and record is not None:
                        result.runs[entry.seed] = record
                elif entry.status == "finished" and record is not None:
                    result.runs[entry.seed] = record
    finally:
        storage.remove_session()
        storage.engine.dispose()
    return results


@dataclass
class ComparisonResult:
    comparison: Comparison
    task: str
    interval: Interval | None  # oriented: positive = predicted
    verdict: str
    means: tuple[float | None, float | None]  # arm, other (metric units)
    raw: tuple[float, float, float] | None  # arm - other (or the arm's mean): effect, low, high
    note: str = ""


@dataclass
class ClaimResult:
    claim: Claim
    verdict: str
    comparisons: list[ComparisonResult]
    per_task: dict[str, str]  # task -> verdict (claims spanning tasks)
    seeds: int  # seeds per arm that entered the verdict (fewest of any comparison)


def _orient(direction: str) -> int:
    return 1 if direction == "higher" else -1


def _compare(
    claim: Claim, comparison: Comparison, arms: Mapping[str, ArmResult]
) -> ComparisonResult:
    first = arms[comparison.arm]
    second = arms[comparison.other] if comparison.other is not None else None
    task = first.arm.task
    pending = [a for a in (first, second) if a is not None and not a.complete]
    if pending:
        status = "; ".join(f"{a.arm.name}: {a.status}" for a in pending)
        return ComparisonResult(comparison, task, None, NOT_YET_RUN, (None, None), None, status)
    orient = _orient(claim.direction)
    a = first.values(claim.metric)
    b = second.values(claim.metric) if second is not None else None
    interval = effect_interval(a, b, orient)
    finite = lambda v: [x for x in v.values() if math.isfinite(x)]  # noqa: E731
    means = (
        statistics.fmean(finite(a)) if finite(a) else None,
        statistics.fmean(finite(b)) if b is not None and finite(b) else None,
    )
    note = ""
    lost = [s for s, v in a.items() if not math.isfinite(v)]
    if b is not None:
        lost += [s for s, v in b.items() if not math.isfinite(v)]
    if lost:
        note = f"non-finite {claim.metric} at seed(s) {sorted(set(lost))}: left out"
    if interval is None:
        return ComparisonResult(
            comparison, task, None, INCONCLUSIVE, means, None, note or "fewer than 2 values"
        )
    raw = tuple(sorted(orient * v for v in (interval.low, interval.high)))
    result_verdict = verdict(interval, identical=identical_pairs(a, b))
    return ComparisonResult(
        comparison,
        task,
        interval,
        result_verdict,
        means,
        (orient * interval.effect, raw[0], raw[1]),
        note,
    )


def evaluate(claim: Claim, arms: Mapping[str, ArmResult]) -> ClaimResult:
    """The claim's comparisons, each with its interval and verdict, and the combined verdict
    (``combine`` of the registry; a claim with any comparison not yet run is not yet run)."""
    results = [_compare(claim, c, arms) for c in claim.comparisons]
    seeds = (
        min(
            (r.interval.n if r.interval.method != "Welch t" else r.interval.n // 2)
            for r in results
            if r.interval is not None
        )
        if any(r.interval is not None for r in results)
        else 0
    )
    per_task: dict[str, str] = {}
    for task in dict.fromkeys(r.task for r in results):
        verdicts = [r.verdict for r in results if r.task == task]
        rule = "all" if claim.combine == "per_task" else claim.combine
        per_task[task] = NOT_YET_RUN if NOT_YET_RUN in verdicts else combine(verdicts, rule)
    if claim.combine == "per_task":
        done = [v for v in per_task.values() if v != NOT_YET_RUN]
        if not done:
            overall = NOT_YET_RUN
        elif len(set(per_task.values())) == 1:
            overall = done[0]
        else:
            overall = "differs by task"
    elif any(r.verdict == NOT_YET_RUN for r in results):
        overall = NOT_YET_RUN
    else:
        overall = combine([r.verdict for r in results], claim.combine)
    return ClaimResult(claim, overall, results, per_task, seeds)


def verdict_counts(results: Sequence[ClaimResult]) -> dict[str, int]:
    order = (SUPPORTED, CONTRADICTED, INCONCLUSIVE, UNTESTED, "differs by task", NOT_YET_RUN)
    return {v: sum(r.verdict == v for r in results) for v in order}
