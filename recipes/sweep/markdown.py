"""The sweep report as Markdown: the verdict, the optimizer table, claims, LR search, runs."""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optim_callbacks import OPTIMIZERS
from recipes.sweep.summary import OptimizerSummary, RunSummary

__all__ = ["claims_table", "markdown_report", "optimizer_table", "run_table", "verdict"]


# --- formatting -------------------------------------------------------------------------------------
def _number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "—"


def _plus_minus(mean: float, std: float, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "—"
    if not math.isfinite(std):
        return _number(mean, digits)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _bytes(value: float) -> str:
    if not math.isfinite(value):
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _seconds(value: float) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _steps_to_target(summary: OptimizerSummary) -> str:
    if summary.finished == 0:
        return "—"
    if summary.reached_target == 0:
        return "not reached"
    text = _plus_minus(summary.mean["steps_to_target"], summary.std["steps_to_target"], 0)
    if summary.reached_target < summary.finished:
        text += f" ({summary.reached_target}/{summary.finished} runs)"
    return text


def _target_label(target: float) -> str:
    """The target as a column label: no validation accuracy was logged when it is NaN."""
    return f"{target:.3f}" if math.isfinite(target) else "target (no validation ran)"


def optimizer_table(summaries: Sequence[OptimizerSummary], target: float, memory_kind: str) -> str:
    """The main Markdown table, best optimizer first (in bold)."""
    header = (
        "| rank | optimizer | lr | runs | val acc | test acc | val loss | test loss "
        f"| steps to {_target_label(target)} | fit time | peak {memory_kind} | optimizer state "
        "| step time |"
    )
    lines = [header, "|" + "---|" * 13]
    for rank, s in enumerate(summaries, start=1):
        name = f"**{s.optimizer}**" if rank == 1 else s.optimizer
        runs = str(s.runs) if not s.failed else f"{s.runs} ({s.failed} failed)"
        cells = [
            str(rank),
            name,
            f"{s.lr:.3g}",
            runs,
            _plus_minus(s.mean["final_val_acc"], s.std["final_val_acc"]),
            _plus_minus(s.mean["test_acc"], s.std["test_acc"]),
            _number(s.mean["final_val_loss"]),
            _number(s.mean["test_loss"]),
            _steps_to_target(s),
            _seconds(s.mean["fit_seconds"]),
            _bytes(s.mean["peak_memory_bytes"]),
            _bytes(s.mean["optimizer_state_bytes"]),
            _seconds(s.mean["step_seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(summaries: Sequence[OptimizerSummary], target: float) -> str:
    finished = [s for s in summaries if s.finished]
    if not finished:
        return "No run finished."
    best = finished[0]
    metric = "test" if math.isfinite(best.mean["test_acc"]) else "final validation"
    key = "test_acc" if metric == "test" else "final_val_acc"
    # Equal as printed (4 decimals): no winner.
    tied = [s for s in finished if round(s.mean[key], 4) == round(best.mean[key], 4)]
    if len(tied) > 1:
        text = (
            f"**Tie: {', '.join(s.optimizer for s in tied)}**: {metric} accuracy "
            f"{_number(best.mean[key])} each"
        )
    else:
        text = (
            f"**Winner: {best.optimizer}** (lr {best.lr:.3g}): {metric} accuracy "
            f"{_plus_minus(best.mean[key], best.std[key])} over {best.finished} run(s)"
        )
        if len(finished) > 1:
            second = finished[1]
            gap = best.mean[key] - second.mean[key]
            text += f", {gap:+.4f} ahead of {second.optimizer} ({_number(second.mean[key])})"
    reached = [s for s in finished if s.reached_target and math.isfinite(target)]
    if reached:
        fastest = min(reached, key=lambda s: s.mean["steps_to_target"])
        text += (
            f". Fastest to {target:.3f} validation accuracy: {fastest.optimizer} "
            f"({fastest.mean['steps_to_target']:.0f} steps)"
        )
    lightest = min(finished, key=lambda s: s.mean["optimizer_state_bytes"])
    return (
        text
        + f". Least optimizer state: {lightest.optimizer} ({_bytes(lightest.mean['optimizer_state_bytes'])})."
    )


def claims_table(summaries: Sequence[OptimizerSummary], target: float) -> str:
    """What practice says of each optimizer (its registry description) beside what it did here."""
    lines = ["| optimizer | what practice claims | here |", "|---|---|---|"]
    finished = [s for s in summaries if s.finished]
    for s in summaries:
        claim = OPTIMIZERS.get(s.optimizer).description if s.optimizer in OPTIMIZERS else ""
        if not s.finished:
            here = "every run failed"
        else:
            here = f"rank {finished.index(s) + 1} of {len(finished)}"
            if s.reached_target:
                here += f", {s.mean['steps_to_target']:.0f} steps to {target:.3f}"
            elif math.isfinite(target):
                here += f", never reached {target:.3f}"
        lines.append(f"| {s.optimizer} | {claim} | {here} |")
    return "\n".join(lines)


def run_table(runs: Sequence[RunSummary], folder: Path) -> str:
    lines = [
        "| run | trial | seed | lr | val acc (best) | test acc | steps | fit time | W&B run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        wandb = "—"
        if r.wandb_run_dir:
            path = Path(r.wandb_run_dir)
            wandb = f"`{path.relative_to(folder) if path.is_relative_to(folder) else path.name}`"
        trial = "—" if r.trial is None else str(r.trial)
        if r.resumed_from_step is not None:
            trial += f" (taken over at step {r.resumed_from_step})"
        if r.status != "finished":
            error = r.error.replace("|", "\\|")
            lines.append(
                f"| {r.key} | {trial} | {r.seed} | {r.lr:.3g} | failed: {error} | — | — | — | — |"
            )
            continue
        lines.append(
            f"| {r.key} | {trial} | {r.seed} | {r.lr:.3g} | {_number(r.final_val_acc)} ({_number(r.best_val_acc)}) "
            f"| {_number(r.test_acc)} | {r.steps} | {_seconds(r.fit_seconds)} | {wandb} |"
        )
    return "\n".join(lines)


def lr_search_table(
    search: Mapping[str, Any],
    runs: Sequence[RunSummary],
    chosen: Mapping[str, float | None],
) -> str:
    """Each optimizer's search: every LR tried, how its run ended, the one chosen; and which
    optimizers' best LR lies at the edge of what was tried."""
    lines = [
        "| optimizer | lr | final val acc | final val loss | run | chosen |",
        "|---|---|---|---|---|---|",
    ]
    ranges, edges = [], []
    for optimizer, entry in search.items():
        members = sorted((r for r in runs if r.optimizer == optimizer), key=lambda r: r.lr)
        best = chosen.get(optimizer)
        for run in members:
            if run.status == "pruned":
                state = f"pruned at step {run.pruned_at_step}"
            elif run.status == "failed":
                state = "failed: " + run.error.replace("|", "\\|")
            else:
                state = "finished"
            mark = "**yes**" if best is not None and run.lr == best else ""
            lines.append(
                f"| {optimizer} | {run.lr:.3g} | {_number(run.final_val_acc)} "
                f"| {_number(run.final_val_loss)} | {state} | {mark} |"
            )
        kind = "log-uniform in" if entry["kind"] == "log-uniform" else "a grid over"
        ranges.append(
            f"{optimizer}: {len(entry['lrs'])} trials, {kind} [{entry['low']:.3g}, {entry['high']:.3g}]"
        )
        tried = [r.lr for r in members]
        if best is not None and len(tried) > 1 and best in (min(tried), max(tried)):
            edges.append(optimizer)
    text = "\n".join(lines)
    text += (
        "\n\nSearched: " + "; ".join(ranges) + ". The first seed's runs, chosen by final "
        "validation accuracy (then validation loss); pruned runs were stopped early by the "
        "pruner and are never chosen; test metrics are never read to choose."
    )
    if edges:
        text += (
            f"\n\nThe best LR of {', '.join(edges)} is at the edge of what was tried: a wider "
            "`--lr-range` (or `--lr-grid`) may find a better one."
        )
    return text


def markdown_report(
    sweep: Mapping[str, Any],
    summaries: Sequence[OptimizerSummary],
    runs: Sequence[RunSummary],
    search_runs: Sequence[RunSummary],
    target: float,
    target_note: str,
    figures: Sequence[str],
    folder: Path,
    machines: Sequence[str] = (),
    chosen: Mapping[str, float | None] | None = None,
    storage_line: str = "",
) -> str:
    memory_kind = next((r.memory_kind for r in runs if r.memory_kind), "RSS")
    seeds = ", ".join(str(s) for s in sweep["seeds"])
    parts = [
        f"# Optimizer comparison: {sweep['recipe']}",
        verdict(summaries, target),
        optimizer_table(summaries, target, memory_kind),
        (
            f"Mean ± sample standard deviation over seeds {seeds}. Accuracy and loss: the last "
            "validation, and the test set evaluated with the checkpoint of best validation "
            f"accuracy. Steps to {target:.3f}: optimizer steps until the first validation at or "
            f"above {target:.3f} ({target_note}). Fit time: wall time of `fit`; step time: median "
            "time between training-step starts (validation excluded); peak "
            f"{'CUDA memory allocated' if memory_kind == 'CUDA' else 'resident memory of the run process'}; "
            "optimizer state: bytes of every tensor in `optimizer.state`."
        ),
        f"Each run: `python -m recipes.{sweep['recipe']} {shlex.join(sweep['common_args'])} "
        "--optimizer NAME --lr LR --seed_everything SEED`.",
        "Learning rates: "
        + "; ".join(f"{s.optimizer} {s.lr:.3g} ({s.lr_source})" for s in summaries)
        + ".",
        f"Command: `{sweep['command']}`",
        f"Machine: {'; '.join(machines) or 'unknown'}. W&B group: `{sweep['group']}`.",
    ]
    if storage_line:
        parts.append(storage_line)
    parts += [f"![{Path(name).stem}]({name})" for name in figures if name != "lr_search.png"]
    parts += ["## Claims and this task", claims_table(summaries, target)]
    if sweep.get("search"):
        parts += [
            "## Learning-rate search",
            lr_search_table(sweep["search"], search_runs, chosen or {}),
        ]
        if "lr_search.png" in figures:
            parts.append("![lr_search](lr_search.png)")
    parts += ["## Runs", run_table(runs, folder)]
    return "\n\n".join(parts) + "\n"
