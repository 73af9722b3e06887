"""The sweep report's PNG plots (matplotlib without pyplot: no global state).

- ``curves.png``: training loss, validation accuracy and loss per optimizer step;
- ``runs.png``: training loss and validation accuracy of every run, one line each;
- ``lr_schedule.png``: the LR each step used;
- ``moments.png``: global moment statistics logged by ``MomentStatistics`` (update/weight ratio,
  ``||m_hat||``, 95th percentile of ``sqrt(v_hat)``, cosine between first moment and gradient);
- ``lr_search.png``: each optimizer's LR search, final validation accuracy against the LR, pruned
  runs as crosses (at their last validation), the chosen LR circled.

Several seeds of one optimizer draw their mean, with the band from their minimum to maximum.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optim_callbacks import OPTIMIZERS
from recipes.sweep.summary import metric_series

__all__ = [
    "MOMENT_PANELS",
    "draw_figures",
    "plot_curves",
    "plot_each_run",
    "plot_lr_schedule",
    "plot_lr_search",
    "plot_moments",
]

MOMENT_PANELS = (  # (key under moments/, title, log scale)
    ("update_to_weight", "update / weight  ||Δθ|| / ||θ||", True),
    ("first_moment_hat_norm", "||m̂||  (first moment, bias-corrected)", True),
    ("sqrt_second_moment_p95", "95th percentile of sqrt(v̂)  (AdaBelief: sqrt(ŝ))", True),
    ("grad_cosine", "cos(m, g)", False),
)


def _colors(names: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

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
        series = [metric_series(r, key) for r in results]
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


def _step_panels(axes: Sequence[Any], titles: Sequence[str]) -> None:
    """Each panel's title, optimizer steps along x and a light grid."""
    for axis, title in zip(axes, titles, strict=True):
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)


def _save_with_legend(figure: Any, axes: Sequence[Any], path: Path) -> None:
    """Save ``figure`` with one legend: each optimizer once, whichever panels it appears in."""
    labelled: dict[str, Any] = {}
    for axis in axes:
        for line in axis.get_lines():
            labelled.setdefault(line.get_label(), line)
    if labelled:
        figure.legend(
            labelled.values(), labelled.keys(), loc="outside right upper", fontsize="small"
        )
    figure.savefig(path, dpi=90)


def plot_curves(
    results_by_optimizer: Mapping[str, list[dict]], colors: Mapping[str, Any], path: Path
) -> None:
    figure, axes = _new_figure(3)
    panels = (
        ("train_loss", "training loss", ""),
        ("val_acc", "validation accuracy", "o"),
        ("val_loss", "validation loss", "o"),
    )
    for axis, (key, _, marker) in zip(axes, panels, strict=True):
        _plot_metric(axis, results_by_optimizer, key, colors, marker)
    _step_panels(axes, [title for _, title, _ in panels])
    _save_with_legend(figure, axes, path)


def plot_each_run(
    runs: Mapping[str, tuple[str, dict]], colors: Mapping[str, Any], path: Path
) -> None:
    """``runs`` maps run keys to ``(optimizer, result)``: one line per run, coloured by its
    optimizer, the seeds of one optimizer told apart by line style."""
    figure, axes = _new_figure(2)
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    for key, (optimizer, result) in runs.items():
        style = styles[seen.get(optimizer, 0) % len(styles)]
        seen[optimizer] = seen.get(optimizer, 0) + 1
        for axis, (metric, marker) in zip(
            axes, (("train_loss", ""), ("val_acc", "o")), strict=True
        ):
            series = metric_series(result, metric)
            if series:
                axis.plot(
                    *zip(*series, strict=True),
                    linestyle=style,
                    marker=marker,
                    color=colors[optimizer],
                    label=key,
                )
    _step_panels(axes, ("training loss, each run", "validation accuracy, each run"))
    _save_with_legend(figure, axes, path)


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
    _save_with_legend(figure, [axis], path)


def plot_moments(
    results_by_optimizer: Mapping[str, list[dict]], colors: Mapping[str, Any], path: Path
) -> bool:
    """Global moment statistics; ``False`` (no file) when the runs logged none."""
    figure, axes = _new_figure(2, 2)
    drawn_any = False
    _step_panels(axes, [title for _, title, _ in MOMENT_PANELS])
    for axis, (statistic, _, log_scale) in zip(axes, MOMENT_PANELS, strict=True):
        drawn = _plot_metric(axis, results_by_optimizer, f"moments/{statistic}", colors, ".")
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


def plot_lr_search(
    runs: Sequence[Any],
    chosen: Mapping[str, float | None],
    colors: Mapping[str, Any],
    path: Path,
) -> bool:
    """``runs``: the search runs (:class:`~recipes.sweep.summary.RunSummary`); ``False`` (no
    file) when none has a validation accuracy."""
    import math

    figure, (axis,) = _new_figure(1)
    figure.set_size_inches(6.4, 3.8)
    drawn = False
    for name in dict.fromkeys(r.optimizer for r in runs):
        members = sorted(
            (r for r in runs if r.optimizer == name and math.isfinite(r.final_val_acc)),
            key=lambda r: r.lr,
        )
        if not members:
            continue
        color = colors.get(name, "black")
        finished = [r for r in members if r.status == "finished"]
        pruned = [r for r in members if r.status == "pruned"]
        axis.plot(
            [r.lr for r in finished],
            [r.final_val_acc for r in finished],
            marker="o",
            color=color,
            label=name,
        )
        if pruned:
            axis.scatter(
                [r.lr for r in pruned],
                [r.final_val_acc for r in pruned],
                marker="x",
                s=60,
                color=color,
                label=f"{name}, pruned",
            )
        best = [r for r in finished if r.lr == chosen.get(name)]
        if best:
            axis.scatter(
                [best[0].lr], [best[0].final_val_acc], s=220, facecolors="none", edgecolors=color
            )
        drawn = True
    if not drawn:
        return False
    axis.set_xscale("log")
    axis.set_title("LR search: final validation accuracy (x: pruned, circle: chosen)")
    axis.set_xlabel("learning rate")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize="small")
    figure.savefig(path, dpi=90)
    return True


def draw_figures(
    results_by_optimizer: Mapping[str, list[dict]],
    folder: Path,
    each_run: Mapping[str, tuple[str, dict]] | None = None,
    search_runs: Sequence[Any] = (),
    chosen: Mapping[str, float | None] | None = None,
) -> list[str]:
    """Draw every plot of the runs (best optimizer first) into ``folder``; the file names.
    ``each_run`` (run key -> ``(optimizer, result)``) adds ``runs.png``, ``search_runs``
    (with the ``chosen`` LR of each optimizer) ``lr_search.png``."""
    if not results_by_optimizer:
        return []
    colors = _colors([*results_by_optimizer, *(r.optimizer for r in search_runs)])
    plot_curves(results_by_optimizer, colors, folder / "curves.png")
    figures = ["curves.png"]
    if each_run:
        plot_each_run(each_run, colors, folder / "runs.png")
        figures.append("runs.png")
    plot_lr_schedule(results_by_optimizer, colors, folder / "lr_schedule.png")
    figures.append("lr_schedule.png")
    if plot_moments(results_by_optimizer, colors, folder / "moments.png"):
        figures.append("moments.png")
    if search_runs and plot_lr_search(search_runs, chosen or {}, colors, folder / "lr_search.png"):
        figures.append("lr_search.png")
    return figures
