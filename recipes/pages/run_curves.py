"""The run page's headline curves, one PNG: loss, accuracy, learning rate, clipping, the global
update/weight ratio and the spread of Adam's step size, with the optimizer switch marked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from recipes.sweep.summary import metric_series

__all__ = ["PANELS", "plot_run_curves"]

# (title, [(key, label, marker)], log scale)
PANELS: tuple[tuple[str, tuple[tuple[str, str, str], ...], bool], ...] = (
    ("loss", (("train_loss", "train", ""), ("val_loss", "validation", "o")), False),
    ("accuracy", (("train_acc", "train", ""), ("val_acc", "validation", "o")), False),
    ("learning rate (largest group)", (), True),
    (
        "gradient clipping",
        (
            ("grad_clip/coefficient", "coefficient ||g_clipped|| / ||g||", ""),
            ("grad_clip/clipped_fraction", "share of steps clipped", ""),
        ),
        False,
    ),
    (
        "update / weight  ||Δθ|| / ||θ||",
        (("moments/update_to_weight", "all parameters", "."),),
        True,
    ),
    (
        "step size lr / (sqrt(v̂) + eps)",
        (
            ("moments/step_size_p95", "p95", "."),
            ("moments/step_size_p50", "p50", "."),
            ("moments/step_size_p05", "p05", "."),
        ),
        True,
    ),
)


def plot_run_curves(record: Mapping[str, Any], path: Path) -> bool:
    """Draw the panels that have data into ``path``; ``False`` (no file) when none has."""
    from matplotlib.figure import Figure  # no pyplot: no global state

    curves = record.get("curves", {})
    switches = [e for e in record.get("events", []) if e["kind"] == "switch"]
    drawn = [p for p in PANELS if _panel_has_data(p, record)]
    if not drawn:
        return False
    columns = 3
    rows = -(-len(drawn) // columns)
    figure = Figure(figsize=(4.6 * columns, 3.3 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (title, lines, log_scale) in zip(axes, drawn, strict=False):
        if not lines:  # the learning rate each optimizer step used
            schedule = record["lr_schedule"]
            axis.plot([s + 1 for s, _ in schedule], [lr for _, lr in schedule], label="lr")
        for key, label, marker in lines:
            series = metric_series({"history": curves}, key)
            if series:
                axis.plot(*zip(*series, strict=True), marker=marker, label=label)
        values = [y for line in axis.get_lines() for y in line.get_ydata()]
        if log_scale and values and all(y > 0 for y in values):
            axis.set_yscale("log")
        _mark_switches(axis, switches)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        if len(axis.get_lines()) > 1 or switches:
            axis.legend(fontsize="x-small")
    for axis in axes[len(drawn) :]:
        axis.set_visible(False)
    figure.savefig(path, dpi=90)
    return True


def _panel_has_data(panel: tuple[str, Sequence[tuple[str, str, str]], bool], record: Any) -> bool:
    _, lines, _ = panel
    if not lines:
        return bool(record.get("lr_schedule"))
    return any(record.get("curves", {}).get(key) for key, _, _ in lines)


def _mark_switches(axis: Any, switches: Sequence[Mapping[str, Any]]) -> None:
    for event in switches:
        axis.axvline(
            event["step"], color="black", linestyle="--", linewidth=1, label=event["label"]
        )
