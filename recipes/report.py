"""The report of a comparison sweep: a Markdown table, PNG plots and the numbers as JSON.

    python -m recipes.report reports/bert_finetune     # (re)write the report of a sweep folder

Reads what :mod:`recipes.compare` left in the folder (``sweep.json``; per run ``run.json`` and
the recorder's ``result.json``, or ``failure.json``) and writes

- ``report.md``: which optimizer won and how, one row per optimizer (mean ± sample standard
  deviation over seeds), one row per run, the LR search if there was one, the plots;
- ``results.json``: the same numbers, unrounded;
- ``curves.png`` (training loss, validation accuracy and loss per optimizer step),
  ``lr_schedule.png`` (the LR each step used) and ``moments.png`` (global moment statistics
  logged by ``MomentStatistics``: update/weight ratio, median step size and ``sqrt(v_hat)``,
  cosine between the first moment and the gradient).

Steps are optimizer steps taken: Lightning logs a metric after step ``k`` (1-based) under step
``k - 1``, so one is added to every logged step. "Steps to target" is the first validation at
which the accuracy reached the target (by default 95% of the best validation accuracy any run of
the sweep reached), so it is as fine as the validation interval.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recipes.compare_run import read_json

__all__ = [
    "OptimizerSummary",
    "RunSummary",
    "load_runs",
    "main",
    "markdown_report",
    "summarize_optimizers",
    "summarize_run",
    "write_report",
]

RELATIVE_TARGET = 0.95
MOMENT_PANELS = (  # (key under moments/global/, title, log scale)
    ("update_to_weight", "update / weight  ||Δθ|| / ||θ||", True),
    ("first_moment_hat_norm", "||m̂||  (first moment, bias-corrected)", True),
    ("sqrt_second_moment_p95", "95th percentile of sqrt(v̂)  (AdaBelief: sqrt(ŝ))", True),
    ("grad_cosine", "cos(m, g)", False),
)


# --- one run ----------------------------------------------------------------------------------
@dataclass
class RunSummary:
    """The numbers of one run that the report shows."""

    key: str
    optimizer: str
    lr: float
    lr_source: str
    seed: int
    status: str  # "finished" or "failed"
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


def _series(result: Mapping[str, Any], key: str) -> list[tuple[int, float]]:
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
        status="finished" if result is not None else "failed",
    )
    if result is None:
        return summary
    val_acc = _series(result, "val_acc")
    val_loss = _series(result, "val_loss")
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


# --- reading a sweep folder ------------------------------------------------------------------------
def load_runs(
    folder: Path, keys: Sequence[str]
) -> list[tuple[dict[str, Any], dict | None, dict | None]]:
    """``(run.json, result.json or None, failure.json or None)`` of each run in ``keys`` that
    has started."""
    loaded = []
    for key in keys:
        run_dir = folder / "runs" / key
        run = read_json(run_dir / "run.json")
        if run is None:
            continue
        loaded.append(
            (run, read_json(run_dir / "result.json"), read_json(run_dir / "failure.json"))
        )
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


def optimizer_table(summaries: Sequence[OptimizerSummary], target: float, memory_kind: str) -> str:
    """The main Markdown table, best optimizer first (in bold)."""
    header = (
        "| rank | optimizer | lr | runs | val acc | test acc | val loss | test loss "
        f"| steps to {target:.3f} | fit time | peak {memory_kind} | optimizer state | step time |"
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


def _verdict(summaries: Sequence[OptimizerSummary], target: float) -> str:
    finished = [s for s in summaries if s.finished]
    if not finished:
        return "No run finished."
    best = finished[0]
    metric = "test" if math.isfinite(best.mean["test_acc"]) else "final validation"
    key = "test_acc" if metric == "test" else "final_val_acc"
    text = (
        f"**Winner: {best.optimizer}** (lr {best.lr:.3g}): {metric} accuracy "
        f"{_plus_minus(best.mean[key], best.std[key])} over {best.finished} run(s)"
    )
    if len(finished) > 1:
        second = finished[1]
        gap = best.mean[key] - second.mean[key]
        text += f", {gap:+.4f} ahead of {second.optimizer} ({_number(second.mean[key])})"
    reached = [s for s in finished if s.reached_target]
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
    from optim_callbacks import OPTIMIZERS

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
            else:
                here += f", never reached {target:.3f}"
        lines.append(f"| {s.optimizer} | {claim} | {here} |")
    return "\n".join(lines)


def run_table(runs: Sequence[RunSummary], folder: Path) -> str:
    lines = [
        "| run | seed | lr | val acc (best) | test acc | steps | fit time | W&B run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        wandb = "—"
        if r.wandb_run_dir:
            path = Path(r.wandb_run_dir)
            wandb = f"`{path.relative_to(folder) if path.is_relative_to(folder) else path.name}`"
        if r.status != "finished":
            error = r.error.replace("|", "\\|")
            lines.append(f"| {r.key} | {r.seed} | {r.lr:.3g} | failed: {error} | — | — | — | — |")
            continue
        lines.append(
            f"| {r.key} | {r.seed} | {r.lr:.3g} | {_number(r.final_val_acc)} ({_number(r.best_val_acc)}) "
            f"| {_number(r.test_acc)} | {r.steps} | {_seconds(r.fit_seconds)} | {wandb} |"
        )
    return "\n".join(lines)


def lr_search_table(search: Mapping[str, Any], runs: Mapping[str, RunSummary]) -> str:
    lines = [
        "| optimizer | lr | final val acc | final val loss | chosen |",
        "|---|---|---|---|---|",
    ]
    notes = []
    for optimizer, entry in search.items():
        grid = entry["grid"]
        for lr, key in zip(grid, entry["runs"], strict=True):
            run = runs.get(key)
            acc = _number(run.final_val_acc) if run else "—"
            loss = _number(run.final_val_loss) if run else "—"
            chosen = "**yes**" if lr == entry.get("chosen") else ""
            lines.append(f"| {optimizer} | {lr:.3g} | {acc} | {loss} | {chosen} |")
        if entry.get("chosen") in (grid[0], grid[-1]) and len(grid) > 1:
            notes.append(optimizer)
    text = "\n".join(lines)
    if notes:
        text += (
            f"\n\nThe best LR of {', '.join(notes)} is at the edge of the grid: a wider "
            "`--lr-grid` may find a better one."
        )
    return text


def markdown_report(
    sweep: Mapping[str, Any],
    summaries: Sequence[OptimizerSummary],
    runs: Sequence[RunSummary],
    search_runs: Mapping[str, RunSummary],
    target: float,
    target_note: str,
    figures: Sequence[str],
    folder: Path,
    machines: Sequence[str] = (),
) -> str:
    memory_kind = next((r.memory_kind for r in runs if r.memory_kind), "RSS")
    seeds = ", ".join(str(s) for s in sweep["seeds"])
    parts = [
        f"# Optimizer comparison: {sweep['recipe']}",
        _verdict(summaries, target),
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
    parts += [f"![{Path(name).stem}]({name})" for name in figures]
    parts += ["## Claims and this task", claims_table(summaries, target)]
    if sweep.get("lr_search"):
        parts += ["## Learning-rate search", lr_search_table(sweep["lr_search"], search_runs)]
    parts += ["## Runs", run_table(runs, folder)]
    return "\n\n".join(parts) + "\n"


# --- plots --------------------------------------------------------------------------------------------
def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    from optim_callbacks import OPTIMIZERS

    palette = colormaps["tab10"].colors
    order = OPTIMIZERS.names()
    return {
        name: palette[(order.index(name) if name in order else len(order) + i) % len(palette)]
        for i, name in enumerate(names)
    }


def _mean_curve(
    series: Sequence[Sequence[tuple[int, float]]],
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Mean, min and max over seeds at the steps every seed logged."""
    common = set.intersection(*(set(step for step, _ in s) for s in series)) if series else set()
    steps = sorted(common)
    values = [[dict(s)[step] for s in series] for step in steps]
    return (
        steps,
        [statistics.fmean(v) for v in values],
        [min(v) for v in values],
        [max(v) for v in values],
    )


def _plot_metric(
    axis: Any,
    results_by_optimizer: Mapping[str, list[dict]],
    key: str,
    colors: Mapping[str, Any],
    marker: str = "",
) -> bool:
    drawn = False
    for name, results in results_by_optimizer.items():
        series = [_series(r, key) for r in results]
        series = [s for s in series if s]
        if not series:
            continue
        steps, mean, low, high = _mean_curve(series)
        axis.plot(steps, mean, marker=marker, color=colors[name], label=name)
        if len(series) > 1:
            axis.fill_between(steps, low, high, color=colors[name], alpha=0.2)
        drawn = True
    return drawn


def _new_figure(columns: int, rows: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on save

    figure = Figure(figsize=(4.6 * columns, 3.4 * rows), layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False).ravel()


def _legend(figure: Any, axes: Sequence[Any]) -> None:
    """One legend for the figure: each optimizer once, whichever panels it appears in."""
    labelled: dict[str, Any] = {}
    for axis in axes:
        for line in axis.get_lines():
            labelled.setdefault(line.get_label(), line)
    if labelled:
        figure.legend(
            labelled.values(), labelled.keys(), loc="outside right upper", fontsize="small"
        )


def plot_curves(
    results_by_optimizer: Mapping[str, list[dict]], colors: Mapping[str, Any], path: Path
) -> None:
    figure, axes = _new_figure(3)
    panels = (
        ("train_loss", "training loss", ""),
        ("val_acc", "validation accuracy", "o"),
        ("val_loss", "validation loss", "o"),
    )
    for axis, (key, title, marker) in zip(axes, panels, strict=True):
        _plot_metric(axis, results_by_optimizer, key, colors, marker)
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    _legend(figure, axes)
    figure.savefig(path, dpi=90)


def plot_lr_schedule(
    results_by_optimizer: Mapping[str, list[dict]], colors: Mapping[str, Any], path: Path
) -> None:
    figure, (axis,) = _new_figure(1)
    figure.set_size_inches(6.4, 3.6)
    for name, results in results_by_optimizer.items():
        schedule = results[0]["lr_schedule"]
        if schedule:
            axis.plot(
                [step + 1 for step, _ in schedule],
                [lr for _, lr in schedule],
                color=colors[name],
                label=name,
            )
    axis.set_yscale("log")
    axis.set_title("LR of each step (largest parameter group)")
    axis.set_xlabel("optimizer step")
    axis.grid(alpha=0.3, which="both")
    _legend(figure, [axis])
    figure.savefig(path, dpi=90)


def plot_moments(
    results_by_optimizer: Mapping[str, list[dict]], colors: Mapping[str, Any], path: Path
) -> bool:
    """Global moment statistics; ``False`` (no file) when the runs logged none."""
    figure, axes = _new_figure(2, 2)
    drawn_any = False
    for axis, (statistic, title, log_scale) in zip(axes, MOMENT_PANELS, strict=True):
        drawn = _plot_metric(axis, results_by_optimizer, f"moments/global/{statistic}", colors, ".")
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        if (
            drawn
            and log_scale
            and all(y > 0 for line in axis.get_lines() for y in line.get_ydata())
        ):
            axis.set_yscale("log")
        if drawn:
            axis.legend(fontsize="small")
        drawn_any |= drawn
    if drawn_any:
        figure.savefig(path, dpi=90)
    return drawn_any


# --- the whole report ---------------------------------------------------------------------------------
def write_report(folder: str | Path, *, print_table: bool = True) -> str:
    """Write ``report.md``, ``results.json`` and the PNGs into ``folder``; the report's text."""
    folder = Path(folder)
    sweep = read_json(folder / "sweep.json")
    if sweep is None:
        raise ValueError(
            f"folder: got {str(folder)!r}, which has no sweep.json; allowed: a folder written by recipes.compare"
        )
    loaded = load_runs(folder, sweep["main_runs"])
    search_keys = [key for entry in sweep.get("lr_search", {}).values() for key in entry["runs"]]
    search_loaded = load_runs(folder, search_keys)
    finished = [result for _, result, _ in loaded if result is not None]
    target, target_note = sweep_target(
        finished + [r for _, r, _ in search_loaded if r is not None], sweep.get("target_accuracy")
    )
    runs = []
    for run, result, failure in loaded:
        summary = summarize_run(run, result, target)
        chosen = sweep.get("lrs", {}).get(run["optimizer"])
        if chosen is not None and chosen["value"] == run["lr"]:
            summary.lr_source = chosen["source"]
        if failure is not None and result is None:
            summary.error = failure.get("error", "")
        runs.append(summary)
    search_runs = {
        run["key"]: summarize_run(run, result, target) for run, result, _ in search_loaded
    }
    summaries = summarize_optimizers(runs)

    results_by_optimizer: dict[str, list[dict]] = {}
    for run, result, _ in loaded:
        if result is not None:
            results_by_optimizer.setdefault(run["optimizer"], []).append(result)
    ordered = {
        s.optimizer: results_by_optimizer[s.optimizer]
        for s in summaries
        if s.optimizer in results_by_optimizer
    }
    figures = []
    if ordered:
        colors = _colors(list(ordered))
        plot_curves(ordered, colors, folder / "curves.png")
        plot_lr_schedule(ordered, colors, folder / "lr_schedule.png")
        figures = ["curves.png", "lr_schedule.png"]
        if plot_moments(ordered, colors, folder / "moments.png"):
            figures.append("moments.png")
    machines = sorted({result.get("machine", "") for result in finished} - {""})
    text = markdown_report(
        sweep, summaries, runs, search_runs, target, target_note, figures, folder, machines
    )
    (folder / "report.md").write_text(text)
    numbers = {
        "recipe": sweep["recipe"],
        "target_accuracy": target,
        "optimizers": [asdict(s) for s in summaries],
        "runs": [asdict(r) for r in runs],
        "lr_search_runs": [asdict(r) for r in search_runs.values()],
    }
    (folder / "results.json").write_text(json.dumps(numbers, indent=1))
    if print_table:
        print(_verdict(summaries, target))
        print(
            optimizer_table(
                summaries, target, next((r.memory_kind for r in runs if r.memory_kind), "RSS")
            )
        )
        print(f"Report: {folder / 'report.md'}")
    return text


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m recipes.report SWEEP_FOLDER", file=sys.stderr)
        raise SystemExit(2)
    try:
        write_report(argv[0])
    except ValueError as error:
        print(f"python -m recipes.report: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
